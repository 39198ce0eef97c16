"""``dlm-serve``: serve a model over Mercury's FIM API and llama.cpp's ``/infill`` (uvicorn).

    dlm-serve                                      # the shipped model on http://127.0.0.1:8012
    dlm-serve --model open-dcoder-0.5b --port 8012
    DLM_SERVE_API_KEYS=... dlm-serve --host 0.0.0.0   # beyond this machine: API keys required

Binds 127.0.0.1 unless ``--host`` says otherwise; beyond loopback it refuses to start
without API keys (``--api-key-file`` or ``DLM_SERVE_API_KEYS``). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from engine import SERVING_BACKENDS
from engine.scheduler import MAX_ROWS

log = logging.getLogger("dlm-serve")


def parser() -> argparse.ArgumentParser:
    """Arguments of ``dlm-serve``."""
    p = argparse.ArgumentParser(prog="dlm-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8012, help="port (default 8012, llama.vim's default endpoint)")
    p.add_argument("--model", default=None, help="catalog name or engine folder (default: the shipped model)")
    p.add_argument("--backend", default=None, choices=SERVING_BACKENDS, help="default: auto")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="latency budget of a request that sets none (default: the language server's, 150 ms)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="the confidence gate (default: the language server's; 0 returns every middle)")
    p.add_argument("--settings", default=None, metavar="JSON",
                   help='the language server\'s settings as a JSON object, e.g. \'{"tokenHealing": false}\' '
                        "(docs/server.md#settings; the flags above win)")
    p.add_argument("--max-batch-rows", type=int, default=MAX_ROWS, metavar="N",
                   help=f"concurrent requests' denoising steps run as one forward pass of at most N span rows "
                        f"(default {MAX_ROWS}); 0: each request on its own, two at a time")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="API keys, one per line (also DLM_SERVE_API_KEYS, comma-separated)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlm-serve``."""
    args = parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from dlm_lsp.http.app import create_app
        from dlm_lsp.http.service import Service, read_keys
    except ImportError as exc:
        print(f"dlm-serve: error: {exc.name} is missing: pip install -e '.[serve]' in your dlm-lsp clone", file=sys.stderr)
        return 2
    from dlm_lsp.settings import parse_settings
    from dlm_lsp.transport import is_loopback

    try:
        keys = read_keys(args.api_key_file)
    except (OSError, ValueError) as exc:
        print(f"dlm-serve: error: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not keys:
        print(f"dlm-serve: error: --host {args.host} serves beyond this machine: give API keys "
              "(--api-key-file or DLM_SERVE_API_KEYS)", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        log.warning("serving on %s beyond this machine: requests need an API key; the traffic is not encrypted "
                    "(put a TLS proxy in front)", args.host)
    try:
        raw = json.loads(args.settings) if args.settings else {}
    except ValueError as exc:
        print(f"dlm-serve: error: --settings is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(raw, dict):
        print("dlm-serve: error: --settings must be a JSON object", file=sys.stderr)
        return 2
    flags = {"model": args.model, "backend": args.backend, "latencyBudgetMs": args.budget_ms,
             "minConfidence": args.min_confidence}
    raw.update({key: value for key, value in flags.items() if value is not None})  # the flags win
    settings, problems = parse_settings(raw)
    if problems:
        print("dlm-serve: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    model = settings.model
    name = model if model and "/" not in model else (Path(model).name if model else "dlm-default")
    if args.max_batch_rows < 0:
        print("dlm-serve: error: --max-batch-rows must be 0 (no batching) or more", file=sys.stderr)
        return 2
    app = create_app(Service(settings, name, keys, max_batch_rows=args.max_batch_rows))
    # no limit_concurrency: idle connections would count against it and lock every client out; the
    # per-key limits bound the work, and beyond loopback a proxy with header timeouts belongs in front
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5,
                server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
