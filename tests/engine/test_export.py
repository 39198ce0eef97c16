"""dlm-convert: graphs validated against PyTorch, manifest checksums, failure handling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from engine import export  # noqa: E402
from engine.errors import ExportError, ManifestError  # noqa: E402
from engine.manifest import CONTEXT_INPUTS, SPAN_INPUTS, SPAN_OUTPUTS, read_manifest  # noqa: E402


def test_fp32_engine_folder_contents_and_validation(tiny_engine):
    manifest = read_manifest(tiny_engine)
    assert manifest.family == "dream" and manifest.precision == "fp32"
    assert set(manifest.files) >= {"context.onnx", "span_step.onnx", "tokenizer.json", "source_config.json"}
    summary = manifest.validation["fp32"]
    assert summary["passed"] and summary["cases"] == 3
    assert summary["worst"]["step_prob_err"] < 1e-4
    assert summary["worst"]["top1_agreement"] == 1.0


def test_graph_interface(tiny_engine):
    import onnx

    span = onnx.load(str(tiny_engine / "span_step.onnx"))
    assert [i.name for i in span.graph.input] == list(SPAN_INPUTS)
    assert [o.name for o in span.graph.output] == list(SPAN_OUTPUTS)
    context = onnx.load(str(tiny_engine / "context.onnx"))
    assert [i.name for i in context.graph.input] == list(CONTEXT_INPUTS) == [
        "input_ids", "position_ids", "cache_index", "span_index", "prior_keys", "prior_values"]
    assert [o.name for o in context.graph.output] == ["cache_keys", "cache_values", *SPAN_OUTPUTS]


def test_manifest_detects_tampering(tiny_engine, tmp_path):
    folder = shutil.copytree(tiny_engine, tmp_path / "e")
    data = bytearray((folder / "span_step.onnx").read_bytes())
    data[-10] ^= 0xFF
    (folder / "span_step.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="span_step.onnx does not match its checksum"):
        read_manifest(folder)
    read_manifest(folder, verify=False)  # opt-out still reads
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="tokenizer.json is missing"):
        read_manifest(folder)


def test_manifest_malformed_older_or_newer(tiny_engine, tmp_path):
    folder = shutil.copytree(tiny_engine, tmp_path / "e")
    data = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ManifestError, match="upgrade dlm-lsp"):
        read_manifest(folder)
    # a folder of format 1 (its graphs lack the first step and take unrotated keys): convert again
    (folder / "manifest.json").write_text(json.dumps({**data, "format_version": 1}))
    with pytest.raises(ManifestError, match=r"format version 1, from an older dlm-convert.*dlm-convert SRC"):
        read_manifest(folder)
    del data["arch"]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="malformed"):
        read_manifest(folder)


def test_refuses_to_overwrite_without_force(tiny_checkpoint, tiny_engine):
    with pytest.raises(ExportError, match="--force"):
        export.convert(tiny_checkpoint, tiny_engine, precision="fp32")


def test_validation_failure_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    strict = export.Tolerance(
        cache_rtol=0.0, prob_atol=0.0, entropy_rtol=0.0, prob_mean_atol=0.0, entropy_mean_rtol=0.0,
        min_top1_agreement=1.0, tie_margin=0.0,
    )
    monkeypatch.setitem(export.TOLERANCES, "fp32", strict)
    with pytest.raises(ExportError, match=r"(?s)do not match the PyTorch reference .*\[fp32\]") as info:
        export.convert(tiny_checkpoint, tmp_path / "out", precision="fp32")
    assert "window40_batch1_span8" in str(info.value)  # the report names the failing case
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no leftovers


def test_int8_conversion(small_init_checkpoint, tmp_path):
    manifest = export.convert(small_init_checkpoint, tmp_path / "int8", precision="int8")
    assert manifest.precision == "int8"
    assert manifest.validation["fp32"]["passed"] and manifest.validation["int8"]["passed"]
    assert manifest.validation["int8"]["worst"]["step_prob_err"] < export.TOLERANCES["int8"].prob_atol
    fp32 = export.convert(small_init_checkpoint, tmp_path / "fp32", precision="fp32")
    assert fp32.files["span_step.onnx"]["bytes"] > 2 * manifest.files["span_step.onnx"]["bytes"]


def test_int4_conversion_serves_and_round_trips(small_init_checkpoint, tmp_path):
    """--precision int4: MatMulNBits graphs, validated, loaded and completing; a checkpoint recovered from
    them converts back to the very same 4-bit codes (4-bit values are exact in fp32)."""
    import onnx
    from onnx import numpy_helper

    from engine import Engine

    manifest = export.convert(small_init_checkpoint, tmp_path / "int4", precision="int4")
    assert manifest.precision == "int4" and manifest.validation["int4"]["passed"]
    graph = onnx.load(str(tmp_path / "int4" / "span_step.onnx")).graph
    arch = manifest.arch
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 7 * arch.num_layers + 1  # blocks + LM head
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in graph.node)
    engine = Engine.load(tmp_path / "int4", backend="cpu")
    assert engine.info.precision == "int4"
    done = engine.complete("def add(a, b):\n    return ", "\n")
    assert not done.cut and len(done.middle_ids) > 0
    again = tmp_path / "again"
    export.convert(export.recover_checkpoint(tmp_path / "int4", tmp_path / "ckpt"), again, precision="int4")

    def codes(folder):  # type: ignore[no-untyped-def]
        g = onnx.load(str(folder / "span_step.onnx")).graph
        return [numpy_helper.to_array(t) for t in g.initializer if t.name.endswith("_q4")]

    assert all(np.array_equal(a, b) for a, b in zip(codes(tmp_path / "int4"), codes(again)))


def test_int4_blocks_are_what_matmulnbits_computes(tmp_path):
    """The packing (low nibble first along K, one scale per block of 32, zero point 8) is the one ONNX
    Runtime's MatMulNBits reads: its product equals the dequantised matrix's (to the kernel's int8
    activation rounding), and each weight is within one step of the original, the block's widest exact."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engine.weights import dequantize_blocks_int4, quantize, quantize_blocks_int4

    rng = np.random.default_rng(0)
    k, n = 80, 40  # K not a multiple of the block: padded
    weight = rng.standard_normal((k, n)).astype(np.float32)
    packed, scales = quantize_blocks_int4(weight)
    assert packed.shape == (n, 3, 16) and scales.shape == (n * 3,)
    restored = dequantize_blocks_int4(packed, scales, k)
    step = np.repeat(np.abs(scales.reshape(n, 3)), 32, axis=1)[:, :k].T
    assert (np.abs(restored - weight) <= step * 1.0001).all()
    widest = np.abs(weight[:32]).argmax(axis=0)
    assert np.allclose(restored[widest, np.arange(n)], weight[widest, np.arange(n)], rtol=1e-6)
    node = helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", "t", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])], [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", 1 << 30, "int4")
    a = rng.standard_normal((2, 5, k)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    want = a @ restored
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
    swapped = (packed >> 4) | (packed << 4)  # the other nibble order is far off: the check has teeth
    wrong = a @ dequantize_blocks_int4(swapped, scales, k)
    assert np.linalg.norm(got - wrong) / np.linalg.norm(want) > 0.5


def test_bad_options(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="precision"):
        export.convert(tiny_checkpoint, tmp_path / "x", precision="fp8")
    with pytest.raises(ExportError, match="top_k"):
        export.convert(tiny_checkpoint, tmp_path / "x", top_k=1)


def test_onnxruntime_matches_torch_reference(tiny_checkpoint, tiny_engine):
    """The serving backend and the reference give the same numbers through the Denoiser interface."""
    from engine.backends.onnxruntime import OnnxRuntimeDenoiser
    from engine.backends.torch_ref import TorchDenoiser
    from engine.checkpoint import Checkpoint

    ort = OnnxRuntimeDenoiser(tiny_engine, read_manifest(tiny_engine), backend="cpu")
    ref = TorchDenoiser(Checkpoint.open(tiny_checkpoint))
    report = export.validate(ref, ort, "fp32", seed=11)  # unseen shapes and values
    assert not report.failures
    ids = np.arange(30)[None] % ort.info.arch.vocab_size
    a = ort.full(ids, np.arange(30)[None], np.ones((1, 30), bool))
    b = ref.full(ids, np.arange(30)[None], np.ones((1, 30), bool))
    assert np.array_equal(a.ids, b.ids)
    assert np.allclose(a.probs, b.probs, atol=1e-5)


def test_recovering_a_checkpoint_from_fp32_graphs_gives_back_its_weights(tiny_checkpoint, tiny_engine, tmp_path):
    from engine.checkpoint import Checkpoint

    out = export.recover_checkpoint(tiny_engine, tmp_path / "recovered")
    original = Checkpoint.open(tiny_checkpoint).load_state("np")
    recovered = Checkpoint.open(out).load_state("np")
    assert set(recovered) == set(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(recovered[name], tensor, err_msg=name)


def test_the_shipped_int8_model_round_trips_through_a_recovered_checkpoint(tmp_path):
    """int8 graphs -> dequantised fp32 checkpoint -> dlm-convert: the very same int8 weights."""
    import onnx
    from onnx import numpy_helper

    from engine import default_model_path

    shipped = default_model_path()
    checkpoint = export.recover_checkpoint(shipped, tmp_path / "ckpt")
    again = tmp_path / "int8"
    export.convert(checkpoint, again, precision="int8")

    def int8_weights(folder):  # type: ignore[no-untyped-def]
        graph = onnx.load(str(folder / "span_step.onnx")).graph
        return [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_quantized")]

    before, after = int8_weights(shipped), int8_weights(again)
    assert len(before) == len(after) == 7 * read_manifest(shipped).arch.num_layers + 1  # blocks + LM head
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_recovery_refuses_graphs_of_another_architecture(tiny_engine):
    from dataclasses import replace

    arch = read_manifest(tiny_engine).arch
    with pytest.raises(ExportError, match="block matrices"):
        export.engine_weights(tiny_engine, replace(arch, num_layers=arch.num_layers + 1))


def test_graphs_past_the_inline_limit_share_one_data_file(small_init_checkpoint, tmp_path):
    """Past the inline limit (a 0.5B model's graphs) both graphs keep their weights in one
    ``weights.data``, every tensor once, page-aligned, so that ONNX Runtime maps one copy for both.

    The limit is lowered so that a tiny model takes the same path; every precision loads,
    validates and is checksummed file by file, answers as the self-contained folder does, and
    no scratch files are left.
    """
    import onnx
    from onnx import numpy_helper

    from engine import Engine
    from engine.weights import PAGE, SHARED_DATA_FILE

    prefix, suffix = "def add(a, b):\n    return ", "\n"
    for precision in ("fp32", "int8", "int4"):
        out, whole = tmp_path / precision, tmp_path / f"{precision}-inline"
        manifest = export.convert(small_init_checkpoint, out, precision=precision, inline_limit=0, progress=lambda _m: None)
        export.convert(small_init_checkpoint, whole, precision=precision, progress=lambda _m: None)
        assert manifest.validation[precision]["passed"]
        assert sorted(manifest.files) == sorted(["context.onnx", "span_step.onnx", SHARED_DATA_FILE,
                                                 "source_config.json", "tokenizer.json", "tokenizer_config.json"])
        entries: dict[str, set[tuple[str, str]]] = {}
        for graph in ("context.onnx", "span_step.onnx"):
            model = onnx.load(str(out / graph), load_external_data=False)
            for t in model.graph.initializer:
                if t.external_data:
                    info = {e.key: e.value for e in t.external_data}
                    assert info["location"] == SHARED_DATA_FILE and int(info["offset"]) % PAGE == 0
                    entries.setdefault(graph, set()).add((t.name, info["offset"]))
        assert entries["span_step.onnx"] <= entries["context.onnx"]  # the span step's weights: the context graph's
        inline_bytes = sum(  # what one self-contained graph holds
            numpy_helper.to_array(t).nbytes for t in onnx.load(str(whole / "context.onnx")).graph.initializer
        )
        assert inline_bytes * 0.9 < manifest.files[SHARED_DATA_FILE]["bytes"] < inline_bytes * 1.2  # once, not twice
        assert sorted(p.name for p in out.iterdir()) == sorted([*manifest.files, "manifest.json"])
        assert read_manifest(out).precision == precision
        got, want = (Engine.load(f, backend="cpu").complete(prefix, suffix) for f in (out, whole))
        assert got.middle_ids == want.middle_ids
        shared_weights, own = (export.engine_weights(f, manifest.arch) for f in (out, whole))  # recoverable alike
        assert all(np.array_equal(shared_weights[name], own[name]) for name in own)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("-inline")) == ["fp32", "int4", "int8"]


def test_int8_that_misses_the_bar_offers_fp32_and_auto_keeps_fp32(tmp_path):
    """A very peaked random checkpoint (weights of std 0.5) loses its ranking in int8 (top-1 agreement
    ~0.2 on the validation windows): say so, with a way forward."""
    from engine.tiny import write_random_checkpoint

    tiny_checkpoint = write_random_checkpoint(tmp_path / "peaked", seed=1, init_std=0.5)
    with pytest.raises(ExportError, match=r"(?s)\[int8\].*The fp32 graphs passed.*--precision fp32.*--precision auto"):
        export.convert(tiny_checkpoint, tmp_path / "int8", precision="int8", progress=lambda _m: None)
    assert not (tmp_path / "int8").exists() and not list(tmp_path.glob(".int8.*"))
    said: list[str] = []
    manifest = export.convert(tiny_checkpoint, tmp_path / "auto", precision="auto", progress=said.append)
    assert manifest.precision == "fp32" and read_manifest(tmp_path / "auto").precision == "fp32"
    assert not manifest.validation["int8_rejected"]["passed"]
    assert any("int8 does not meet the bar" in line and "keeping fp32" in line for line in said)


def test_auto_keeps_int8_when_it_passes(small_init_checkpoint, tmp_path):
    manifest = export.convert(small_init_checkpoint, tmp_path / "auto", precision="auto", progress=lambda _m: None)
    assert manifest.precision == "int8" and "int8_rejected" not in manifest.validation


def test_a_killed_conversion_leaves_scratch_that_the_next_one_removes(tiny_checkpoint, tmp_path):
    stale = tmp_path / ".out.abc123"
    (stale / "fp32").mkdir(parents=True)
    (stale / "fp32" / "context.onnx").write_bytes(b"half written")
    export.convert(tiny_checkpoint, tmp_path / "out", precision="fp32", progress=lambda _m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_int8_is_validated_on_real_code_windows(small_init_checkpoint):
    """The int8 cases are masked middles of real code in the checkpoint's tokens, at consistent positions."""
    from engine.checkpoint import Checkpoint

    ckpt = Checkpoint.open(small_init_checkpoint)
    text_ids = export.code_tokens(ckpt.tokenizer, ckpt.arch.vocab_size)
    assert text_ids is not None and len(text_ids) > 1000
    mask = ckpt.token_ids.mask
    for case in export.validation_cases(ckpt.arch, 0, text_ids, mask):
        ids, span = case["input_ids"], case["span_index"]
        assert (ids[span[1:]] == mask).all() and (ids[np.setdiff1d(np.arange(len(ids)), span[1:])] != mask).all()
        decoded = ckpt.tokenizer.decode([int(i) for i in ids[: span[0]]])
        assert decoded.strip() and decoded in export.VALIDATION_CODE.read_text()  # a piece of real code
        assert (case["span_pos"][:, 0] == span[0]).all()


def test_streaming_int8_quantisation_matches_onnxruntimes_quantiser(tiny_engine, tmp_path):
    """engine.weights.quantize_int8 writes what onnxruntime's quantize_dynamic writes (per-channel symmetric
    int8 weights, dynamic uint8 activations): same nodes, and the same outputs to float rounding."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from engine.weights import quantize_int8

    src = tiny_engine / "span_step.onnx"
    ours, theirs = tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    quantize_int8(src, ours, inline_limit=1 << 30)
    quantize_dynamic(src, theirs, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    count = lambda path, op: sum(n.op_type == op for n in onnx.load(str(path)).graph.node)  # noqa: E731
    assert count(ours, "MatMulInteger") == count(theirs, "MatMulInteger") > 0  # every MatMul by a constant
    assert count(ours, "MatMul") == count(theirs, "MatMul")  # the attention products stay float
    assert count(ours, "DynamicQuantizeLinear") == count(theirs, "DynamicQuantizeLinear")
    manifest = read_manifest(tiny_engine)
    arch = manifest.arch
    rng = np.random.default_rng(0)
    feeds = {
        "span_ids": rng.integers(0, arch.vocab_size, (2, 6)),
        "span_pos": np.tile(np.arange(20, 26), (2, 1)),
        "span_valid": np.ones((2, 6), bool),
        "cache_keys": rng.standard_normal((arch.num_layers, 2, arch.num_kv_heads, 20, arch.head_dim)).astype(np.float32),
        "cache_values": rng.standard_normal((arch.num_layers, 1, arch.num_kv_heads, 20, arch.head_dim)).astype(np.float32),
        "cache_valid": np.arange(20)[None] < np.array([[20], [13]]),
    }
    a = ort.InferenceSession(str(ours), providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(str(theirs), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.array_equal(a[0], b[0])  # the same top-k ids
    assert np.abs(a[1] - b[1]).max() < 1e-4 and np.abs(a[2] - b[2]).max() < 1e-3


def test_large_files_are_hashed_once_per_version(tiny_engine, tmp_path, monkeypatch):
    """Verification remembers the sha256 of large files by (path, size, mtime, inode): a reload does not
    hash them again, and a rewritten file is hashed afresh (and caught if it does not match)."""
    import os

    from engine import manifest as manifest_module

    monkeypatch.setenv("DLM_LSP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(manifest_module, "CACHED_HASH_MIN_BYTES", 0)
    folder = shutil.copytree(tiny_engine, tmp_path / "e")
    read_manifest(folder)
    cache = json.loads(manifest_module.hash_cache_file().read_text())
    graph = str((folder / "span_step.onnx").resolve())
    expected = read_manifest(folder, verify=False).files["span_step.onnx"]["sha256"]
    assert cache[graph][-1] == expected
    # the remembered hash is what a reload uses: a wrong remembered value makes verification fail
    cache[graph][-1] = "0" * 64
    manifest_module.hash_cache_file().write_text(json.dumps(cache))
    with pytest.raises(ManifestError, match="span_step.onnx does not match its checksum"):
        read_manifest(folder)
    # rewriting the file (same size, a new modification time) hashes it again: it verifies
    data = (folder / "span_step.onnx").read_bytes()
    (folder / "span_step.onnx").write_bytes(data)
    os.utime(folder / "span_step.onnx", ns=(1, 1))
    read_manifest(folder)
    # and a changed byte behind a rewrite is caught
    (folder / "span_step.onnx").write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    with pytest.raises(ManifestError, match="span_step.onnx does not match its checksum"):
        read_manifest(folder)
