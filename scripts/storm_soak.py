"""Storm, soak and long-line measurements of the language server (issue 15; docs/reliability.md).

    python scripts/storm_soak.py --out runs/storm.json                 # storm 1,000 + soak 10,000 + long line
    python scripts/storm_soak.py --only longline --root /path/to/old  # the long-line figures of another checkout

Runs the real server over stdio with the shipped model and prints a JSON report:

* storm: 1,000 completions over 10 documents with random edits and cancellations, sent
  without waiting; every answer checked, documents compared, threads/tasks/pending counted;
* soak: 10,000 completions with random edits, one after another: latency p50/p95 and
  the server's RSS per thousand, growth from the first thousand to the last;
* notifications: the server's RSS before and after 10,000 keystrokes (a ``didChange``
  and a ``dlm/didAcceptCompletion`` each);
* longline: a document holding one 5 MB line; how long the server takes to answer a
  ``dlm/status`` sent right after a keystroke in that line, and right after a completion
  request in it (the event loop is blocked for that long), medians of 20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _report import emit  # noqa: E402 - after the path setup
from raw_lsp import StdioServer  # noqa: E402
from storm import rss_kb, soak, storm  # noqa: E402

SETTINGS = {"backend": "cpu", "debounceMs": 5, "minConfidence": 0, "latencyBudgetMs": 100}


def longline(server: StdioServer, repeats: int = 20) -> dict[str, float]:
    """Milliseconds until a status answer right after a keystroke / a completion on a 5 MB line."""
    uri = "file:///long/line.py"
    text = "data = '" + "a" * 5_000_000 + "'\n"
    server.open(uri, text)
    keystroke, completion = [], []
    for n in range(repeats):
        column = 2_500_000 + n
        started = time.perf_counter()
        server.change(uri, n + 2, [{"range": {"start": {"line": 0, "character": column},
                                              "end": {"line": 0, "character": column}}, "text": "b"}])
        server.request(f"k{n}", "dlm/status", {})
        keystroke.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        server.send({"jsonrpc": "2.0", "id": f"c{n}", "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": uri}, "position": {"line": 0, "character": column}, "context": {"triggerKind": 1}}})
        server.request(f"s{n}", "dlm/status", {})
        completion.append((time.perf_counter() - started) * 1000)
        server.reply(f"c{n}", timeout=120)
    return {"keystroke_then_status_ms": round(statistics.median(keystroke), 2),
            "completion_request_then_status_ms": round(statistics.median(completion), 2)}


def notifications(server: StdioServer, count: int = 10_000) -> dict[str, float]:
    """The server's RSS before and after ``count`` keystrokes (a didChange and a didAcceptCompletion each)."""
    uri = "file:///notify/doc.py"
    server.open(uri, "x = 1\n")
    server.status()
    time.sleep(0.5)
    before = rss_kb(server.proc.pid)
    for n in range(count):
        server.change(uri, n + 2, [{"range": {"start": {"line": 0, "character": 5}, "end": {"line": 0, "character": 5}},
                                    "text": "1"}])
        server.notify("dlm/didAcceptCompletion", {"acceptedLength": 1})
    server.status()
    time.sleep(0.5)
    after = rss_kb(server.proc.pid)
    return {"keystrokes": count, "rss_before_mb": round(before / 1024, 1), "rss_after_mb": round(after / 1024, 1),
            "bytes_per_keystroke": round((after - before) * 1024 / count)}


def main() -> int:
    """Run the chosen parts and print (and optionally write) the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["storm", "soak", "longline", "notifications"], action="append")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--completions", type=int, default=10_000)
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server runs (default: this one)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    parts = args.only or ["storm", "soak", "longline", "notifications"]
    report: dict[str, object] = {"root": str(args.root)}
    server = StdioServer(root=args.root)
    try:
        server.initialize(SETTINGS)
        assert server.wait_ready()["state"] == "ready"
        if "longline" in parts:
            report["longline"] = longline(server)
            print(json.dumps(report["longline"]), file=sys.stderr)
        if "notifications" in parts:
            report["notifications"] = notifications(server)
            print(json.dumps(report["notifications"]), file=sys.stderr)
        if "storm" in parts:
            report["storm"] = storm(server, requests=args.requests)
            print(json.dumps(report["storm"]), file=sys.stderr)
        if "soak" in parts:
            report["soak"] = soak(server, server.proc.pid, completions=args.completions)
    finally:
        code, _ = server.stop()
    report["exit_status"] = code
    return emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
