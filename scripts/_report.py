"""What the measuring scripts in ``scripts/`` share: the server's settings they measure with, and what they
do with their report (print it as JSON and, with ``--out``, keep it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dlm_lsp.settings import Settings, parse_settings


def measuring_settings(parser: argparse.ArgumentParser, raw: str) -> Settings:
    """The language server's settings with the gate off and no budget to cut a completion, then the
    ``--settings`` JSON ``raw`` on top; a problem in it is a usage error."""
    settings, problems = parse_settings({"minConfidence": 0, "latencyBudgetMs": 60000, **json.loads(raw)})
    if problems:
        parser.error("; ".join(problems))
    return settings


def emit(report: dict[str, Any], out: Path | None) -> int:
    """Print ``report`` (indented JSON) on stdout and write it to ``out`` when given; the exit status, 0."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0
