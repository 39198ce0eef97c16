"""ONNX Runtime's optimised graphs, kept in the model cache so that a CPU session opens in half the time.

Opening a session spends most of its time optimising the graph (fusing quantised matrix
products, normalisations and activations across a graph of thousands of nodes), the
same work at every start: at the Open-dCoder-0.5B shape (int8) the two sessions took
1.85 s and 1.45 s, of which about 1.1 s and 0.8 s was optimisation. The first load of a
folder saves each graph as ONNX Runtime optimised it (level *extended*: fusions that hold
on any CPU, none of the hardware-specific layouts), and later loads open that.

The saved graph holds no weights: every initializer ONNX Runtime kept as it was (by name,
type, shape and bytes, all compared when the graph is saved) points at the engine folder's
own ``weights.data`` at its own offset, and the session reads it from there
(``session.model_external_initializers_file_folder_path``). Both sessions still share one
file (one copy in memory), and the cache costs kilobytes. What the optimiser made (folded
constants, under a megabyte) is stored inline.

Keyed by the sha256 of every file the manifest lists and the ONNX Runtime version: a
reconversion or an upgrade optimises again. Saving needs the ``onnx`` package (the
``export`` extra, which pulling a model already needs); without it, or when anything in
saving fails, the session is optimised at load as before. The saved graph is in the user's
own cache, trusted as its catalog records are (docs/engine.md, "What loading an engine
folder trusts"); the weights it reads are the folder's, checked as always.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.manifest import Manifest

log = logging.getLogger(__name__)

FORMAT = 1
FOLDER_OPTION = "session.model_external_initializers_file_folder_path"


def cache_key(manifest: Manifest, role: str, version: str) -> str:
    """16 hex digits naming the optimised ``role`` graph of the folder ``manifest`` describes, under ONNX
    Runtime ``version``, on this kind of CPU (a cache shared between machines keeps one per architecture)."""
    import platform

    identity = {"format": FORMAT, "role": role, "graph": manifest.graphs[role], "onnxruntime": version,
                "machine": platform.machine(),
                "files": {name: meta.get("sha256") for name, meta in sorted(manifest.files.items())}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cached_path(manifest: Manifest, role: str) -> Path:
    """Where the optimised ``role`` graph of ``manifest``'s folder is kept."""
    import onnxruntime as ort

    from engine.catalog import cache_dir

    return cache_dir() / "ort-optimized" / cache_key(manifest, role, ort.__version__) / f"{role}.onnx"


def optimized_model(folder: Path, manifest: Manifest, role: str, options: Callable[[], Any]) -> bytes | None:
    """The optimised ``role`` graph of ``folder`` (bytes, its weights in the folder), saved first if it is not
    yet; None when it cannot be (no ``onnx``, a graph past 2 GB without external weights, a read-only
    cache): the caller then opens the graph as it is. ``options()`` gives the session options to optimise
    with (the engine's)."""
    try:
        path = cached_path(manifest, role)
        if path.is_file():
            return path.read_bytes()
    except OSError as exc:  # gone meanwhile (another process dropped it), unreadable: optimise at load
        log.debug("the kept %s graph could not be read: %s", role, exc)
        return None
    try:
        import onnx  # noqa: F401
    except ImportError:
        log.debug("no onnx package: %s is optimised at every load", role)
        return None
    try:
        return _save(folder, manifest, role, options, path)
    except Exception as exc:  # noqa: BLE001 - an optimisation cache must never stop a load
        log.warning("could not keep the optimised %s graph (%s); it is optimised at every load", role, exc)
        return None


def keep(folder: Path, manifest: Manifest) -> int:
    """Optimise and keep both graphs of ``folder`` now (after a conversion, so that the first load is fast),
    one at a time and without prepacking, so that this needs no more memory than one graph's weights.
    Returns how many graphs are kept."""
    from functools import partial

    from engine.backends.onnxruntime import session_options

    lean = {"session.disable_prepacking": "1"}  # optimized_model never raises: a conversion is never stopped
    return sum(optimized_model(folder, manifest, role, partial(session_options, manifest, role, config=lean))
               is not None for role in manifest.graphs)


def forget(manifest: Manifest, role: str) -> None:
    """Drop the kept ``role`` graph (one that would not open), so that the next load saves it again."""
    try:
        cached_path(manifest, role).unlink(missing_ok=True)
    except OSError as exc:  # a read-only cache: the load goes on without it
        log.debug("could not drop the kept %s graph: %s", role, exc)


def reading_weights_from(options: Any, folder: Path) -> Any:
    """``options`` set to open an optimised graph whose weights are in ``folder``."""
    options.add_session_config_entry(FOLDER_OPTION, str(folder))
    return options


def _save(folder: Path, manifest: Manifest, role: str, options: Callable[[], Any], path: Path) -> bytes:
    import onnx
    import onnxruntime as ort

    graph = folder / manifest.graphs[role]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        saved = Path(work) / "model.onnx"
        opts = options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(saved)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(str(saved), load_external_data=False)
        original = {t.name: t for t in onnx.load(str(graph), load_external_data=False).graph.initializer}
        referenced = 0
        for tensor in model.graph.initializer:
            data = _tensor_bytes(tensor, Path(work))
            source = original.get(tensor.name)
            if (source is not None and _external(source) and source.data_type == tensor.data_type
                    and list(source.dims) == list(tensor.dims) and np.array_equal(_tensor_bytes(source, folder), data)):
                del tensor.external_data[:]
                tensor.external_data.extend(source.external_data)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
                referenced += data.size
            elif _external(tensor):
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = data.tobytes()
        blob = model.SerializeToString()
        tmp = Path(work) / "kept.onnx"  # renamed into place whole: a reader never sees half a graph
        tmp.write_bytes(blob)
        tmp.replace(path)
    log.info("kept the optimised %s graph (%d KB; %d MB of weights read from %s)", role, len(blob) // 1024,
             referenced // 1_000_000, folder)
    return blob


def _external(tensor: Any) -> bool:
    return any(entry.key == "location" for entry in tensor.external_data)


def _tensor_bytes(tensor: Any, base: Path) -> np.ndarray:
    """An initializer's stored bytes: inline, or read from its external file under ``base``."""
    if not _external(tensor):
        return np.frombuffer(tensor.raw_data, np.uint8) if tensor.HasField("raw_data") else np.frombuffer(
            _typed_bytes(tensor), np.uint8)
    fields = {entry.key: entry.value for entry in tensor.external_data}
    offset, length = int(fields.get("offset", 0)), fields.get("length")
    with open(base / fields["location"], "rb") as handle:
        handle.seek(offset)
        return np.frombuffer(handle.read(int(length)) if length is not None else handle.read(), np.uint8)


def _typed_bytes(tensor: Any) -> bytes:
    from onnx import numpy_helper

    return bytes(numpy_helper.to_array(tensor).tobytes())
