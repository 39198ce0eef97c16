"""What latency to expect from a model on this CPU, before downloading it: a short probe, cached.

``dlm-lsp models list`` shows, for each catalog model, the single-line latency
this machine would give at int8. It cannot run a model it does not have, so it
measures the two things an int8 forward pass is bound by, with ONNX Runtime's
own int8 matrix multiply (``MatMulInteger``, what dynamic quantisation emits),
on the threads the engine would use:

* **throughput** (operations/s) of a (512 x 2048) x (2048 x 2048) product: the
  context pass, which multiplies every window position by every weight;
* **weight streaming** (bytes/s) of a (1 x 4096) x (4096 x 16384) product over
  a 64 MB matrix: a span step, which touches every weight for a few positions.

:func:`expected_ms` turns them into a completion time with two efficiency
factors measured once for our engine against this probe on our 2-core machine
(the 0.5B shape's real context pass and span step, ``scripts/measure_latency.py``):
an estimate to choose a model by, not a benchmark. The result is cached in
``<cache>/probe.json`` per CPU model and thread count; ``refresh`` measures again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.reuse import ReusePolicy

log = logging.getLogger(__name__)

CONTEXT_EFFICIENCY = 1.38
"""Our context pass's time / the probe's estimate: 4,516 ms measured / 3,280 ms estimated at the 0.5B
shape, 1,024-token window (2026-12-01, our 2-core machine, nothing else running)."""
STEP_EFFICIENCY = 3.95
"""Our span step's time / the probe's estimate: 127 ms measured / 32 ms estimated, same run. A span step
is far from weight-streaming speed (per-layer overheads, attention over the cache, sampler work): the
CPU speed issue's ground."""
WINDOW = 1024
"""Context tokens of the estimate (the server's default window is about this)."""
SINGLE_LINE_STEPS = 3
"""Span steps of a single-line middle at 3 tokens per step (10 tokens; the first step comes with the context pass)."""
SINGLE_LINE_TOKENS = 10
"""Slots of a single-line middle: rows of the context pass besides the window's tokens."""


def available_memory() -> int | None:
    """Memory this machine can give a new job now, in bytes: ``MemAvailable`` of /proc/meminfo on Linux,
    elsewhere the physical memory (``sysconf``), None when neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _matmul_session(k: int, n: int, threads: int) -> Any:
    """An ONNX Runtime session of ``uint8 (M, k) x int8 (k, n)`` with the weight a constant."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).integers(-127, 128, (k, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def _best_seconds(session: Any, a: np.ndarray, repeats: int) -> float:
    session.run(None, {"a": a})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {"a": a})
        best = min(best, time.perf_counter() - t0)
    return best


def measure() -> dict[str, Any]:
    """Run the probe (a second or two) and return its figures."""
    threads = _threads()
    compute = _matmul_session(2048, 2048, threads)
    a = np.full((512, 2048), 3, dtype=np.uint8)
    ops = 2 * 512 * 2048 * 2048 / _best_seconds(compute, a, 5)
    stream = _matmul_session(4096, 16384, threads)
    bandwidth = 4096 * 16384 / _best_seconds(stream, np.full((1, 4096), 3, dtype=np.uint8), 10)
    return {
        "cpu": _cpu_name(),
        "threads": threads,
        "int8_ops_per_s": ops,
        "int8_weight_bytes_per_s": bandwidth,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def probe(cache_file: Path, refresh: bool = False) -> dict[str, Any] | None:
    """The cached probe for this CPU and thread count (measured now if absent or ``refresh``).

    None when ONNX's Python package (the ``export`` extra) is missing: the probe
    builds its graphs with it.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        return None
    key = {"cpu": _cpu_name(), "threads": _threads()}
    if cache_file.is_file() and not refresh:
        try:
            cached = json.loads(cache_file.read_text(encoding="utf-8"))
            if {k: cached.get(k) for k in key} == key:
                return dict(cached)
        except (OSError, ValueError):
            pass
    result = measure()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning("cannot cache the CPU probe in %s: %s", cache_file, exc)
    return result


def expected_ms(parameters: int, vocab_size: int, hidden_size: int, tied: bool, figures: dict[str, Any]) -> dict[str, float]:
    """Expected int8 context pass, span step and single-line completion (ms) of a model on the probed CPU:
    a file's first request (``single_line_ms``: the whole window encoded) and a keystroke after it
    (``follow_up_ms``: the context pass computes what :mod:`engine.reuse` recomputes while the user types)."""
    emb = vocab_size * hidden_size
    blocks = parameters - emb - (0 if tied else emb)
    context = 2 * blocks * WINDOW / figures["int8_ops_per_s"] * 1000 * CONTEXT_EFFICIENCY
    step = (blocks + emb) / figures["int8_weight_bytes_per_s"] * 1000 * STEP_EFFICIENCY
    partial = context * (ReusePolicy().keystroke_tokens(WINDOW) + SINGLE_LINE_TOKENS) / WINDOW
    return {"context_ms": context, "step_ms": step, "single_line_ms": context + SINGLE_LINE_STEPS * step,
            "follow_up_ms": partial + SINGLE_LINE_STEPS * step}
