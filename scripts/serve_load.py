"""Throughput and latency of ``dlm-serve`` against the number of concurrent clients (docs/serve.md).

    python scripts/serve_load.py --clients 1 2 4 8 16 --seconds 20 --out runs/serve_load.json
    python scripts/serve_load.py --url http://127.0.0.1:8012        # a server already running
    python scripts/serve_load.py --max-batch-rows 64 0              # batched vs one at a time, side by side

Each client sends Mercury FIM requests one after another, each with a context of its
own (so the type-through cache never answers), for ``--seconds`` per concurrency level.
Reports requests per second, p50/p95 latency, how many came back with text and how many
were refused (429: past the 8 requests a key, or an address without keys, may run at
once), per level. Without ``--url`` it starts ``dlm-serve`` (``--model``, the shipped model
by default; ``--settings`` passes the server's settings, e.g. a budget), once per
``--max-batch-rows`` value, the values interleaved level by level so that the machine's
load drifts over both alike. Each client uses an API key of its own, so that 16 clients
are not refused as one address past 8 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402

from _report import emit  # noqa: E402
from http_client import Serve  # noqa: E402

PROMPT = "def area(width, height):\n    # case {n}\n    return "
SUFFIX = "\n\n\nprint(area(2, 3))\n"


async def level(url: str, clients: int, seconds: float) -> dict[str, float]:
    """One concurrency level: ``clients`` loops for ``seconds``."""
    latencies: list[float] = []
    with_text = refused = 0
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, key: str) -> None:
        nonlocal with_text, refused
        while time.perf_counter() < deadline:
            n = next(counter)
            started = time.perf_counter()
            reply = await http.post(url + "/v1/fim/completions", headers={"Authorization": f"Bearer {key}"},
                                    json={"prompt": PROMPT.format(n=n), "suffix": SUFFIX, "max_tokens": 32})
            if reply.status_code == 429:  # past the per-key (or per-address) concurrency limit
                refused += 1
                await asyncio.sleep(0.01)
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            reply.raise_for_status()
            with_text += bool(reply.json()["choices"][0]["text"])

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http, f"load-client-key-{i:04d}") for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients, "requests": len(latencies), "per_second": round(len(latencies) / elapsed, 2),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(statistics.quantiles(latencies, n=20)[-1], 1) if len(latencies) > 1 else latencies[0],
        "with_text": with_text, "refused_429": refused,
    }


def main() -> int:
    """Run every level and print (and optionally write) the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--url")
    p.add_argument("--settings", default='{"minConfidence": 0}')
    p.add_argument("--model", help="catalog name or engine folder (default: the shipped model)")
    p.add_argument("--max-batch-rows", type=int, nargs="+", default=[64],
                   help="dlm-serve's --max-batch-rows, one server per value (0: no batching)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    keys = ",".join(f"load-client-key-{i:04d}" for i in range(max(args.clients)))
    servers: dict[int, Serve] = {}
    urls = {"url": args.url} if args.url else {}
    try:
        if not args.url:
            model = ["--model", args.model] if args.model else []
            for rows in args.max_batch_rows:  # all started (and loaded) first, then measured in turn
                servers[rows] = Serve("--settings", args.settings, "--max-batch-rows", str(rows), *model,
                                      env={"DLM_SERVE_API_KEYS": keys}, timeout=600)
                urls[f"max_batch_rows={rows}"] = servers[rows].url
        report: dict = {"settings": args.settings, "model": args.model or "shipped", "runs": {k: [] for k in urls}}
        for clients in args.clients:
            for name, url in urls.items():
                result = asyncio.run(level(url, clients, args.seconds))
                print(json.dumps({"server": name, **result}), file=sys.stderr)
                report["runs"][name].append(result)
        for name, url in urls.items():
            metrics = httpx.get(url + "/metrics").text
            report.setdefault("metrics", {})[name] = [
                line for line in metrics.splitlines()
                if line.startswith(("dlm_requests_total", "dlm_batch_requests_sum", "dlm_batch_requests_count"))
            ]
    finally:
        for server in servers.values():
            server.stop()
    return emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
