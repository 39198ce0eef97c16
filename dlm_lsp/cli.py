"""``dlm-lsp``: run the language server, or check a completion from the command line.

    dlm-lsp                       # serve over stdio (what editors launch)
    dlm-lsp --tcp --port 2087     # serve over TCP on 127.0.0.1 (clients send the token file's token)
    dlm-lsp check [FILE[:LINE:COL]] [--model DIR] [--backend cpu]
    dlm-lsp evaluate PATH [--kind single|multi] [--count N]   # suggestions measured on your code
    dlm-lsp models list | pull NAME | path NAME | remove NAME  # the model catalog

Logs go to stderr or ``--log-file``; stdout belongs to the LSP channel.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from dlm_lsp import __version__
from dlm_lsp.syntax import EXTENSIONS
from engine import SERVING_BACKENDS

SAMPLE = '''def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return <CURSOR>


def main() -> None:
    for i in range(10):
        print(i, fibonacci(i))
'''
CURSOR = "<CURSOR>"


PAYLOAD_LOGGERS = ("pygls.protocol.json_rpc", "pygls.protocol.language_server", "pygls.feature_manager")
"""pygls logs every message it sends and receives, documents' text included, at INFO (and each feature it
registers, once per session): only at DEBUG here."""


def _setup_logging(level: str, log_file: Path | None) -> None:
    """Logs to ``log_file`` or stderr (never stdout: the LSP channel), WARNING unless asked."""
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in PAYLOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else max(logging.WARNING, root.level))


def parser() -> argparse.ArgumentParser:
    """Arguments of ``dlm-lsp``."""
    p = argparse.ArgumentParser(prog="dlm-lsp", description="Inline code completion from a masked diffusion model.")
    p.add_argument("--version", action="version", version=f"dlm-lsp {__version__}")
    p.add_argument("--tcp", action="store_true", help="serve over TCP instead of stdio")
    p.add_argument("--host", default="127.0.0.1", help="TCP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=2087, help="TCP port (default: 2087)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="TCP: the file holding the token clients send as initializationOptions.authToken "
                        "(created, mode 0600, when missing; default: in the user's runtime folder)")
    p.add_argument("--log-file", type=Path, default=None, help="log here instead of stderr")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="warning (default): problems only; info: model loads and requests; debug: everything, messages included")
    sub = p.add_subparsers(dest="command")
    check = sub.add_parser("check", help="load the model and complete once, through the server's code path")
    check.add_argument("target", nargs="?", help="FILE or FILE:LINE:COL (1-based; default: end of file). Default: a built-in sample")
    check.add_argument("--model", default="", help="catalog name or engine folder (default: the shipped model)")
    check.add_argument("--backend", default="auto", choices=SERVING_BACKENDS)
    check.add_argument("--budget-ms", type=float, default=None, help="latency budget (default: the setting's default)")
    check.add_argument("--language", default=None, help="language id (default: from the file extension)")
    check.add_argument("--min-confidence", type=float, default=None,
                       help="the gate's threshold (default: the setting's default; 0 shows every suggestion)")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    from dlm_lsp.evaluate import add_arguments

    add_arguments(sub.add_parser("evaluate", help="measure suggestions on middles cut from a local source tree"))
    from dlm_lsp import models

    models.add_arguments(sub.add_parser("models", help="the model catalog: list, pull, path, remove"))
    return p




def _target(spec: str | None) -> tuple[str, int, str, str]:
    """(text, offset, language, label) of the check target."""
    if spec is None:
        offset = SAMPLE.index(CURSOR)
        return SAMPLE.replace(CURSOR, ""), offset, "python", "built-in sample"
    path, position = spec, None
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        path, position = parts[0], (int(parts[1]), int(parts[2]))
    file = Path(path)
    text = file.read_text(encoding="utf-8")
    if position is None:
        offset = len(text)
    else:
        line, col = position
        lines = text.split("\n")
        if not 1 <= line <= len(lines) or not 1 <= col <= len(lines[line - 1]) + 1:
            raise ValueError(f"{spec}: position outside the file ({len(lines)} lines)")
        offset = sum(len(x) + 1 for x in lines[: line - 1]) + col - 1
    return text, offset, EXTENSIONS.get(file.suffix, "plaintext"), str(file)


def check(args: argparse.Namespace) -> int:
    """``dlm-lsp check``: what a newcomer runs first."""
    from dataclasses import replace

    from dlm_lsp.completion import complete_text
    from dlm_lsp.gate import HIDDEN
    from dlm_lsp.model_host import ModelHost
    from dlm_lsp.settings import Settings

    try:
        if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
            raise ValueError(f"--min-confidence must be in [0, 1], got {args.min_confidence:g}")
        text, offset, language, label = _target(args.target)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print(f"dlm-lsp check: error: {exc}", file=sys.stderr)
        return 2
    settings = Settings(model=args.model, backend=args.backend)
    if args.budget_ms is not None:
        settings = replace(settings, latency_budget_ms=args.budget_ms)
    if args.min_confidence is not None:
        settings = replace(settings, min_confidence=args.min_confidence)
    language = args.language or language
    host = ModelHost()
    started = time.perf_counter()
    engine = host.load_now(settings.model, settings.backend, settings.threads)
    if engine is None:
        print(f"dlm-lsp check: error: {host.error}", file=sys.stderr)
        return 2
    result = complete_text(engine, text, offset, language, settings)
    info = engine.info
    report = {
        "target": label,
        "model": str(host.path),
        "family": info.family,
        "backend": info.backend,
        "device": info.device,
        "precision": info.precision,
        "load_ms": round(host.load_ms or 0, 1),
        "cold_start_ms": round((time.perf_counter() - started) * 1000, 1),
        "latency_ms": round(result.latency_ms, 1),
        "budget_ms": settings.latency_budget_ms,
        "cut_by_budget": result.cut,
        "completion": result.suggestion.text if result.suggestion else "",
        "gate": result.verdict,
        "ungated_completion": result.ungated.text if result.ungated else "",
        "raw_engine_text": result.raw_text,
        "steps": result.engine_stats.get("steps"),
        "tokens_per_step": round(result.engine_stats.get("tokens_per_step", 0.0), 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    line_start = text.rfind("\n", 0, offset) + 1
    print(f"model:    {report['model']} ({info.family}, {info.precision})")
    print(f"backend:  {info.backend} on {info.device}")
    print(f"latency:  {report['latency_ms']} ms (budget {settings.latency_budget_ms:g} ms"
          f"{', cut' if result.cut else ''}); model load {report['load_ms']} ms")
    print(f"at:       {label}")
    print("context:  " + text[line_start:offset] + "\u2502")
    print("completion:")
    if report["completion"]:
        print(report["completion"])
        if result.verdict == "cut":
            print(f"(the confident part of: {report['ungated_completion']!r})")
    elif result.source == "gated":
        print(f"(none shown: the gate hid {report['ungated_completion']!r} ({HIDDEN[result.verdict]});"
              f" --min-confidence 0 shows everything)")
    else:
        print("(no suggestion)")
    if result.cut and not report["completion"]:
        print(f"note:     the {report['budget_ms']:.0f} ms budget ended it before anything was written: a real-size "
              "model on a CPU needs seconds today (--budget-ms here, latencyBudgetMs in the editor; docs/models.md)")
    if not args.model:
        print("note:     the shipped model is a small demo: its suggestions are rarely right (see the README)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlm-lsp`` and ``python -m dlm_lsp``."""
    args = parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_file)
    if args.command == "check":
        return check(args)
    if args.command == "evaluate":
        from dlm_lsp.evaluate import run

        return run(args)
    if args.command == "models":
        from dlm_lsp import models

        return models.run(args)
    from dlm_lsp.server import create_server
    from dlm_lsp.transport import serve_stdio

    if args.tcp:
        return _serve_tcp(args)
    return serve_stdio(create_server())


def _serve_tcp(args: argparse.Namespace) -> int:
    """``dlm-lsp --tcp``: a session per connection, each authenticated with the token file's token."""
    import asyncio

    from dlm_lsp.server import create_server
    from dlm_lsp.transport import default_token_file, load_token, serve_tcp

    token_file = args.token_file or default_token_file()
    try:
        token = load_token(token_file)
    except (OSError, ValueError) as exc:
        print(f"dlm-lsp: error: {exc}", file=sys.stderr)
        return 2
    print(f"dlm-lsp: clients must send initializationOptions.authToken, the token in {token_file}", file=sys.stderr)
    try:
        asyncio.run(serve_tcp(create_server, args.host, args.port, token))
    except OSError as exc:
        print(f"dlm-lsp: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
