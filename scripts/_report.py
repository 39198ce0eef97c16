"""What every measuring script in ``scripts/`` does with its report: print it as JSON and, with ``--out``, keep it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], out: Path | None) -> int:
    """Print ``report`` (indented JSON) on stdout and write it to ``out`` when given; the exit status, 0."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0
