"""Graphs traced without weights and bound to a checkpoint one tensor at a time (engine.binding),
and conversion of a model larger than the memory it is given."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from engine import binding, export  # noqa: E402
from engine.backends.torch_ref import TorchDenoiser  # noqa: E402
from engine.checkpoint import Checkpoint, expected_shapes  # noqa: E402
from engine.errors import ExportError  # noqa: E402
from engine.tiny import write_random_checkpoint  # noqa: E402
from engine.weights import QUANTIZED, quantize  # noqa: E402

SHAPES = {  # the family traits the graphs must carry: tied/untied head, q/k/v bias, q/k norm, GQA/MHA
    "dream-tied-gqa": dict(family="dream", num_heads=4, num_kv_heads=2),
    "llada-untied-mha": dict(family="llada", num_heads=4, num_kv_heads=4, tie_word_embeddings=False),
    "qwen3-qknorm": dict(family="qwen3", num_heads=4, num_kv_heads=2, head_dim=24, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    return write_random_checkpoint(tmp_path_factory.mktemp("bind") / request.param, seed=5, **SHAPES[request.param])


def _feeds(arch, rng):  # type: ignore[no-untyped-def]
    cache = (arch.num_layers, 1, arch.num_kv_heads, 4, arch.head_dim)
    return {
        "context.onnx": {
            "input_ids": rng.integers(0, arch.vocab_size, (1, 16)), "position_ids": np.arange(4, 20)[None],
            "cache_index": np.arange(10), "span_index": np.arange(9, 16),
            "prior_keys": rng.standard_normal(cache).astype(np.float32),
            "prior_values": rng.standard_normal(cache).astype(np.float32),
        },
        "span_step.onnx": {
            "span_ids": rng.integers(0, arch.vocab_size, (2, 6)), "span_pos": np.tile(np.arange(20, 26), (2, 1)),
            "span_valid": np.ones((2, 6), bool),
            "cache_keys": rng.standard_normal((arch.num_layers, 2, arch.num_kv_heads, 20, arch.head_dim)).astype(np.float32),
            "cache_values": rng.standard_normal((arch.num_layers, 1, arch.num_kv_heads, 20, arch.head_dim)).astype(np.float32),
            "cache_valid": np.arange(20)[None] < np.array([[20], [13]]),
        },
    }


def test_bound_graphs_compute_exactly_what_the_exporter_writes_with_the_weights(checkpoint, tmp_path):
    """The independent way: torch's exporter given the loaded model, its weights and its constant folding.
    The bound graphs (traced on phantom parameters, weights read one at a time) must answer bit for bit alike."""
    import onnxruntime as ort

    ckpt = Checkpoint.open(checkpoint)
    reference = TorchDenoiser(ckpt)
    bound, traced = tmp_path / "bound", tmp_path / "traced"
    bound.mkdir(), traced.mkdir()
    skeletons = binding.trace_skeletons(ckpt.arch, reference.suppress, 2, tmp_path)
    binding.bind(skeletons, ckpt.arch, ckpt.read_tensor, expected_shapes(ckpt.arch), bound, "fp32", inline_limit=0)
    assert sorted(p.name for p in bound.iterdir()) == ["context.onnx", "span_step.onnx", "weights.data"]
    for precision in QUANTIZED:  # quantised as read: what quantising the exporter's float32 graph gives
        (tmp_path / precision).mkdir()
        binding.bind(skeletons, ckpt.arch, ckpt.read_tensor, expected_shapes(ckpt.arch), tmp_path / precision, precision)
    modules = dict(zip(binding.GRAPHS, binding.graph_modules(reference.model, reference.suppress, 2)))
    run = lambda path, feeds: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    for name, module in modules.items():
        binding.export_graph(name, module, ckpt.arch, traced / name, with_weights=True)  # the loaded model, weights and all
        feeds = _feeds(ckpt.arch, np.random.default_rng(1))[name]
        got, want = run(bound / name, feeds), run(traced / name, feeds)
        assert len(got) == len(want) == len(skeletons[name].graph.output)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), name
        for precision in QUANTIZED:
            quantize(traced / name, traced / f"{precision}-{name}", 1 << 30, precision)
            got, want = run(tmp_path / precision / name, feeds), run(traced / f"{precision}-{name}", feeds)
            assert all(np.array_equal(a, b) for a, b in zip(got, want)), (precision, name)


def test_streamed_reference_answers_as_the_loaded_model(checkpoint):
    ckpt = Checkpoint.open(checkpoint)
    loaded, streamed = TorchDenoiser(ckpt), TorchDenoiser(ckpt, streamed=True)
    assert not any(p.device.type == "cpu" for p in streamed.model.parameters())  # it holds no weights
    for case in export.validation_cases(ckpt.arch, 3):
        context = (case["input_ids"], case["positions"], case["cache_index"], case["span_index"])
        (cache_a, first_a), (cache_b, first_b) = loaded.encode_context(*context), streamed.encode_context(*context)
        assert torch.equal(cache_a.keys, cache_b.keys) and torch.equal(cache_a.values, cache_b.values)
        step = (case["span_ids"], case["span_pos"], case["span_valid"], case["cache_pos"])
        for a, b in ((first_a, first_b), (loaded.step(cache_a, *step), streamed.step(cache_b, *step))):
            assert np.array_equal(a.ids, b.ids) and np.array_equal(a.probs, b.probs) and np.array_equal(a.entropy, b.entropy)
    assert not any(p.device.type == "cpu" for p in streamed.model.parameters())  # and dropped each after use


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_binding_holds_one_weight_at_a_time(tiny_checkpoint, tmp_path, precision):
    ckpt = Checkpoint.open(tiny_checkpoint)
    state = ckpt.load_state("np")
    live: list[weakref.ref] = []
    most = 0

    def read(name: str) -> np.ndarray:
        nonlocal most
        most = max(most, sum(ref() is not None for ref in live))  # weights read earlier and still held
        array = state[name].astype(np.float32)  # a fresh copy, as a checkpoint read is
        live.append(weakref.ref(array))
        return array

    skeletons = binding.trace_skeletons(ckpt.arch, TorchDenoiser(ckpt).suppress, 2, tmp_path)
    binding.bind(skeletons, ckpt.arch, read, expected_shapes(ckpt.arch), tmp_path, precision, inline_limit=0)
    # every weight read once for both graphs (a tied embedding twice: its table and the head's matrix),
    # and none still held when the next is read
    assert len(live) == len(state) + (1 if ckpt.arch.tie_word_embeddings else 0)
    assert most == 0


def test_a_model_larger_than_its_memory_converts_without_float32_graphs(small_init_checkpoint, tmp_path):
    """With less memory than its float32 weights need, int8 conversion streams: the reference reads each
    weight as it runs, no float32 graph is built, and the result is the same folder the in-memory path writes."""
    from engine import Engine
    from engine.manifest import read_manifest

    messages: list[str] = []
    small, roomy = tmp_path / "small", tmp_path / "roomy"
    manifest = export.convert(small_init_checkpoint, small, precision="int8", memory=1 << 20, progress=messages.append)
    export.convert(small_init_checkpoint, roomy, precision="int8", memory=1 << 40, progress=lambda _m: None)
    assert any("converting one weight at a time" in m for m in messages)
    assert "fp32" not in manifest.validation and manifest.validation["int8"]["passed"]
    assert manifest.validation["fp32_graphs"].startswith("not built")
    assert "fp32" in read_manifest(roomy).validation
    a, b = (export.engine_weights(folder, manifest.arch) for folder in (small, roomy))
    assert all(np.array_equal(a[name], b[name]) for name in b)
    prefix, suffix = "def add(a, b):\n    return ", "\n"
    got, want = (Engine.load(folder, backend="cpu").complete(prefix, suffix) for folder in (small, roomy))
    assert got.middle_ids == want.middle_ids
    with pytest.raises(ExportError, match="available: convert with --precision int8"):  # cannot be validated here
        export.convert(small_init_checkpoint, tmp_path / "fp32", precision="fp32", memory=1 << 20)
    assert not (tmp_path / "fp32").exists()
    messages.clear()  # auto (the pull's default) becomes int8: its fp32 fallback cannot be built
    auto = export.convert(small_init_checkpoint, tmp_path / "auto", precision="auto", memory=1 << 20, progress=messages.append)
    assert auto.precision == "int8" and any("so auto means int8" in m for m in messages)


def test_a_bfloat16_checkpoint_converts_one_weight_at_a_time(tmp_path):
    """Published 7-8B checkpoints store bfloat16: each weight is widened as it is read, exactly."""
    folder = write_random_checkpoint(tmp_path / "bf16", dtype="bfloat16", init_std=0.02, hidden_size=128,
                                     intermediate_size=256, seed=4)
    ckpt = Checkpoint.open(folder)
    stored = ckpt.load_state("pt")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert all(torch.equal(ckpt.read_tensor(name), tensor.float()) for name, tensor in stored.items())
    manifest = export.convert(folder, tmp_path / "engine", precision="int8", memory=1 << 20, progress=lambda _m: None)
    assert manifest.validation["int8"]["passed"] and "fp32_graphs" in manifest.validation


def test_dlm_convert_plans_on_the_memory_it_is_given(small_init_checkpoint, tmp_path, capsys):
    """``dlm-convert --memory-gb``: the memory a conversion plans on, as the user gives it; nonsense is refused."""
    import json

    from engine.cli import convert_main

    assert convert_main([str(small_init_checkpoint), str(tmp_path / "out"), "--precision", "auto", "--memory-gb", "0.001"]) == 0
    captured = capsys.readouterr()
    assert "converting one weight at a time" in captured.err and "so auto means int8" in captured.err
    validation = json.loads(captured.out)["validation"]
    assert validation["int8"]["passed"] and validation["fp32_graphs"].startswith("not built")
    with pytest.raises(SystemExit):
        convert_main([str(small_init_checkpoint), str(tmp_path / "never"), "--memory-gb", "0"])
    assert "memory must be more than 0 GB" in capsys.readouterr().err and not (tmp_path / "never").exists()
