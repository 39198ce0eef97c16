"""Native TensorRT engines (engine.halfgraph, engine.backends.tensorrt), proven on the CPU where they can be:
the half-precision graphs (their types, and what they compute, through their emulated twins), the choice of
fp16 or bf16, the profiles against every shape a real engine sends, the engine keys, the host side of a
call, and the errors without TensorRT. Building and running the engines needs a GPU (scripts/gpu-check.sh)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine import Engine, SamplingParams
from engine.backends import tensorrt
from engine.backends.onnxruntime import OnnxRuntimeDenoiser
from engine.backends.tensorrt import Buckets, engine_key, select_profile
from engine.backends.device import host_feed, host_outputs
from engine.cli import convert_main
from engine.errors import BackendUnavailableError
from engine.export import validate
from engine.halfgraph import HALF_OPS, half_graph, int32_ids, to_half_array, write_half_folder
from engine.manifest import read_manifest
from trt_shapes import MERGED_ROWS, TEXT, record_shapes

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
HAS_TENSORRT_PACKAGE = importlib.util.find_spec("tensorrt") is not None
HAS_TENSORRT = HAS_TENSORRT_PACKAGE and shutil.which("nvidia-smi") is not None
DEVICE = {"gpu": "NVIDIA H200", "compute": "9.0", "driver": "580.1", "tensorrt": "11.4.0", "cuda": "12.9"}
FLOAT, FLOAT16, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


def _types(model) -> dict[str, int]:  # type: ignore[no-untyped-def]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


@pytest.mark.parametrize("dtype, elem", [("fp16", FLOAT16), ("bf16", BFLOAT16)])
def test_the_half_graph_multiplies_in_half_and_keeps_everything_else_fp32(tiny_engine: Path, tmp_path: Path,
                                                                           dtype: str, elem: int):
    manifest = read_manifest(tiny_engine)
    paths = write_half_folder(tiny_engine, manifest, dtype, tmp_path, int32=True)
    for role, path in paths.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)  # every op's types agree
        types = _types(model)
        matmuls = [n for n in model.graph.node if n.op_type in HALF_OPS]
        assert matmuls and all(types[i] == elem for n in matmuls for i in n.input), role
        for node in model.graph.node:  # nothing but the matrix products, gathers and casts sees a half tensor
            if node.op_type not in (*HALF_OPS, "Gather", "Cast"):
                assert all(types.get(i) != elem for i in node.input if i), (role, node.op_type)
            if node.op_type in ("Cos", "Sin", "Softmax", "LogSoftmax", "ReduceMean", "TopK", "Pow"):
                assert all(types.get(i) in (FLOAT, onnx.TensorProto.INT64) for i in node.input if i), node.op_type
        big = [t for t in model.graph.initializer if int(np.prod(t.dims)) >= 1024]
        assert big and all(t.data_type == elem for t in big), role  # every weight matrix and table is stored half
        io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
        assert io["top_ids"] == onnx.TensorProto.INT32 and FLOAT in io.values()
        assert onnx.TensorProto.INT64 not in io.values()  # ids in and out are int32
    fp32 = sum((tiny_engine / n).stat().st_size for n in manifest.graphs.values())
    half = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert half < 0.6 * fp32


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_emulated_half_graphs_stay_within_their_bar_and_differ_from_fp32(tiny_engine: Path, tmp_path: Path,
                                                                              dtype: str):
    manifest = read_manifest(tiny_engine)
    write_half_folder(tiny_engine, manifest, dtype, tmp_path, emulate=True)
    reference = OnnxRuntimeDenoiser(tiny_engine, manifest, "cpu")
    report = validate(reference, OnnxRuntimeDenoiser(tmp_path, manifest, "cpu"), dtype)
    assert not report.failures, report.failures
    worst = report.summary()["worst"]
    assert 0 < worst["cache_keys_rel_err"] < 0.05  # rounded (so the casts are there), and only rounded
    assert worst["top1_agreement"] >= 0.95


def test_bf16_rounds_to_nearest_even_like_onnx_runtime():
    values = np.array([1.0, 1.00390625, 1.01171875, -3.14159, 3001.0, 70000.0, 1e30, np.nan, 0.0], np.float32)
    raw, _ = to_half_array(values, "bf16")
    session = ort.InferenceSession(_cast_model(BFLOAT16).SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": values})[0]
    got = (raw.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(got, want, equal_nan=True)


def _cast_model(elem: int):  # type: ignore[no-untyped-def]
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=elem), helper.make_node("Cast", ["h"], ["y"], to=FLOAT)], "cast",
        [helper.make_tensor_value_info("x", FLOAT, [None])], [helper.make_tensor_value_info("y", FLOAT, [None])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _overflowing_copy(folder: Path, dst: Path) -> Path:
    """``folder`` with its first MLP down projection scaled by 1e6: the residual stream then holds values
    fp16 cannot (above 65,504), while RMSNorm makes the model's outputs finite again in fp32 and bf16."""
    shutil.copytree(folder, dst)
    manifest = read_manifest(folder)
    arch = manifest.arch
    for name in manifest.graphs.values():
        model = onnx.load(str(dst / name))
        down = next(t for t in model.graph.initializer if list(t.dims) == [arch.intermediate_size, arch.hidden_size])
        scaled = onnx.numpy_helper.to_array(down) * np.float32(1e6)
        down.CopyFrom(onnx.numpy_helper.from_array(scaled, down.name))
        onnx.save(model, str(dst / name))
    return dst


def test_fp16_is_chosen_when_it_holds_and_bf16_when_fp16_overflows(tiny_engine: Path, tmp_path: Path):
    manifest = read_manifest(tiny_engine)
    dtype, reports = tensorrt.choose_dtype(tiny_engine, manifest)
    assert dtype == "fp16" and reports["fp16"]["passed"] and "bf16" not in reports
    hot = _overflowing_copy(tiny_engine, tmp_path / "hot")
    dtype, reports = tensorrt.choose_dtype(hot, manifest)
    assert dtype == "bf16", reports
    assert not reports["fp16"]["passed"] and any("non-finite" in f for f in reports["fp16"]["failures"])
    assert reports["bf16"]["passed"]


def test_int32_ids_and_the_host_side_of_a_call_give_the_int64_graphs_answers(tiny_engine: Path, tmp_path: Path):
    """The engine takes and returns int32 ids; host_feed and host_outputs convert a call both ways. Run here with
    ONNX Runtime on the emulated graphs, with and without int32 ids: the same outputs, bit for bit."""
    manifest = read_manifest(tiny_engine)
    for role, name in manifest.graphs.items():
        emulated = half_graph(onnx.load(str(tiny_engine / name)), "fp16", tiny_engine, emulate=True)
        wide = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
        narrow = ort.InferenceSession(int32_ids(emulated).SerializeToString(), providers=["CPUExecutionProvider"])
        dtypes = {i.name: {"tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(bool)": np.bool_}[i.type]
                  for i in narrow.get_inputs()}
        assert {n for n, t in dtypes.items() if t is np.int32} == {i.name for i in wide.get_inputs()
                                                                    if i.type == "tensor(int64)"}
        feed = _feed(role, manifest.arch)
        want = wide.run(None, feed)
        got = host_outputs(narrow.run(None, host_feed(feed, dtypes)))
        for a, b in zip(want, got):
            assert a.dtype == b.dtype and np.array_equal(a, b), role


def _feed(role: str, arch) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    kv = (arch.num_layers, 1, arch.num_kv_heads, 5, arch.head_dim)
    if role == "context":
        return {"input_ids": rng.integers(0, arch.vocab_size, (1, 12)), "position_ids": np.arange(12)[None],
                "cache_index": np.arange(8), "span_index": np.arange(8, 12),
                "prior_keys": rng.standard_normal(kv).astype(np.float32),
                "prior_values": rng.standard_normal(kv).astype(np.float32)}
    return {"span_ids": rng.integers(0, arch.vocab_size, (2, 4)), "span_pos": np.tile(np.arange(5, 9), (2, 1)),
            "span_valid": np.ones((2, 4), bool), "cache_keys": rng.standard_normal(kv).astype(np.float32).repeat(2, 1),
            "cache_values": rng.standard_normal(kv).astype(np.float32).repeat(2, 1),
            "cache_valid": np.ones((2, 5), bool)}


def test_every_shape_the_engine_sends_finds_a_profile_and_the_smallest_one(tiny_engine: Path):
    arch = read_manifest(tiny_engine).arch
    buckets = Buckets(windows=(64, arch.max_positions), spans=((4, 2), (16, 4), (arch.max_positions, MERGED_ROWS)),
                      opt_window=64)
    chosen: dict[str, set[int]] = {"context": set(), "span_step": set()}
    for role, fed in record_shapes(tiny_engine).items():
        profiles = buckets.profiles(role, arch)
        for shapes in fed:
            index = select_profile(profiles, shapes)
            chosen[role].add(index)
            for smaller in profiles[:index]:  # every smaller profile refuses one of its shapes
                with pytest.raises(ValueError):
                    select_profile([smaller], shapes)
    assert len(chosen["context"]) == 2 and len(chosen["span_step"]) >= 2, chosen  # the buckets were all used
    too_long = {"input_ids": (1, arch.max_positions + 1)}
    with pytest.raises(ValueError, match="no TensorRT profile"):
        select_profile(buckets.profiles("context", arch), too_long)


def test_buckets_stay_within_the_model_and_cover_the_graph_inputs(tiny_engine: Path):
    manifest = read_manifest(tiny_engine)
    buckets = Buckets()  # 1,024 and 4,096 positions: the tiny model has fewer
    for role, name in manifest.graphs.items():
        inputs = [i.name for i in onnx.load(str(tiny_engine / name), load_external_data=False).graph.input]
        for profile in buckets.profiles(role, manifest.arch):
            assert list(profile) == inputs
            assert all(max(high) <= max(manifest.arch.max_positions, manifest.arch.num_layers, MERGED_ROWS * 8)
                       for _, _, high in profile.values())
    assert len(buckets.limits("context", manifest.arch)) == 1  # both windows capped to the model's: one profile


def test_engine_keys_change_with_what_invalidates_an_engine(tiny_engine: Path):
    manifest = read_manifest(tiny_engine)
    key = engine_key(manifest, "fp16", Buckets(), DEVICE)
    assert key == engine_key(read_manifest(tiny_engine), "fp16", Buckets(), dict(DEVICE))
    graph = next(iter(manifest.files))
    changed = [
        engine_key(manifest, "bf16", Buckets(), DEVICE),
        engine_key(manifest, "fp16", Buckets(spans=((16, 4),)), DEVICE),
        *(engine_key(manifest, "fp16", Buckets(), {**DEVICE, field: "other"}) for field in DEVICE),
        engine_key(replace(manifest, files={**manifest.files, graph: {"sha256": "0" * 64}}), "fp16", Buckets(), DEVICE),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_engines_live_beside_the_manifest_and_auto_uses_them_only_where_they_run(tiny_engine: Path,
                                                                                  tmp_path: Path, caplog):
    import logging

    folder = tmp_path / "model"
    shutil.copytree(tiny_engine, folder)
    manifest = read_manifest(folder)
    assert not tensorrt.built_any(folder)
    assert tensorrt.engines_dir(folder, "abc") == folder / "tensorrt" / "abc"
    key = engine_key(manifest, "fp16", Buckets(), DEVICE)
    record = tensorrt.engines_dir(folder, key)
    record.mkdir(parents=True)
    (record / tensorrt.BUILD_RECORD).write_text(json.dumps({"dtype": "fp16"}))  # built on another machine's GPU
    (record / "context.engine").write_bytes(b"plan")
    assert tensorrt.built_any(folder)
    assert tensorrt.find_engines(folder, manifest, DEVICE) is None  # not built here: a plan is code, not loaded
    trust = tensorrt._trust_record(key)
    trust.parent.mkdir(parents=True, exist_ok=True)
    trust.write_text(json.dumps({"context.engine": hashlib.sha256(b"plan").hexdigest()}))  # as a build here records
    assert tensorrt.find_engines(folder, manifest, DEVICE) == record
    assert tensorrt.find_engines(folder, manifest, {**DEVICE, "gpu": "NVIDIA L4"}) is None
    (record / "context.engine").write_bytes(b"another plan")  # changed since: not loaded
    assert tensorrt.find_engines(folder, manifest, DEVICE) is None
    with caplog.at_level(logging.INFO, logger="engine.engine"):
        engine = Engine.load(folder, backend="auto")  # no TensorRT here: ONNX Runtime, and the log says why
    assert engine.info.backend in ("cpu", "cuda")
    assert "not the native TensorRT engines" in caplog.text
    assert engine.complete(TEXT[:500], TEXT[500:700], SamplingParams(lengths=(4,))).stats["steps"] >= 1


@pytest.mark.skipif(HAS_TENSORRT_PACKAGE, reason="this machine has TensorRT's Python package")
def test_without_tensorrt_the_backend_and_the_build_say_what_to_install(tiny_engine: Path, tmp_path: Path, capsys):
    with pytest.raises(BackendUnavailableError, match=r"TensorRT's Python package.*pip install -e '\.\[gpu\]'"):
        Engine.load(tiny_engine, backend="tensorrt")
    assert convert_main(["--engine", "tensorrt", str(tiny_engine)]) == 2
    assert "pip install -e '.[gpu]'" in capsys.readouterr().err


def test_the_cli_refuses_engines_from_quantised_graphs_and_a_missing_destination(tiny_checkpoint: Path,
                                                                                  tmp_path: Path, capsys):
    assert convert_main([str(tiny_checkpoint), str(tmp_path / "out"), "--engine", "tensorrt"]) == 2
    assert "--precision fp32" in capsys.readouterr().err  # int8 is the default precision
    assert not (tmp_path / "out").exists()
    assert convert_main([str(tiny_checkpoint)]) == 2
    assert "DST is missing" in capsys.readouterr().err
    assert convert_main(["--engine", "tensorrt", str(tmp_path)]) == 2
    assert "not an engine folder" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs an NVIDIA GPU with TensorRT and cuda-python (the gpu extra)")
def test_native_engines_build_once_and_answer_as_the_cpu_does(tiny_engine: Path, tmp_path: Path):  # pragma: no cover
    folder = tmp_path / "model"
    shutil.copytree(tiny_engine, folder)
    lines: list[str] = []
    first = Engine.load(folder, backend="tensorrt", progress=lines.append)
    assert first.info.backend == "tensorrt" and first.info.precision in ("fp16", "bf16") and lines
    (record,) = list((folder / "tensorrt").glob("*/build.json"))
    built = json.loads(record.read_text())
    assert set(built["graphs"]) == {"context", "span_step"} and all(g["bytes"] > 0 for g in built["graphs"].values())
    reference = Engine.load(folder, backend="cpu")
    window = np.arange(1, 120) % reference.info.arch.vocab_size
    span = np.arange(60, 70)
    cache_index = np.setdiff1d(np.arange(len(window)), span)
    _, got = first.denoiser.encode_context(window, np.arange(len(window)), cache_index, span)
    _, want = reference.denoiser.encode_context(window, np.arange(len(window)), cache_index, span)
    assert np.mean(got.ids[..., 0] == want.ids[..., 0]) >= 0.9  # half precision: the ranking survives
    params = SamplingParams(lengths=(4, 8, 16))
    for prefix, suffix in ((TEXT[:3000], TEXT[3000:3500]), (TEXT[:200], "")):
        got_c, want_c = first.complete(prefix, suffix, params), reference.complete(prefix, suffix, params)
        assert got_c.stats["context_tokens"] == want_c.stats["context_tokens"] and got_c.stats["steps"] >= 1
    for k in range(4):  # typing: priors selected and joined on the device
        typed = first.complete(TEXT[: 3000 + k], TEXT[3000:3500], params, reuse="doc")
        assert typed.stats["steps"] >= 1
    merged = Engine.load(folder, backend="tensorrt")
    merged.batch_requests(max_rows=8)
    import threading

    outs: list[str] = []
    threads = [threading.Thread(target=lambda i=i: outs.append(merged.complete(TEXT[: 1000 * i], "", params).text))
               for i in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outs) == 3  # merged span steps, stacked on the device
    built_at = record.stat().st_mtime_ns
    again = Engine.load(folder, backend="auto")  # built now: auto takes them, and nothing is rebuilt
    assert again.info.backend == "tensorrt" and record.stat().st_mtime_ns == built_at
    for _ in range(3):  # the same shapes again and again: the span steps replay a CUDA graph, same answers
        assert again.complete(TEXT[:3000], TEXT[3000:3500], params).text == first.complete(
            TEXT[:3000], TEXT[3000:3500], params).text


def test_bf16_is_offered_only_to_gpus_that_multiply_in_it():
    assert tensorrt.has_bf16({"compute": "9.0"}) and tensorrt.has_bf16({"compute": "8.0"})
    assert not tensorrt.has_bf16({"compute": "7.5"})  # a T4: fp16 only
    assert tensorrt.has_bf16({"compute": None})  # unknown (no nvidia-smi): TensorRT's build then says


def test_a_product_of_unknown_type_is_refused_rather_than_guessed(tiny_engine: Path):
    from engine.errors import ExportError

    model = onnx.load(str(tiny_engine / read_manifest(tiny_engine).graphs["span_step"]))
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    matmul.input[0] = "from_nowhere"  # no producer, no declared type
    with pytest.raises(ExportError, match="cannot tell the element type"):
        half_graph(model, "fp16", tiny_engine)
