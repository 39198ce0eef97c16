"""The TensorRT provider's configuration (engine.backends.tensorrt_ep), proven on the CPU: every graph input
has a profile, every shape the engine sends lies inside it, and the engine caches are keyed by what
invalidates them. That TensorRT itself accepts the options needs a GPU (scripts/gpu-check.sh)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnxruntime
import pytest

from engine import Engine, SamplingParams
from engine.backends.tensorrt_ep import ProfileLimits, cache_key, profile_options, profile_shapes, provider_options
from engine.manifest import read_manifest
from trt_shapes import MERGED_ROWS, TEXT, record_shapes

HAS_TENSORRT = "TensorrtExecutionProvider" in onnxruntime.get_available_providers()
DEVICE = {"onnxruntime": "1.30.0", "tensorrt": "10.9.0", "gpu": "NVIDIA H200", "compute": "9.0", "driver": "580.1"}


def test_every_graph_input_has_a_profile_of_its_rank_and_fixed_dimensions(tiny_engine: Path):
    onnx = pytest.importorskip("onnx")
    manifest = read_manifest(tiny_engine)
    for role, name in manifest.graphs.items():
        graph = onnx.load(str(tiny_engine / name), load_external_data=False).graph
        shapes = profile_shapes(role, manifest.arch, ProfileLimits())
        assert [i.name for i in graph.input] == list(shapes)
        for declared in graph.input:
            dims = declared.type.tensor_type.shape.dim
            low, opt, high = shapes[declared.name]
            assert len(low) == len(opt) == len(high) == len(dims), declared.name
            for d, a, b, c in zip(dims, low, opt, high):
                assert a <= b <= c
                if d.HasField("dim_value"):  # fixed by the graph: the profile must say the same
                    assert a == b == c == d.dim_value, (declared.name, d.dim_value, (a, b, c))


def test_the_options_say_each_shape_in_the_providers_format(tiny_engine: Path):
    manifest = read_manifest(tiny_engine)
    options = profile_options(profile_shapes("span_step", manifest.arch, ProfileLimits(window=128, rows=8)))
    arch = manifest.arch
    kv_max = f"{arch.num_layers}x8x{arch.num_kv_heads}x128x{arch.head_dim}"
    assert options["trt_profile_max_shapes"].split(",") == [
        "span_ids:8x128", "span_pos:8x128", "span_valid:8x128", f"cache_keys:{kv_max}", f"cache_values:{kv_max}",
        "cache_valid:8x128",
    ]
    assert options["trt_profile_min_shapes"].startswith("span_ids:1x1,")


def test_every_shape_the_engine_sends_lies_inside_the_profiles(tiny_engine: Path):
    """Full and partial context passes, span steps with several candidates, the cached span, healing and
    merged steps of three documents at once: no input ever leaves its profile, so TensorRT never rebuilds."""
    arch = read_manifest(tiny_engine).arch
    limits = ProfileLimits(window=arch.max_positions, rows=MERGED_ROWS)
    for role, fed in record_shapes(tiny_engine).items():
        assert fed, role
        shapes = profile_shapes(role, arch, limits)
        for feed in fed:
            for name, shape in feed.items():
                low, _, high = shapes[name]
                assert all(a <= d <= c for a, d, c in zip(low, shape, high)), (role, name, shape, low, high)


def test_a_window_cap_is_the_engines_window(tiny_engine: Path):
    """Under TensorRT the profiles' window is the longest the engine sends: longer text is cut as a
    smaller model's window would be."""
    engine = Engine.load(tiny_engine, backend="cpu")
    full = engine.complete(TEXT[:6000], TEXT[6000:9000], SamplingParams(lengths=(8,)))
    engine.denoiser.info = replace(engine.denoiser.info, max_window=96)
    assert engine.info.window == 96
    capped = engine.complete(TEXT[:6000], TEXT[6000:9000], SamplingParams(lengths=(8,)))
    assert full.stats["context_tokens"] > 96 and capped.stats["context_tokens"] + 8 + 1 <= 96


def test_engine_caches_are_keyed_by_what_invalidates_them(tiny_engine: Path, tmp_path: Path):
    manifest = read_manifest(tiny_engine)
    limits = ProfileLimits()
    key = cache_key(manifest, limits, DEVICE)
    assert key == cache_key(read_manifest(tiny_engine), ProfileLimits(), dict(DEVICE))  # stable
    changed = [
        cache_key(manifest, limits, {**DEVICE, "gpu": "NVIDIA L4", "compute": "8.9"}),
        cache_key(manifest, limits, {**DEVICE, "tensorrt": "10.10.0"}),
        cache_key(manifest, limits, {**DEVICE, "onnxruntime": "1.31.0"}),
        cache_key(manifest, ProfileLimits(window=64), DEVICE),
    ]
    graph = next(iter(manifest.files))
    edited = replace(manifest, files={**manifest.files, graph: {**manifest.files[graph], "sha256": "0" * 64}})
    changed.append(cache_key(edited, limits, DEVICE))
    assert len({key, *changed}) == len(changed) + 1
    options = provider_options("context", manifest, tmp_path, limits, DEVICE)
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "1"
    assert Path(options["trt_engine_cache_path"]) == tmp_path / key and (tmp_path / key).is_dir()
    assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]
    assert set(options) >= {"trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs an NVIDIA GPU with onnxruntime-gpu and TensorRT")
def test_tensorrt_builds_once_and_a_second_load_reads_its_cache(tiny_engine: Path):  # pragma: no cover - GPU only
    from engine.catalog import cache_dir

    first = Engine.load(tiny_engine, backend="tensorrt-ep")
    assert first.info.backend == "tensorrt-ep" and first.info.window == first.info.arch.max_positions
    reference = Engine.load(tiny_engine, backend="cpu")
    params = SamplingParams(lengths=(4, 8, 16))
    for prefix, suffix in ((TEXT[:3000], TEXT[3000:3500]), (TEXT[:200], "")):
        got, want = first.complete(prefix, suffix, params), reference.complete(prefix, suffix, params)
        assert got.stats["steps"] >= 1 and got.stats["context_tokens"] == want.stats["context_tokens"]
    built = sorted(p.name for p in (cache_dir() / "tensorrt").rglob("*") if p.is_file())
    assert any(name.endswith(".engine") for name in built), built
    again = Engine.load(tiny_engine, backend="tensorrt-ep")
    again.complete(TEXT[:3000], TEXT[3000:3500], params)
    assert sorted(p.name for p in (cache_dir() / "tensorrt").rglob("*") if p.is_file()) == built  # nothing rebuilt
