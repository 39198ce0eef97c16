"""A one-line progress bar on stderr, for the command-line tools (dlm-bench, dlm-eval, dlm-lsp evaluate)."""

from __future__ import annotations

import sys
import time


def progress(done: int, total: int, started: float, extra: str = "") -> None:
    """A one-line progress bar with ETA on stderr."""
    width = 30
    filled = int(width * done / max(1, total))
    rate = done / max(1e-9, time.perf_counter() - started)
    eta = (total - done) / rate if rate else 0
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra} ETA {eta:.0f}s ")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")
