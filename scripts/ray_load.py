"""Throughput and latency of the Ray Serve application against its number of replicas (docs/serve.md, "Ray Serve").

    python scripts/ray_load.py --replicas 1 2 --clients 1 2 4 8 --seconds 15 --out runs/ray_load.json
    python scripts/ray_load.py --baseline          # also dlm-serve alone first, on the same machine, same moment
    python scripts/ray_load.py --replicas 2 --clients 0 --reuse-documents 8   # context reuse, with and without affinity

Starts a local Ray instance, deploys dlm_lsp/http/ray_serve.yaml as ``serve run`` does
(the shipped model, ``--settings`` as the application's settings, the autoscaler held at
each replica count in turn, HTTP on a free loopback port) and runs scripts/serve_load.py's
clients against Ray's HTTP proxy: per level, requests per second, p50/p95 latency, how many
came back with text and how many were refused. ``--reuse-documents`` then types in several
files at once, without and with ``X-Session-Id``, and reports the share of context tokens
the replicas reused (``dlm_context_tokens_total`` summed over the replicas). Ray is stopped
at the end, also on failure.
Every wait is bounded (``--ready-s``); the run takes about
``len(replicas) * len(clients) * seconds`` plus a minute per deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

import httpx  # noqa: E402
import yaml  # noqa: E402

from http_client import Serve, free_port  # noqa: E402
from _report import emit  # noqa: E402
from serve_load import level  # noqa: E402

CONFIG = ROOT / "dlm_lsp" / "http" / "ray_serve.yaml"


def config_for(replicas: int, port: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The shipped config with ``replicas`` replicas (its autoscaler held there), on ``port``, with ``settings``."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    app = config["applications"][0]
    app["args"]["settings"] = settings
    app["deployments"][0]["autoscaling_config"].update(min_replicas=replicas, max_replicas=replicas)
    return config


def wait_running(replicas: int, url: str, timeout: float) -> None:
    """Until ``replicas`` replicas run and the proxy answers ``/health`` (AssertionError past ``timeout``)."""
    from ray import serve
    from ray.serve.schema import ReplicaState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app = serve.status().applications.get("dlm")
        states = app.deployments["DlmServe"].replica_states if app and app.status == "RUNNING" else {}
        running = states.get(ReplicaState.RUNNING, 0)
        if running == replicas:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"{replicas} replica(s) were not running after {timeout:.0f} s: {serve.status()}")


def measure(url: str, clients: list[int], seconds: float) -> list[dict[str, float]]:
    """serve_load's levels against ``url``, each printed to stderr as it ends."""
    results = []
    for n in clients:
        result = asyncio.run(level(url, n, seconds))
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    return results


def replica_metrics(url: str, replicas: int, tries: int = 60) -> dict[str, dict[str, float]]:
    """``dlm_context_tokens_total`` of every replica: ``/metrics`` asked until each replica has answered
    (the proxy picks one per request; ``X-DLM-Replica`` says which)."""
    seen: dict[str, dict[str, float]] = {}
    for _ in range(tries):
        reply = httpx.get(url + "/metrics", timeout=30)
        found = re.findall(r'^dlm_context_tokens_total\{kind="(\w+)"\} ([0-9.e+]+)$', reply.text, re.M)
        seen[reply.headers["x-dlm-replica"]] = {kind: float(value) for kind, value in found}
        if len(seen) >= replicas:
            break
    return seen


def reuse(url: str, replicas: int, documents: int, steps: int, affinity: bool) -> dict[str, Any]:
    """Typing in ``documents`` files at once (round robin, one character a request, each file's hashed id
    as ``user`` as the language server's remote mode sends it, and as ``X-Session-Id`` with ``affinity``):
    the share of context tokens the replicas reused from the file's previous request."""
    code = (ROOT / "engine" / "data" / "validation_code.txt").read_text()
    before = replica_metrics(url, replicas)
    with httpx.Client(timeout=60) as http:
        for step in range(steps):
            for d in range(documents):
                start = 400 + 97 * d
                prefix, suffix = code[start:start + 1200 + step], code[start + 1200 + step:start + 1800]
                user = f"doc-{d:04d}"
                headers = {"X-Session-Id": user} if affinity else {}
                http.post(url + "/v1/fim/completions", headers=headers,
                          json={"prompt": prefix, "suffix": suffix, "max_tokens": 8, "user": user}).raise_for_status()
    after = replica_metrics(url, replicas)
    totals = {kind: sum(m.get(kind, 0) - before.get(r, {}).get(kind, 0) for r, m in after.items())
              for kind in ("reused", "computed")}
    share = totals["reused"] / max(1.0, totals["reused"] + totals["computed"])
    return {"affinity": affinity, "documents": documents, "steps": steps, **totals, "reused_share": round(share, 3)}


def main() -> int:
    """Measure dlm-serve (with ``--baseline``) and the Ray application at each replica count; print the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--settings", default='{"minConfidence": 0}')
    p.add_argument("--baseline", action="store_true", help="first measure dlm-serve alone with the same settings")
    p.add_argument("--reuse-documents", type=int, default=0,
                   help="then type in this many files at once, without and with X-Session-Id: context reuse")
    p.add_argument("--reuse-steps", type=int, default=20, help="characters typed per file")
    p.add_argument("--ready-s", type=float, default=300, help="bound on each wait for a deployment")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    settings = json.loads(args.settings)
    report: dict[str, Any] = {"settings": settings, "seconds": args.seconds, "cpus": os.cpu_count(), "runs": []}

    if args.baseline:
        server = Serve("--settings", args.settings)
        try:
            report["runs"].append({"server": "dlm-serve", "levels": measure(server.url, args.clients, args.seconds)})
        finally:
            server.stop()

    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    ray.init(address="local", num_cpus=max(max(args.replicas), os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = False
        for replicas in args.replicas:
            config = ServeDeploySchema.model_validate(config_for(replicas, port, settings))
            if not started:  # what `serve run CONFIG` does: Serve with the config's HTTP options, then the config
                serve.start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
                started = True
            client = _get_global_client()
            assert client is not None
            client.deploy_apps(config)
            wait_running(replicas, url, args.ready_s)
            run: dict[str, Any] = {"server": f"ray serve, {replicas} replica(s)",
                                   "levels": measure(url, args.clients, args.seconds) if args.clients[0] else []}
            if args.reuse_documents:
                run["reuse"] = [reuse(url, replicas, args.reuse_documents, args.reuse_steps, affinity)
                                for affinity in (False, True)]
                print(json.dumps(run["reuse"]), file=sys.stderr)
            report["runs"].append(run)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
