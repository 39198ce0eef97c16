"""ONNX Runtime's optimised graphs kept in the model cache (engine.backends.ort_optimized): a second load opens
them instead of optimising again, they read their weights from the engine folder (the cache holds no weights),
and they answer exactly as the graphs optimised at load do."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine import Engine
from engine.backends import ort_optimized
from engine.backends.onnxruntime import OnnxRuntimeDenoiser
from engine.manifest import read_manifest

onnx = pytest.importorskip("onnx")


@pytest.fixture()
def external_engine(tiny_engine: Path, tmp_path: Path, monkeypatch) -> Path:
    """The tiny engine folder with its weights in data files beside the graphs, as a real-size folder has them,
    and a model cache of its own."""
    monkeypatch.setenv("DLM_LSP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "external"
    shutil.copytree(tiny_engine, folder)
    manifest = read_manifest(folder)
    for name in manifest.graphs.values():
        model = onnx.load(str(folder / name))
        onnx.save_model(model, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.data", size_threshold=1024)
    manifest.write(folder)
    return folder


def _answers(denoiser: OnnxRuntimeDenoiser) -> list[np.ndarray]:
    ids = np.arange(3, 60) % denoiser.info.arch.vocab_size
    span = np.arange(20, 30)
    cache, first = denoiser.encode_context(ids, np.arange(len(ids)), np.setdiff1d(np.arange(len(ids)), span), span)
    step = denoiser.step(cache, ids[None, 19:30], np.arange(19, 30)[None], np.ones((1, 11), bool),
                         np.setdiff1d(np.arange(len(ids)), span)[None])
    return [cache.keys, cache.values, first.ids, first.probs, first.entropy, step.ids, step.probs, step.entropy]


def test_the_second_load_opens_the_kept_graphs_which_read_the_folders_weights(external_engine: Path):
    manifest = read_manifest(external_engine)
    paths = {role: ort_optimized.cached_path(manifest, role) for role in manifest.graphs}
    assert not any(p.exists() for p in paths.values())
    first = Engine.load(external_engine, backend="cpu")
    assert all(p.is_file() for p in paths.values())
    assert all(s._model_path is None and s._model_bytes for s in first.denoiser.sessions.values())  # saved, opened
    weights = sum((external_engine / f"{name}.data").stat().st_size for name in manifest.graphs.values())
    for role, path in paths.items():
        kept = onnx.load(str(path), load_external_data=False)
        external = [t for t in kept.graph.initializer if t.external_data]
        locations = {e.value for t in external for e in t.external_data if e.key == "location"}
        assert external and locations == {f"{manifest.graphs[role]}.data"}  # the folder's own weights
        assert path.stat().st_size < 0.1 * weights
    mtimes = {role: p.stat().st_mtime_ns for role, p in paths.items()}
    second = Engine.load(external_engine, backend="cpu")
    assert all(s._model_path is None and s._model_bytes for s in second.denoiser.sessions.values())  # from the cache
    assert {role: p.stat().st_mtime_ns for role, p in paths.items()} == mtimes
    plain = OnnxRuntimeDenoiser(external_engine, manifest, "cpu")
    for got, want in zip(_answers(second.denoiser), _answers(plain)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_a_broken_kept_graph_falls_back_to_optimising_at_load(external_engine: Path, caplog):
    manifest = read_manifest(external_engine)
    Engine.load(external_engine, backend="cpu")
    ort_optimized.cached_path(manifest, "context").write_bytes(b"not a graph")
    engine = Engine.load(external_engine, backend="cpu")
    assert engine.denoiser.sessions["context"]._model_path is not None
    assert "did not open" in caplog.text
    assert not ort_optimized.cached_path(manifest, "context").exists()  # dropped: the next load keeps a fresh one
    assert Engine.load(external_engine, backend="cpu").denoiser.sessions["context"]._model_bytes
    assert ort_optimized.cached_path(manifest, "context").stat().st_size > 1000
    for got, want in zip(_answers(engine.denoiser), _answers(OnnxRuntimeDenoiser(external_engine, manifest, "cpu"))):
        assert np.array_equal(got, want)


def test_the_key_follows_every_file_and_the_runtime(external_engine: Path, monkeypatch):
    manifest = read_manifest(external_engine)
    key = ort_optimized.cache_key(manifest, "context", "1.32.0")
    name = next(iter(manifest.files))
    assert key == ort_optimized.cache_key(read_manifest(external_engine), "context", "1.32.0")
    assert len({key,
                ort_optimized.cache_key(manifest, "span_step", "1.32.0"),
                ort_optimized.cache_key(manifest, "context", "1.33.0"),
                ort_optimized.cache_key(replace(manifest, files={**manifest.files, name: {"sha256": "0" * 64}}),
                                        "context", "1.32.0")}) == 4
    monkeypatch.setitem(sys.modules, "onnx", None)  # the serving install has no onnx: nothing is kept
    assert ort_optimized.optimized_model(external_engine, manifest, "context", lambda: None) is None


def test_folders_being_converted_are_not_cached(external_engine: Path):
    """Conversion validates graphs whose manifest lists no files yet: such graphs must never be kept (their
    key would not name them)."""
    manifest = replace(read_manifest(external_engine), files={})
    OnnxRuntimeDenoiser(external_engine, manifest, "cpu", keep_optimized=True)
    assert not (ort_optimized.cached_path(manifest, "context")).exists()


def test_a_conversion_keeps_the_optimised_graphs_so_the_first_load_is_fast(tiny_checkpoint: Path, tmp_path: Path,
                                                                           monkeypatch):
    pytest.importorskip("torch")
    from engine.export import convert

    monkeypatch.setenv("DLM_LSP_CACHE", str(tmp_path / "cache"))
    said: list[str] = []
    manifest = convert(tiny_checkpoint, tmp_path / "fp32", precision="fp32", progress=said.append)
    paths = [ort_optimized.cached_path(manifest, role) for role in manifest.graphs]
    assert all(p.is_file() for p in paths) and any("optimised graphs" in line for line in said)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    engine = Engine.load(tmp_path / "fp32", backend="cpu")
    assert all(s._model_bytes for s in engine.denoiser.sessions.values())
    assert [p.stat().st_mtime_ns for p in paths] == mtimes  # opened as kept, nothing optimised at load
