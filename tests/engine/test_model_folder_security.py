"""An engine folder is untrusted data: what loading one may read, trust and run.

Every test starts from a copy of the shipped model (``engine/models/default``) in
``tmp_path`` and edits it the way someone handing over a folder could: paths out
of the folder, graphs whose external data lives elsewhere, an architecture the
graphs do not have, a rewritten manifest, a pickle where a checkpoint should be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import Engine
from engine.errors import CheckpointError, ManifestError
from engine.manifest import (
    CONTEXT_INPUTS,
    CONTEXT_OUTPUTS,
    MANIFEST_FILE,
    SPAN_INPUTS,
    SPAN_OUTPUTS,
    hash_cache_file,
    read_manifest,
    sha256_file,
)

DEFAULT = Path(engine.__file__).parent / "models" / "default"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A copy of the shipped engine folder, beside a file the folder must never reach."""
    (tmp_path / "secret.bin").write_bytes(b"not for the model\n" * 100)
    return Path(shutil.copytree(DEFAULT, tmp_path / "model"))


def edit_manifest(folder: Path, **changes: object) -> dict:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    for key, value in changes.items():
        data[key] = value
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    return data


def list_file(folder: Path, name: str, target: Path) -> None:
    """List ``name`` in the manifest with the real size and sha256 of ``target`` (as a tamperer would)."""
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["files"][name] = {"sha256": sha256_file(target), "bytes": target.stat().st_size}
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def refusal(folder: Path, **kwargs: object) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(folder, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# -- paths named by the manifest ---------------------------------------------------------------------


def test_a_graph_outside_the_folder_is_not_loaded(folder, tmp_path):
    """The manifest named ``../elsewhere/context.onnx`` (checksum listed): the graph outside was loaded."""
    shutil.copytree(DEFAULT, tmp_path / "elsewhere")
    outside = "../elsewhere/context.onnx"
    edit_manifest(folder, graphs={"context": outside, "span_step": "span_step.onnx"})
    list_file(folder, outside, tmp_path / "elsewhere" / "context.onnx")
    with pytest.raises(ManifestError, match=r"graph context '\.\./elsewhere/context\.onnx' is not a path inside"):
        Engine.load(folder, backend="cpu")


@pytest.mark.parametrize("field", ["graphs", "tokenizer", "files"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link"])
def test_paths_out_of_the_folder_are_refused_without_saying_whether_they_exist(folder, tmp_path, field, kind):
    """``/etc/shadow`` in ``files`` was read, and "is missing" vs "does not match" told whether it existed."""
    target = tmp_path / "secret.bin"
    name = {"dotdot": "../secret.bin", "absolute": str(target), "link": "secret-link.bin"}[kind]
    if kind == "link":
        (folder / name).symlink_to(target)
    data = json.loads((folder / MANIFEST_FILE).read_text())
    if field == "graphs":
        data["graphs"]["span_step"] = name
    elif field == "tokenizer":
        data["tokenizer"] = name
    data["files"][name] = {"sha256": "0" * 64, "bytes": 12}
    (folder / MANIFEST_FILE).write_text(json.dumps(data))

    present = refusal(folder)
    assert "is not a path inside the engine folder" in present
    target.unlink()  # the same manifest, the file outside gone: the same words
    assert refusal(folder) == present
    assert refusal(folder, verify=False) == present  # checked even when checksums are not


def test_relative_paths_inside_the_folder_still_load(folder):
    """``./`` and sub-folders are fine; an in-folder link to an in-folder file too."""
    (folder / "sub").mkdir()
    shutil.move(folder / "tokenizer.json", folder / "sub" / "tokenizer.json")
    (folder / "tokenizer-link.json").symlink_to("sub/tokenizer.json")
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["files"]["./sub/tokenizer.json"] = data["files"].pop("tokenizer.json")
    data["files"]["tokenizer-link.json"] = data["files"]["./sub/tokenizer.json"]
    data["tokenizer"] = "tokenizer-link.json"
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    engine_ = Engine.load(folder, backend="cpu")
    assert engine_.tokenizer.encode("def") == Engine.load(DEFAULT, backend="cpu").tokenizer.encode("def")


def test_a_manifest_that_is_a_link_out_of_the_folder_is_refused(folder, tmp_path):
    real = tmp_path / "manifest-elsewhere.json"
    shutil.move(folder / MANIFEST_FILE, real)
    (folder / MANIFEST_FILE).symlink_to(real)
    assert "the manifest 'manifest.json' is not a path inside" in refusal(folder)


# -- the graphs' external data --------------------------------------------------------------------------


def _tiny_graph_with_external_data(location: str):  # type: ignore[no-untyped-def]
    """``y = x + w`` where ``w`` (4 floats) is read from ``location``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w],
    )
    return onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link"])
def test_onnxruntime_itself_refuses_external_data_outside_the_model_folder(tmp_path, kind):
    """What the installed ONNX Runtime does with a graph whose weights are read from outside its folder.

    It refuses (microsoft/onnxruntime#26776, December 2025, resolves links); releases
    before 1.24, which ``onnxruntime>=1.20`` still allows, followed such paths, hence
    the engine's own check (:func:`engine.manifest.external_data_locations`).
    """
    pytest.importorskip("onnx")
    import onnxruntime as ort

    if tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 24):  # pragma: no cover - older runtimes
        pytest.skip(f"onnxruntime {ort.__version__} predates its own external-data path check")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "link": "weights.bin"}[kind]
    if kind == "link":
        (model_dir / "weights.bin").symlink_to(secret)
    onnx, model = _tiny_graph_with_external_data(location)
    onnx.save(model, str(model_dir / "m.onnx"))
    with pytest.raises(Exception, match="External data path"):
        ort.InferenceSession(str(model_dir / "m.onnx"), providers=["CPUExecutionProvider"])
    # inside the folder, the same graph loads and reads its weights
    (model_dir / "m.onnx").unlink()
    (model_dir / "weights.bin").unlink(missing_ok=True)
    (model_dir / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    onnx.save(_tiny_graph_with_external_data("weights.bin")[1], str(model_dir / "m.onnx"))
    session = ort.InferenceSession(str(model_dir / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones(4, np.float32)})[0].tolist() == [1.0, 2.0, 3.0, 4.0]


def _add_external_initializer(graph_path: Path, location: str) -> None:
    """Give a real graph one more initializer, read from ``location``."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(graph_path), load_external_data=False)
    w = numpy_helper.from_array(np.zeros(4, np.float32), "extra_weight")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    model.graph.initializer.append(w)
    graph_path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize(
    "location, message",
    [
        ("../secret.bin", "is not a path inside the engine folder"),
        ("ABSOLUTE", "is not a path inside the engine folder"),
        ("secret-link.bin", "is not a path inside the engine folder"),
        ("unlisted.bin", "which the manifest does not list"),
        ("*/_ORT_MEM_ADDR_/*", "is not a path inside the engine folder"),
    ],
)
def test_external_data_outside_the_folder_or_unlisted_is_refused(folder, tmp_path, location, message):
    """A graph (checksum updated) reading weights from outside the folder, through a link, from a file no
    checksum covers, or from ONNX Runtime's in-memory address marker: refused before the runtime sees it."""
    pytest.importorskip("onnx")
    location = str(tmp_path / "secret.bin") if location == "ABSOLUTE" else location
    (folder / "secret-link.bin").symlink_to(tmp_path / "secret.bin")
    (folder / "unlisted.bin").write_bytes(bytes(16))
    _add_external_initializer(folder / "context.onnx", location)
    list_file(folder, "context.onnx", folder / "context.onnx")
    assert message in refusal(folder)
    assert message in refusal(folder, verify=False)
    with pytest.raises(ManifestError, match="graph context.onnx"):
        Engine.load(folder, backend="cpu")


def test_a_folder_whose_weights_are_external_data_inside_it_loads(folder):
    """The layout of graphs over 2 GB: weights in ``<graph>.data`` beside the graph, listed in the manifest."""
    onnx = pytest.importorskip("onnx")
    from engine.manifest import external_data_locations

    manifest = read_manifest(folder)
    for graph in ("context.onnx", "span_step.onnx"):
        model = onnx.load(str(folder / graph))
        onnx.save_model(model, str(folder / graph), save_as_external_data=True, location=graph + ".data", size_threshold=1024)
        assert set(external_data_locations(folder / graph)) == {graph + ".data"}
    assert "which the manifest does not list" in refusal(folder, verify=False)  # not yet listed
    manifest.write(folder)  # checksums of the rewritten graphs and their data files
    assert {"context.onnx.data", "span_step.onnx.data"} <= set(read_manifest(folder).files)
    prefix, suffix = "def add(a, b):\n    return ", "\n"
    got = Engine.load(folder, backend="cpu").complete(prefix, suffix)
    assert got.text == Engine.load(DEFAULT, backend="cpu").complete(prefix, suffix).text


def test_the_external_data_walk_covers_every_field_that_holds_a_tensor():
    """:data:`ONNX_MESSAGE_FIELDS` against the ``onnx`` package's own protobuf descriptors: every field of
    these messages whose type is one of them is listed, with the right number and type, and nothing else."""
    onnx = pytest.importorskip("onnx")
    from engine.manifest import ONNX_MESSAGE_FIELDS

    entries = "StringStringEntryProto"  # also the type of every metadata_props: only external_data names files
    carriers = set(ONNX_MESSAGE_FIELDS) - {entries}
    for message, listed in ONNX_MESSAGE_FIELDS.items():
        descriptor = getattr(onnx, message).DESCRIPTOR
        reachable = {
            f.number: f.message_type.name
            for f in descriptor.fields
            if f.message_type is not None and f.message_type.name in carriers
        }
        assert reachable == {n: m for n, m in listed.items() if m != entries}, message
    assert {n: m for n, m in ONNX_MESSAGE_FIELDS["TensorProto"].items() if m == entries} == {13: entries}
    assert onnx.TensorProto.DESCRIPTOR.fields_by_number[13].name == "external_data"
    entry = onnx.StringStringEntryProto.DESCRIPTOR.fields_by_name
    assert (entry["key"].number, entry["value"].number) == (1, 2)


def test_the_external_data_walk_finds_tensors_wherever_a_model_keeps_them(tmp_path):
    """Initializers, sparse initializers, Constant attributes, subgraphs of an If, function bodies."""
    pytest.importorskip("onnx")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from engine.manifest import external_data_locations

    def tensor(name: str) -> onnx.TensorProto:
        t = numpy_helper.from_array(np.zeros(2, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", name + ".bin"
        return t

    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b"], value=tensor("in_branch_constant"))], "branch", [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])], [tensor("in_branch_initializer")],
    )
    sparse = helper.make_sparse_tensor(tensor("sparse_values"), tensor("sparse_indices"), [4])
    function = helper.make_function(
        "local", "fn", [], ["c"], [helper.make_node("Constant", [], ["c"], value=tensor("in_function"))],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["k"], value=tensor("constant")),
            helper.make_node("If", ["cond"], ["b"], then_branch=branch, else_branch=branch),
        ],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])], [tensor("initializer")],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    assert sorted(set(external_data_locations(tmp_path / "m.onnx"))) == sorted(
        f"{name}.bin" for name in (
            "in_branch_constant", "in_branch_initializer", "sparse_values", "sparse_indices", "in_function",
            "constant", "initializer",
        )
    )
    (tmp_path / "cut.onnx").write_bytes(model.SerializeToString()[:-7])
    with pytest.raises(ValueError):
        external_data_locations(tmp_path / "cut.onnx")


# -- the architecture: bounds -----------------------------------------------------------------------------


def test_an_absurd_architecture_is_refused_before_anything_loads(folder):
    """``num_layers`` 999999 loaded (the runtime sized nothing from it until a request)."""
    arch = json.loads((folder / MANIFEST_FILE).read_text())["arch"]
    edit_manifest(folder, arch={**arch, "num_layers": 999999})
    with pytest.raises(ManifestError, match=r"arch\.num_layers = 999999 \(expected an integer in 1\.\.1024\)"):
        Engine.load(folder, backend="cpu", verify=False)


@pytest.mark.parametrize(
    "arch, top_k",
    [
        ({"num_kv_heads": 0}, 2),  # a ZeroDivisionError escaped
        ({"num_layers": "6"}, 2),
        ({"rope_theta": float("nan")}, 2),
        ({"shifted": "yes"}, 2),
        ({"num_heads": 4, "num_kv_heads": 3}, 2),
        ({"head_dim": 63}, 2),
        ({}, 0),
        ({}, 10**9),
    ],
)
def test_malformed_architecture_values_are_manifest_errors(folder, arch, top_k):
    base = json.loads((folder / MANIFEST_FILE).read_text())["arch"]
    edit_manifest(folder, arch={**base, **arch}, top_k=top_k)
    message = refusal(folder, verify=False)
    assert str(folder / MANIFEST_FILE) in message
    assert next(iter(arch), "top_k") in message


def test_malformed_file_entries_are_manifest_errors(folder):
    """``files: {"x": 5}`` raised an AttributeError out of the loader."""
    data = json.loads((folder / MANIFEST_FILE).read_text())
    edit_manifest(folder, files={**data["files"], "x": 5})
    assert "files['x'] needs an integer 'bytes'" in refusal(folder)
    edit_manifest(folder, files=data["files"], graphs={**data["graphs"], "extra": "context.onnx"})
    assert "graphs must name exactly context and span_step" in refusal(folder)


def test_a_huge_manifest_is_refused_unread(folder):
    with (folder / MANIFEST_FILE).open("ab") as handle:
        handle.truncate(64 << 20)  # sparse: nothing written
    assert "over 16 MiB" in refusal(folder)


# -- sizes before checksums ---------------------------------------------------------------------------


def test_sizes_are_checked_before_any_file_is_hashed(folder, monkeypatch, tmp_path):
    """A large listed file was hashed before a later file's wrong size was noticed (a 20 GB file: 71 s)."""
    monkeypatch.setenv("DLM_LSP_CACHE", str(tmp_path / "cache"))
    big = folder / "a-large.bin"
    with big.open("wb") as handle:
        handle.truncate(64 << 20)  # sparse, but read like any file when hashed
    data = json.loads((folder / MANIFEST_FILE).read_text())
    files = {"a-large.bin": {"sha256": "0" * 64, "bytes": 64 << 20}, **data["files"]}
    files["tokenizer.json"] = {**files["tokenizer.json"], "bytes": files["tokenizer.json"]["bytes"] + 1}
    edit_manifest(folder, files=files)
    message = refusal(folder)
    assert f"tokenizer.json is {(folder / 'tokenizer.json').stat().st_size} bytes, the manifest says" in message
    cache = hash_cache_file()
    hashed = json.loads(cache.read_text()) if cache.exists() else {}
    assert str(big.resolve()) not in hashed  # the large file was never read
    # sizes right: now it is hashed, and its wrong checksum reported
    files["tokenizer.json"]["bytes"] -= 1
    edit_manifest(folder, files=files)
    assert "a-large.bin does not match its checksum" in refusal(folder)
    assert str(big.resolve()) in json.loads(cache.read_text())


def test_a_file_rewritten_in_place_with_its_mtime_set_back_is_hashed_again(folder, monkeypatch, tmp_path):
    """Remembered hashes were keyed by (path, size, mtime, inode): a graph changed in place, its mtime restored
    with ``os.utime``, passed verification on the remembered hash."""
    monkeypatch.setenv("DLM_LSP_CACHE", str(tmp_path / "cache"))
    read_manifest(folder)  # remembers the graphs' hashes
    graph = folder / "span_step.onnx"
    before = graph.stat()
    with graph.open("r+b") as handle:
        handle.seek(-10, os.SEEK_END)
        byte = handle.read(1)[0]
        handle.seek(-10, os.SEEK_END)
        handle.write(bytes([byte ^ 0xFF]))
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = graph.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert "span_step.onnx does not match its checksum" in refusal(folder)


# -- the architecture against the graphs' shapes ----------------------------------------------------------


def test_the_graph_interface_table_names_the_manifests_inputs_and_outputs():
    from engine.backends.onnxruntime import GRAPH_INTERFACE

    assert list(GRAPH_INTERFACE["context"]["inputs"]) == list(CONTEXT_INPUTS)
    assert list(GRAPH_INTERFACE["context"]["outputs"]) == list(CONTEXT_OUTPUTS)
    assert list(GRAPH_INTERFACE["span_step"]["inputs"]) == list(SPAN_INPUTS)
    assert list(GRAPH_INTERFACE["span_step"]["outputs"]) == list(SPAN_OUTPUTS)


@pytest.mark.parametrize(
    "field, value, graph_value",
    [("num_layers", 7, 6), ("num_kv_heads", 4, 2), ("head_dim", 32, 64), ("top_k", 3, 2)],
)
def test_an_architecture_the_graphs_do_not_have_is_refused_naming_both_values(folder, field, value, graph_value):
    data = json.loads((folder / MANIFEST_FILE).read_text())
    if field == "top_k":
        edit_manifest(folder, top_k=value)
    else:
        arch = {**data["arch"], field: value}
        if field == "num_kv_heads":
            arch["num_heads"] = 4
        edit_manifest(folder, arch=arch)
    label = field if field == "top_k" else f"arch.{field}"
    with pytest.raises(ManifestError, match=rf"{label}: manifest {value}, graph context\.onnx \w+ dimension \d is {graph_value}"):
        Engine.load(folder, backend="cpu")


# -- catalog folders: the manifest pinned outside the folder --------------------------------------------


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny catalog model pulled (downloaded from a local hub cache, converted) by the real pull."""
    pytest.importorskip("torch")
    pytest.importorskip("huggingface_hub")
    from hub_cache import tiny_catalog

    root = tmp_path_factory.mktemp("catalog")
    env = {**os.environ, **tiny_catalog(root)}
    return root, env


def _pull(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlm_lsp", "models", "pull", "tiny-dream", "--precision", "fp32"],
        capture_output=True, text=True, env=env, timeout=600,
    )


def _change_a_weight(graph: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    for i, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.size > 16:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(-values, tensor.name))
            break
    else:  # pragma: no cover - every graph has float weights
        raise AssertionError("no float initializer")
    onnx.save(model, str(graph))


@pytest.mark.slow
def test_a_catalog_folder_with_a_rewritten_graph_and_manifest_is_refused(pulled, monkeypatch):
    """A tampered graph with its checksum updated in the manifest loaded; the manifest's sha256 recorded by
    the pull (outside the folder) now refuses it, and a pull converts it again."""
    pytest.importorskip("onnx")
    from engine import catalog

    _, env = pulled
    proc = _pull(env)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip())
    monkeypatch.setenv("DLM_LSP_CACHE", env["DLM_LSP_CACHE"])
    monkeypatch.setenv("DLM_LSP_CATALOG", env["DLM_LSP_CATALOG"])
    Engine.load(catalog.resolve("tiny-dream"), backend="cpu")
    pinned = sha256_file(folder / MANIFEST_FILE)

    # a weight of the span step changed, the manifest rewritten to match: integrity holds
    before = sha256_file(folder / "span_step.onnx")
    _change_a_weight(folder / "span_step.onnx")
    assert sha256_file(folder / "span_step.onnx") != before
    manifest = read_manifest(folder, verify=False)
    manifest.write(folder)
    read_manifest(folder)
    with pytest.raises(ManifestError, match="not the one recorded when the folder was installed.*models pull tiny-dream --force"):
        Engine.load(catalog.resolve("tiny-dream"), backend="cpu")
    with pytest.raises(ManifestError, match="not the one recorded"):
        Engine.load(folder, backend="cpu", verify=False)  # by path too, checksums off or not
    record = json.loads((folder.parent.parent / catalog.CURRENT_FILE).read_text())
    assert record["manifests"] == {f"{folder.parent.name}/fp32": pinned}  # outside the folder

    again = _pull(env)
    assert again.returncode == 0 and "cannot be trusted" in again.stderr and "exporting" in again.stderr
    Engine.load(catalog.resolve("tiny-dream"), backend="cpu")

    # a folder from before pulls recorded manifests: refused until pulled again
    record = json.loads((folder.parent.parent / catalog.CURRENT_FILE).read_text())
    del record["manifests"]
    (folder.parent.parent / catalog.CURRENT_FILE).write_text(json.dumps(record))
    with pytest.raises(ManifestError, match="no pull recorded its manifest's checksum"):
        Engine.load(catalog.resolve("tiny-dream"), backend="cpu")


# -- training checkpoints are not pickles to run -------------------------------------------------------


class _WritesMarker:
    """Unpickled, calls ``open(marker, "w")``: what any code a crafted checkpoint names would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_dlm_train_export_does_not_run_a_pickled_checkpoint(tmp_path):
    """``dlm-train export`` unpickled RUN/checkpoint.pt with ``weights_only=False``: a crafted one ran code."""
    torch = pytest.importorskip("torch")
    from dataclasses import asdict

    from engine.train.trainer import TrainConfig, main

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(asdict(TrainConfig())))
    marker = tmp_path / "marker"
    torch.save({"model": {}, "step": 1, "payload": _WritesMarker(marker)}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="holds more than tensors and plain data"):
        main(["export", str(run), str(tmp_path / "out")])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
