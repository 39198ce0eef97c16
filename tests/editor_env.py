"""Real-editor tests skip when an editor is not installed, except in CI (``DLM_REQUIRE_EDITORS=1``), where they fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIB_SOURCE = '''def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    


def main() -> None:
    for i in range(10):
        print(i, fibonacci(i))
'''
"""The file both editor tests edit; line 5 (``"    "``) is where they type."""
TYPE_AT = 5


def screenshot_dir() -> Path | None:
    """``DLM_SCREENSHOTS``: where the end-of-file tests also leave their ghost-text screenshots
    (``DLM_SCREENSHOTS=docs/images pytest tests/editors -k end_of_a_new`` renews the README's)."""
    folder = os.environ.get("DLM_SCREENSHOTS")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


def need(available: bool, what: str) -> None:
    """Skip (or, under ``DLM_REQUIRE_EDITORS=1``, fail) the calling test unless ``available``."""
    if available:
        return
    if os.environ.get("DLM_REQUIRE_EDITORS") == "1":
        pytest.fail(f"{what} (DLM_REQUIRE_EDITORS=1: real-editor tests must run)")
    pytest.skip(what)
