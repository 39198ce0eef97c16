"""The GPU runtimes' device side (engine.backends.device), run on the CPU: the rotation graph against the host
rotation, the copy plans, and the whole device denoiser (caches kept, selected, joined, rotated and stacked
in "device" memory) driving ONNX Runtime through I/O binding, against the ONNX Runtime denoiser's answers.
The CUDA runtime is replaced by tests/host_cuda.py (the same calls on host memory); TensorRT and the GPU
itself are scripts/gpu-check.sh's."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from engine import Engine, SamplingParams
from engine.backends import device as device_module
from engine.backends.device import index_runs, ort_device_denoiser, rotate_graph
from engine.manifest import read_manifest
from engine.tokenizer import Tokenizer
from host_cuda import HostCudaRuntime
from trt_shapes import TEXT

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_the_rotation_graph_rotates_keys_as_the_host_does(tiny_engine: Path):
    """The device-side rotation (a third engine) must equal the numpy rotation the ONNX Runtime path uses, at
    positions past fp16's integers too."""
    from engine.backends.onnxruntime import rotate_keys

    arch = read_manifest(tiny_engine).arch
    session = ort.InferenceSession(rotate_graph(arch).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for rows, entries in ((1, 0), (1, 7), (3, 40)):
        keys = rng.standard_normal((arch.num_layers, 1, arch.num_kv_heads, entries, arch.head_dim)).astype(np.float32)
        positions = np.sort(rng.choice(5000, size=(rows, entries)), axis=1).astype(np.int32)
        (got,) = session.run(None, {"keys": keys, "positions": positions})
        want = rotate_keys(keys, positions.astype(np.int64), arch.rope_theta)
        assert got.shape == want.shape == (arch.num_layers, rows, arch.num_kv_heads, entries, arch.head_dim)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_index_runs_select_the_entries_with_one_copy_per_run():
    rng = np.random.default_rng(4)
    src = rng.standard_normal((2, 1, 3, 50, 4))
    cases = [np.arange(50), np.arange(0), np.r_[0:10, 20:35, 36], rng.permutation(50)[:17],
             np.sort(rng.choice(50, 30, replace=False))]
    for index in cases:
        runs = index_runs(index)
        out = np.zeros(src.shape[:3] + (len(index),) + src.shape[4:])
        for start, at, count in runs:
            out[:, :, :, at : at + count] = src[:, :, :, start : start + count]
        assert np.array_equal(out, src[:, :, :, index])
        assert len(runs) == (0 if len(index) == 0 else 1 + int(np.sum(np.diff(index) != 1)))
    assert index_runs(np.r_[0:10, 20:35]) == [(0, 0, 10), (20, 10, 15)]


def test_device_copies_select_join_and_stack_cache_entries_as_numpy_indexing_does(monkeypatch):
    runtime = HostCudaRuntime()
    monkeypatch.setattr(device_module, "_cudart", lambda: runtime)
    device = device_module.Device(stream="the stream")
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 1, 2, 30, 4)).astype(np.float32)
    b = rng.standard_normal((3, 1, 2, 12, 4)).astype(np.float32)
    da, db = device.upload(a), device.upload(b)
    assert np.array_equal(device.download(da), a)
    index = np.r_[2:9, 15, 20:30]
    assert np.array_equal(device.download(device.gather_entries(da, index)), a[:, :, :, index])
    joined = device.concat_entries([device.gather_entries(da, index), db])
    assert np.array_equal(device.download(joined), np.concatenate([a[:, :, :, index], b], axis=3))
    # a merged step: two requests' rotated keys (2 and 1 rows) stacked and padded to the longer context
    k1 = rng.standard_normal((3, 2, 2, 30, 4)).astype(np.float32)
    k2 = rng.standard_normal((3, 1, 2, 12, 4)).astype(np.float32)
    merged = device.zeros((3, 3, 2, 30, 4))
    device.copy_entries(merged, (0, 2), 0, device.upload(k1), (0, 2), 0, 30)
    device.copy_entries(merged, (2, 3), 0, device.upload(k2), (0, 1), 0, 12)
    want = np.zeros((3, 3, 2, 30, 4), np.float32)
    want[:, 0:2] = k1
    want[:, 2:3, :, :12] = k2
    assert np.array_equal(device.download(merged), want)


@pytest.fixture()
def host_device(monkeypatch) -> HostCudaRuntime:
    runtime = HostCudaRuntime()
    monkeypatch.setattr(device_module, "_cudart", lambda: runtime)
    return runtime


def test_the_device_denoiser_answers_as_the_onnx_runtime_denoiser_does(tiny_engine: Path, host_device):
    """Typing with context reuse (priors selected, rotated and joined on the device), several candidates,
    healing, the cached span and merged steps of three documents: the same suggestions as the host path."""
    manifest = read_manifest(tiny_engine)
    on_device = Engine(ort_device_denoiser(tiny_engine, manifest, memory="cpu"),
                       Tokenizer(tiny_engine / manifest.tokenizer), tiny_engine)
    on_host = Engine.load(tiny_engine, backend="cpu")
    assert on_device.reuses_context and on_device.info.backend == "cpu"
    params = SamplingParams(lengths=(4, 8, 16))
    for k in range(5):  # typing: a full pass, then partial ones that reuse the kept context
        got = on_device.complete(TEXT[: 6000 + k], TEXT[6100:9000], params, reuse="doc", heal=True)
        want = on_host.complete(TEXT[: 6000 + k], TEXT[6100:9000], params, reuse="doc", heal=True)
        assert got.text == want.text and got.stats["context_computed"] == want.stats["context_computed"]
    assert got.stats["context_reused"] > 0  # the device path reused its kept context
    span = SamplingParams(lengths=(8, 32), cached_span=True, threshold=1.0, tokens_per_step=2)
    cached = on_device.complete(TEXT[:900], TEXT[900:1500], span)
    assert cached.text == on_host.complete(TEXT[:900], TEXT[900:1500], span).text and cached.stats["span_rows"] > 0
    on_device.batch_requests(max_rows=8)
    runner = on_device.denoiser.runners["span_step"]
    rows: list[int] = []
    plain_run = runner.run
    runner.run = lambda names, feed, *a, **k: rows.append(len(feed["span_ids"])) or plain_run(names, feed, *a, **k)
    gate, plain_encode = threading.Barrier(3), on_device.denoiser.encode_context

    def lined_up(*args, **kwargs):  # the three context passes wait for each other: their steps queue together
        gate.wait(timeout=60)
        return plain_encode(*args, **kwargs)

    on_device.denoiser.encode_context = lined_up
    merged = SamplingParams(lengths=(4, 8), threshold=1.0, tokens_per_step=1)
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, on_device.complete(TEXT[: 2000 * i], TEXT[2000 * i : 2000 * i + 500], merged).text)) for i in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in (1, 2, 3):  # merged on the device, answered as one at a time on the host
        assert results[i] == on_host.complete(TEXT[: 2000 * i], TEXT[2000 * i : 2000 * i + 500], merged).text
    assert max(rows) >= 3  # a request has at most 2 rows here: some steps ran two or three documents as one batch


def test_dropped_device_arrays_are_freed_at_the_next_operation(host_device):
    device = device_module.Device(stream="s")
    array = device.zeros((2, 1, 2, 8, 4))
    pointer = array.pointer
    del array
    assert pointer in host_device.blocks  # not freed from the dropping thread
    device.empty((1,))
    assert pointer not in host_device.blocks and host_device.freed == 1
