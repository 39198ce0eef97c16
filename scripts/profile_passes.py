"""Where a span step's and a context pass's time goes, per ONNX Runtime operator type (docs/benchmark.md).

    python scripts/profile_passes.py runs/b05/engine-int8s --window 1024 --rows 11 --context-rows 160

Opens the folder's two graphs with the engine's CPU session options and ONNX Runtime's profiler on,
encodes a random ``--window``-token context, then times (median of ``--repeats``) and profiles a span
step of ``--rows`` rows against it and a context pass of ``--context-rows`` new tokens against the
rest as prior (what a keystroke's partial pass is), and prints each one's kernel time by operator
type, largest first.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engine.backends.onnxruntime import OnnxRuntimeDenoiser, default_threads, rotate_keys  # noqa: E402
from engine.manifest import read_manifest  # noqa: E402


def session(folder: Path, graph: str, threads: int, unpacked: bool, prefix: str) -> object:
    """An ONNX Runtime session as the engine opens it, with the profiler on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if unpacked:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_profiling, options.profile_file_prefix = True, prefix
    return ort.InferenceSession(str(folder / graph), options, providers=["CPUExecutionProvider"])


def timed(run: object, feed: dict, repeats: int) -> float:
    """Median milliseconds of ``run(None, feed)`` after two warm-up runs."""
    for _ in range(2):
        run(None, feed)  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(None, feed)  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def by_operator(profile: str, runs: int) -> list[tuple[str, float, int]]:
    """(operator type, kernel ms per run, nodes per run), largest first."""
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(profile).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            total[op] += event["dur"]
            count[op] += 1
    return [(op, us / runs / 1000, count[op] // runs) for op, us in total.most_common()]


def main() -> int:
    """Profile both passes and print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="engine folder (format 3)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--rows", type=int, default=11, help="span rows of the profiled span step")
    p.add_argument("--context-rows", type=int, default=160, help="new tokens of the profiled context pass")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    manifest = read_manifest(args.model)
    arch, threads = manifest.arch, default_threads(manifest.arch.hidden_size)
    denoiser = OnnxRuntimeDenoiser(args.model, manifest, backend="cpu")
    rng = np.random.default_rng(0)
    window, rows, fresh = args.window, args.rows, args.context_rows
    ids = rng.integers(0, min(arch.vocab_size, 30000), window)
    cache, _ = denoiser.encode_context(ids, np.arange(window), np.arange(window - rows), np.arange(window - rows, window))
    theta, out = arch.rope_theta, tempfile.mkdtemp(prefix="profile_passes.")
    span = session(args.model, manifest.graphs["span_step"], threads, False, f"{out}/span")
    span_feed = {
        "span_ids": rng.integers(0, 30000, (1, rows)), "span_pos": np.arange(window - rows, window)[None],
        "span_valid": np.ones((1, rows), bool), "cache_keys": rotate_keys(cache.keys, np.arange(window - rows)[None], theta),
        "cache_values": cache.values, "cache_valid": np.ones((1, window - rows), bool),
    }
    context = session(args.model, manifest.graphs["context"], threads, arch.hidden_size > 512, f"{out}/context")
    prior = window - fresh
    context_feed = {
        "input_ids": rng.integers(0, 30000, (1, fresh)), "position_ids": (prior + np.arange(fresh))[None],
        "cache_index": np.arange(fresh - rows), "span_index": np.arange(fresh - rows, fresh),
        "prior_keys": rotate_keys(cache.keys[:, :, :, :prior], np.arange(prior)[None], theta),
        "prior_values": np.ascontiguousarray(cache.values[:, :, :, :prior]),
    }
    for name, sess, feed in ((f"span step, {rows} rows against {window - rows}", span, span_feed),
                             (f"context pass, {fresh} tokens against {prior}", context, context_feed)):
        median = timed(sess.run, feed, args.repeats)  # type: ignore[attr-defined]
        table = by_operator(sess.end_profiling(), args.repeats + 2)  # type: ignore[attr-defined]
        print(f"\n{name}: {median:.1f} ms median, {sum(t for _, t, _ in table):.1f} ms of kernels per run")
        for op, ms, nodes in table[: args.top]:
            print(f"  {op:30s} {ms:8.2f} ms  {nodes:5d} nodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
