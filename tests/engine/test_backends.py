"""Backend selection: CPU here, clear errors for GPU backends that cannot run, wrong folder kinds."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Engine
from engine.backends.base import onnxruntime_providers
from engine.errors import BackendUnavailableError, CheckpointError, InputError

ort = pytest.importorskip("onnxruntime")
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_and_auto():
    assert onnxruntime_providers("cpu") == (["CPUExecutionProvider"], "cpu")
    providers, chosen = onnxruntime_providers("auto")
    assert chosen == ("cuda" if HAS_CUDA else "cpu")
    assert providers[-1] == "CPUExecutionProvider"


@pytest.mark.skipif(HAS_CUDA, reason="this machine has ONNX Runtime's CUDA provider")
@pytest.mark.parametrize("backend, provider", [("cuda", "CUDAExecutionProvider"), ("tensorrt-ep", "TensorrtExecutionProvider")])
def test_gpu_backends_name_what_is_missing(backend, provider):
    with pytest.raises(BackendUnavailableError, match=f"{provider}.*pip install -e '\\.\\[gpu\\]'"):
        onnxruntime_providers(backend)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has ONNX Runtime's CUDA provider")
def test_engine_load_with_gpu_backend_fails_cleanly(tiny_engine):
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt-ep'"):
        Engine.load(tiny_engine, backend="tensorrt-ep")


def test_cpu_sessions_run_a_small_model_on_one_sleeping_thread(tiny_engine):
    import os

    from engine.backends.onnxruntime import default_threads

    assert default_threads(256) == 1
    assert default_threads(4096) == default_threads() == len(os.sched_getaffinity(0))
    engine = Engine.load(tiny_engine, backend="cpu")
    assert engine.info.arch.hidden_size <= 512
    for session in engine.denoiser.sessions.values():
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    two = Engine.load(tiny_engine, backend="cpu", threads=2)
    assert all(s.get_session_options().intra_op_num_threads == 2 for s in two.denoiser.sessions.values())


def test_a_real_size_int8_model_keeps_one_prepacked_copy_of_its_weights(tiny_engine, monkeypatch):
    """The context session of a large int8 model runs on the stored weights (no private prepacked
    copy); its span step, and every session of a small or a float model, prepack as usual."""
    from dataclasses import replace

    from engine.backends.onnxruntime import unpacked_context
    from engine.manifest import read_manifest

    manifest = read_manifest(tiny_engine)
    large = replace(manifest, arch=replace(manifest.arch, hidden_size=896))
    assert unpacked_context(replace(large, precision="int8"), "cpu")
    assert not unpacked_context(replace(large, precision="int4"), "cpu")  # MatMulNBits needs its packing (10x)
    assert not unpacked_context(replace(large, precision="fp32"), "cpu")
    assert not unpacked_context(replace(large, precision="int8"), "cuda")
    assert not unpacked_context(replace(manifest, precision="int8"), "cpu")  # the small model's pass is short

    def entry(session):  # type: ignore[no-untyped-def]
        try:
            return session.get_session_options().get_session_config_entry("session.disable_prepacking")
        except RuntimeError:  # not set
            return None

    engine = Engine.load(tiny_engine, backend="cpu")
    assert [entry(s) for s in engine.denoiser.sessions.values()] == [None, None]
    monkeypatch.setattr("engine.backends.onnxruntime.unpacked_context", lambda manifest, backend: True)
    sessions = Engine.load(tiny_engine, backend="cpu").denoiser.sessions  # as a large int8 model loads
    assert entry(sessions["context"]) == "1" and entry(sessions["span_step"]) is None


def test_unknown_backend(tiny_engine):
    with pytest.raises(InputError, match="unknown backend 'metal'"):
        Engine.load(tiny_engine, backend="metal")


def test_checkpoint_folder_needs_conversion(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="dlm-convert"):
        Engine.load(tiny_checkpoint, backend="cpu")


def test_torch_backend_needs_a_checkpoint_folder(tiny_engine):
    pytest.importorskip("torch")
    with pytest.raises(InputError, match="checkpoint folder"):
        Engine.load(tiny_engine, backend="torch")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Engine.load(tmp_path / "nowhere")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with onnxruntime-gpu")
def test_cuda_backend_runs(tiny_engine):  # pragma: no cover - runs on GPU machines only
    engine = Engine.load(tiny_engine, backend="cuda")
    assert engine.info.backend == "cuda"
    assert engine.complete("def f(", ")").stats["steps"] >= 1


@pytest.mark.parametrize("lengths", [(12,), (4, 12)])
def test_the_context_pass_answers_the_first_step_as_a_span_step_would(tiny_engine, lengths):
    """ONNX Runtime, fp32: the context graph's span outputs equal the span step graph's on the
    fully masked longest span, whose cached keys the backend rotates in numpy."""
    from engine.sampler import Candidate, _Layout

    engine = Engine.load(tiny_engine, backend="cpu")
    tok = engine.info.token_ids
    rng = np.random.default_rng(0)
    layout = _Layout(rng.integers(5, 200, 30).tolist(), rng.integers(5, 200, 9).tolist(), lengths, shifted=True)
    cache, first = engine.denoiser.encode_context(*layout.context(tok.mask))
    rows = [
        Candidate(m, np.full(m, tok.mask), np.zeros(m, bool), np.zeros(m, np.float32), np.zeros(m, bool))
        for m in lengths
    ]
    out = engine.denoiser.step(cache, *layout.span_batch(rows))
    longest = len(lengths) - 1
    assert first.ids.shape == (1, max(lengths) + 1, engine.info.top_k)
    np.testing.assert_array_equal(first.ids[0], out.ids[longest])
    np.testing.assert_allclose(first.probs[0], out.probs[longest], atol=1e-5)
    np.testing.assert_allclose(first.entropy[0], out.entropy[longest], atol=1e-4)
    assert len(cache.rotated) == 1  # the layouts' keys were rotated once, and kept for the next steps
