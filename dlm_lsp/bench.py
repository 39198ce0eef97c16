"""``dlm-bench``: how fast and how good completions are, at the engine and through the server.

Two levels, same items (:func:`engine.bench.load_items`):

* ``engine``: :func:`engine.bench.run_engine_bench` in this process: our decoder
  and the two baselines side by side (see that module).
* ``lsp``: the real thing: ``python -m dlm_lsp`` started as a subprocess, driven
  over stdio by pygls' language client with ``textDocument/inlineCompletion``
  requests, one open document per item. Reports round-trip latency percentiles,
  the share within the configured budget, exact match of the shown suggestion,
  the server's peak RSS (``VmHWM``) and the cold start: process start to the
  first completion (model loaded and warmed up).

Writes ``bench.json`` and ``bench.md`` to ``--out`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from engine import SERVING_BACKENDS, SamplingParams, UnmaskOrder
from engine.bench import Item, latency_and_quality, markdown
from engine.eval.harness import edit_similarity, exact_match
from engine.progress import progress

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0


def _position(text: str) -> tuple[int, int]:
    """LSP position (line, UTF-16 column) of the end of ``text``."""
    line = text.count("\n")
    last = text[text.rfind("\n") + 1 :]
    return line, len(last.encode("utf-16-le")) // 2


def _server_memory_mb(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, in MiB (Linux)."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["peak_rss_mb" if key == "VmHWM" else "rss_mb"] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


async def run_lsp_bench(
    items: Sequence[Item],
    model: str = "",
    backend: str = "auto",
    budget_ms: float = 150.0,
    language_id: str = "python",
    python: str = sys.executable,
    show_progress: bool = True,
    log_dir: Path | None = None,
    threshold: float = 0.9,
    tokens_per_step: int = 1,
) -> dict[str, Any]:
    """Start the server, measure cold start, then one invoked completion per item.

    The server logs (warnings and up) to ``log_dir/server.log`` (default: a new temporary folder).
    ``threshold`` and ``tokens_per_step`` become its ``confidenceThreshold`` and ``tokensPerStep`` settings.
    """
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    if not items:
        raise ValueError("no items to benchmark")
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="dlm-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    client = LanguageClient("dlm-bench", "1")
    spawned = time.perf_counter()
    # the server logs to a file: a pipe nobody reads would fill up and block it
    await client.start_io(python, "-m", "dlm_lsp", "--log-file", str(log_dir / "server.log"), "--log-level", "warning")
    pid = client._server.pid  # type: ignore[union-attr]
    options = {
        "dlm": {
            "model": model,
            "backend": backend,
            "latencyBudgetMs": budget_ms,
            "otherFiles": False,
            "confidenceThreshold": threshold,
            "tokensPerStep": tokens_per_step,
            "minConfidence": 0,  # score everything the model writes, like the engine level: the gate has its own measure
        }
    }
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(), initialization_options=options, process_id=None
        )
    )
    client.initialized(types.InitializedParams())
    status: dict[str, Any] = {}
    while time.perf_counter() - spawned < READY_TIMEOUT_S:
        status = _to_dict(await client.protocol.send_request_async("dlm/status", {}))
        if status.get("state") in ("ready", "error"):
            break
        await asyncio.sleep(0.01)
    if status.get("state") != "ready":
        await _close(client)
        raise RuntimeError(
            f"the server did not load the model {status.get('model')}: {status.get('error') or 'timed out'} "
            f"(log: {log_dir / 'server.log'})"
        )

    async def complete(n: int, item: Item) -> tuple[float, str]:
        uri = f"file:///dlm-bench/{n}.py"
        text = item.prefix + item.suffix
        client.text_document_did_open(
            types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id=language_id, version=1, text=text))
        )
        line, character = _position(item.prefix)
        t0 = time.perf_counter()
        result = await client.text_document_inline_completion_async(
            types.InlineCompletionParams(
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(line=line, character=character),
            )
        )
        latency = (time.perf_counter() - t0) * 1000
        client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(uri=uri)))
        found = result.items if isinstance(result, types.InlineCompletionList) else (result or [])
        text_out = found[0].insert_text if found else ""
        return latency, text_out if isinstance(text_out, str) else text_out.value

    await complete(-1, items[0])
    cold_start_ms = (time.perf_counter() - spawned) * 1000
    rows = []
    started = time.perf_counter()
    for n, item in enumerate(items):
        latency, text = await complete(n, item)
        rows.append(
            {
                "item": item.id,
                "source": item.source,
                "kind": item.kind,
                "latency_ms": round(latency, 2),
                "exact_match": exact_match(text, item.middle),
                "edit_sim": round(edit_similarity(text, item.middle), 4),
                "empty": not text.strip(),
                "within_budget": latency <= budget_ms,
            }
        )
        if show_progress:
            progress(n + 1, len(items), started, "lsp")
    memory = _server_memory_mb(pid)
    final_status = _to_dict(await client.protocol.send_request_async("dlm/status", {}))
    await _close(client)
    return {
        "rows": rows,
        "summary": summarize_lsp(rows),
        "cold_start_ms": round(cold_start_ms, 1),
        "server_load_ms": status.get("load_ms"),
        "server": memory,
        "server_status": final_status,
        "budget_ms": budget_ms,
    }


def _to_dict(value: Any) -> Any:
    """Plain JSON data from a pygls response (it turns JSON objects into namedtuples)."""
    if hasattr(value, "_asdict"):
        return {k: _to_dict(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {k: _to_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_dict(v) for v in value]
    return value


async def _close(client: Any) -> None:
    try:
        await asyncio.wait_for(client.shutdown_async(None), 10)
        client.exit(None)
    finally:
        await client.stop()


LSP_COLUMNS = (
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("max_ms", "max ms"),
    ("within_budget", "in budget"),
    ("exact_match", "EM"),
    ("edit_sim", "edit sim"),
    ("empty", "empty"),
)


def summarize_lsp(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latency percentiles, budget share and quality per kind of middle (and over all)."""
    out = []
    for kind in ("single", "multi", "all"):
        group = [r for r in rows if kind == "all" or r["kind"] == kind]
        if group:
            out.append({"kind": kind, **latency_and_quality(group)})
    return out


def combine_lsp_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several LSP-level runs (a fresh server each) as one report: rows pooled, each run's spread kept.

    The table is over every request of every run; ``runs`` keeps each run's p50 /
    p95 over all its requests, its share within budget and its cold start, so the
    run-to-run spread of a noisy machine is visible. Cold start and the server's
    model load + warm-up are medians of the runs, peak RSS the largest.
    """
    rows = [{**row, "run": n} for n, run in enumerate(runs) for row in run["rows"]]
    per_run = []
    for run in runs:
        overall = next(e for e in run["summary"] if e["kind"] == "all")
        per_run.append(
            {k: overall[k] for k in ("p50_ms", "p95_ms", "within_budget")}
            | {"cold_start_ms": run["cold_start_ms"], "server_load_ms": run.get("server_load_ms")}
        )
    loads = [run["server_load_ms"] for run in per_run if run["server_load_ms"] is not None]
    peaks = [run.get("server", {}).get("peak_rss_mb") for run in runs]
    return {
        **runs[0],
        "rows": rows,
        "summary": summarize_lsp(rows),
        "cold_start_ms": round(statistics.median(run["cold_start_ms"] for run in runs), 1),
        "server_load_ms": round(statistics.median(loads), 1) if loads else None,
        "server": {"peak_rss_mb": max((p for p in peaks if p is not None), default=None)},
        "runs": per_run,
    }


def lsp_markdown(report: dict[str, Any]) -> str:
    """The LSP-level table plus cold start and memory lines (and the per-run spread of several runs)."""
    lines = [markdown(report["summary"], keys=("kind",), columns=LSP_COLUMNS).rstrip("\n")]
    server = report.get("server", {})
    runs = report.get("runs", [])
    lines.append("")
    lines.append(
        f"Cold start (process start to first completion{', medians of the runs' if runs else ''}): "
        f"{report['cold_start_ms']:.0f} ms (model load + warm-up {report.get('server_load_ms')} ms); server peak RSS "
        f"{server.get('peak_rss_mb', '?')} MiB; budget {report['budget_ms']:.0f} ms."
    )
    if runs:
        lines.append("")
        lines.append(
            f"{len(runs)} runs, a fresh server each; per run over all requests: p50 "
            + ", ".join(f"{r['p50_ms']:.0f}" for r in runs)
            + " ms; p95 "
            + ", ".join(f"{r['p95_ms']:.0f}" for r in runs)
            + " ms; in budget "
            + ", ".join(f"{100 * r['within_budget']:.1f} %" for r in runs)
            + "."
        )
    return "\n".join(lines) + "\n"


def hardware() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def parser() -> argparse.ArgumentParser:
    """Arguments of ``dlm-bench``."""
    p = argparse.ArgumentParser(
        prog="dlm-bench",
        description="Latency, tokens per forward pass and quality of inline completions, against two baselines.",
    )
    p.add_argument("--model", default="", help="catalog name or engine folder (default: the shipped model)")
    p.add_argument("--backend", default="auto", choices=SERVING_BACKENDS)
    p.add_argument("--heldout", type=Path, help="held-out corpus split (heldout.jsonl from dlm-corpus)")
    p.add_argument("--problems", type=Path, action="append", default=[], help="HumanEval-infilling .jsonl(.gz); repeatable")
    p.add_argument("--kinds", default="single,multi", help="middles to bench: single, multi or both (comma-separated)")
    p.add_argument("--count", type=int, default=50, help="items per source and kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contexts", default="256,1024,2048", help="context sizes in tokens (those over the model window are skipped)")
    p.add_argument("--budget-ms", type=float, default=150.0, help="latency budget of our decoder and the server")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of our decoder (and the server's)")
    p.add_argument("--tokens-per-step", type=int, default=1, help="minimum commits per step of our decoder (and the server's)")
    p.add_argument(
        "--order", default="confidence", choices=[o.value for o in UnmaskOrder], help="unmask order of our decoder (engine level only)"
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads per op, engine level only (default: the engine's choice; the server always uses it)",
    )
    p.add_argument("--reference-tokens-per-step", type=int, default=1, help="fixed commits per step of the reference sampler")
    p.add_argument("--level", choices=("engine", "lsp", "both"), default="both")
    p.add_argument(
        "--lsp-runs", type=int, default=1,
        help="LSP-level runs, a fresh server each: the table pools them, the spread per run is listed",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json and bench.md")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlm-bench``."""
    from dlm_lsp.model_host import model_path
    from engine import Engine, EngineError
    from engine.bench import load_items, run_engine_bench

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not set(kinds) <= {"single", "multi"}:
        print(f"dlm-bench: error: --kinds takes single and/or multi, got {args.kinds!r}", file=sys.stderr)
        return 2
    if args.lsp_runs < 1:
        print(f"dlm-bench: error: --lsp-runs must be at least 1, got {args.lsp_runs}", file=sys.stderr)
        return 2
    if args.heldout is None and not args.problems:
        print("dlm-bench: error: give items with --heldout FILE and/or --problems FILE", file=sys.stderr)
        return 2
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        items = load_items(args.heldout, args.problems, kinds, args.count, args.seed)
        model = str(model_path(args.model))  # a folder or a pulled catalog model; default: the shipped one
        report: dict[str, Any] = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "hardware": hardware(),
            "model": model,
            "items": {"count": len(items), "sources": sorted({i.source for i in items}), "kinds": kinds},
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "problems", "heldout")},
        }
        sections = [f"# dlm-bench {report['date']}\n\n{report['hardware']['cpu']}, {report['hardware']['cores']} cores; model {model}\n"]
        if args.level in ("engine", "both"):
            engine = Engine.load(model, backend=args.backend, threads=args.threads)
            report["backend"] = engine.info.backend
            dlm = SamplingParams(threshold=args.threshold, tokens_per_step=args.tokens_per_step, order=UnmaskOrder(args.order))
            report["engine"] = run_engine_bench(
                engine, items, contexts, dlm, args.budget_ms, args.reference_tokens_per_step,
                show_progress=not args.no_progress,
            )
            skipped = "".join(f"\nSkipped context {s['context']}: {s['reason']}." for s in report["engine"]["skipped"])
            sections.append(f"## Engine\n\n{markdown(report['engine']['summary'])}{skipped}\n")
            del engine
        if args.level in ("lsp", "both"):
            runs = [
                asyncio.run(
                    run_lsp_bench(
                        items, model, args.backend, args.budget_ms, show_progress=not args.no_progress, log_dir=args.out,
                        threshold=args.threshold, tokens_per_step=args.tokens_per_step,
                    )
                )
                for _ in range(args.lsp_runs)
            ]
            report["lsp"] = runs[0] if len(runs) == 1 else combine_lsp_runs(runs)
            sections.append(f"## Language server (inlineCompletion over stdio)\n\n{lsp_markdown(report['lsp'])}")
    except (EngineError, RuntimeError, OSError) as exc:
        print(f"dlm-bench: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = "\n".join(sections)
    (args.out / "bench.md").write_text(text, encoding="utf-8")
    print(text)
    return 0

