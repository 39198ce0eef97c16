"""Half-precision copies of an engine folder's fp32 graphs, for strongly typed TensorRT engines.

A strongly typed TensorRT network (the only kind TensorRT 11 builds) computes each
tensor in the type the ONNX graph gives it, so the precision of a native engine is
decided here, in the graph, not by builder flags. The policy is deliberately narrow:

* **matrix products run in half precision** (``MatMul``/``Gemm``: the weights, the
  projections, the attention products; nearly all of a pass's arithmetic and all of
  its weight memory), their weights stored in half, and so are embedding tables (a
  ``Gather`` only moves values);
* **everything else stays fp32**: the residual stream, RMSNorm's statistics, rotary
  angles (positions above 2,048 are not integers in fp16), softmax, and the top-k and
  entropy at the outputs. Casts are inserted at every boundary.

``fp16`` keeps 10 bits of mantissa but overflows above 65,504; ``bf16`` has fp32's
range with 7 bits. Qwen2-family models are known for a few huge activations, so which
one a model may use is measured (:func:`engine.backends.tensorrt.choose_dtype`) with the
**emulated** graph this module also writes: the same casts, but every half value is
rounded and widened back (``Cast`` to half then to fp32), so ONNX Runtime's CPU provider
computes what the half graph would, overflow to infinity included. The emulated graph
is how the conversion is tested and validated on a machine without a GPU.

Graph inputs and outputs keep their names; ids become int32 (TensorRT's native index
type) with :func:`int32_ids`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HALF_OPS = frozenset({"MatMul", "Gemm"})
"""Ops computed in half precision; every other op keeps fp32."""
DTYPES = ("fp16", "bf16")


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is in the export and gpu extras
        from engine.errors import BackendUnavailableError

        raise BackendUnavailableError("half-precision graphs need onnx: pip install -e '.[gpu]'") from exc
    return onnx


def _elem(dtype: str) -> int:
    onnx = _onnx()
    if dtype not in DTYPES:
        raise ValueError(f"half precision must be one of {DTYPES}, got {dtype!r}")
    return onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.BFLOAT16


def to_half_array(values: np.ndarray, dtype: str) -> tuple[np.ndarray, int]:
    """fp32 ``values`` rounded to ``dtype``: (the raw array to store, its ONNX element type).

    bf16 is rounded to nearest even on the bit pattern (numpy has no bf16): the upper 16
    bits of fp32 after adding half an ulp of the dropped bits; NaN stays NaN.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "fp16":
        return values.astype(np.float16), _elem(dtype)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(values), np.uint16(0x7FC0), rounded)
    return rounded, _elem(dtype)


def _half_initializer(tensor: Any, dtype: str, base_dir: Path) -> Any:
    """An fp32 initializer as a half one (same name), its data loaded from ``base_dir`` when external."""
    from onnx import numpy_helper

    onnx = _onnx()
    values = numpy_helper.to_array(tensor, base_dir=str(base_dir))
    raw, elem = to_half_array(values, dtype)
    half = onnx.TensorProto()
    half.name = tensor.name
    half.data_type = elem
    half.dims.extend(values.shape)
    half.raw_data = raw.tobytes()
    return half


def half_graph(model: Any, dtype: str, base_dir: Path, emulate: bool = False) -> Any:
    """A copy of the fp32 ``model`` with :data:`HALF_OPS` in ``dtype`` (fp16 or bf16).

    ``base_dir``: where the model's external data lies (its folder). ``emulate``: instead
    of half tensors, round every half value and widen it back (the graph stays fp32 and
    runs anywhere; its outputs are the half graph's). Weights consumed only by half ops
    are stored in half (emulated: left fp32, rounded by a cast ONNX Runtime folds at load).
    """
    onnx = _onnx()
    from onnx import helper, shape_inference

    elem = _elem(dtype)
    FLOAT = onnx.TensorProto.FLOAT
    inferred = shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    initializers = {t.name: t for t in model.graph.initializer}
    for name, tensor in initializers.items():
        types[name] = tensor.data_type
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.node[:]
    # Embedding tables (a Gather's float initializer) are stored and gathered in half too: a gather
    # only moves values, and the table is as large as the LM head.
    tables = {name for name, tensor in initializers.items() if tensor.data_type == FLOAT and any(
        node.op_type in HALF_OPS or (node.op_type == "Gather" and node.input[0] == name) for node in consumers[name])}

    def is_half(node: Any) -> bool:
        if node.op_type == "Gather":
            return node.input[0] in tables
        if node.op_type in HALF_OPS and any(i and i not in types for i in node.input):
            # a strongly typed network refuses a product of mixed types: never guess one
            from engine.errors import ExportError

            raise ExportError(f"cannot tell the element type of an input of {node.op_type} {node.name!r}; "
                              "the half-precision graph would be refused by TensorRT")
        return node.op_type in HALF_OPS and any(types.get(i) == FLOAT for i in node.input)

    def half_inputs(node: Any) -> list[bool]:
        if node.op_type == "Gather":
            return [True, False]
        return [types.get(i) == FLOAT for i in node.input]

    weights_in_half = {name for name in tables if not emulate and all(is_half(node) for node in consumers[name])}
    narrowed: dict[str, str] = {}  # fp32 name -> its half (or rounded) twin

    def narrow(name: str) -> str:
        if name in weights_in_half:
            return name
        if name not in narrowed:
            twin = f"{name}/{dtype}"
            if emulate:
                graph.node.append(helper.make_node("Cast", [name], [twin + "/h"], to=elem, name=twin + "/h"))
                graph.node.append(helper.make_node("Cast", [twin + "/h"], [twin], to=FLOAT, name=twin))
            else:
                graph.node.append(helper.make_node("Cast", [name], [twin], to=elem, name=twin))
            narrowed[name] = twin
        return narrowed[name]

    for node in model.graph.node:
        if not is_half(node):
            graph.node.append(node)
            continue
        half = onnx.NodeProto()
        half.CopyFrom(node)
        del half.input[:]
        half.input.extend(narrow(i) if h else i for i, h in zip(node.input, half_inputs(node)))
        del half.output[:]
        half.output.extend(f"{o}/{dtype}-out" for o in node.output)
        graph.node.append(half)
        for o in node.output:
            if emulate:
                graph.node.append(helper.make_node("Cast", [f"{o}/{dtype}-out"], [f"{o}/r"], to=elem, name=f"{o}/r"))
                graph.node.append(helper.make_node("Cast", [f"{o}/r"], [o], to=FLOAT, name=f"{o}/wide"))
            else:
                graph.node.append(helper.make_node("Cast", [f"{o}/{dtype}-out"], [o], to=FLOAT, name=f"{o}/wide"))
    kept = [t for t in graph.initializer if t.name not in weights_in_half]
    converted = [_half_initializer(initializers[name], dtype, base_dir) for name in sorted(weights_in_half)]
    del graph.initializer[:]
    graph.initializer.extend(kept + converted)
    del graph.value_info[:]  # the inferred types of renamed tensors would be stale; TensorRT infers its own
    return out


def int32_ids(model: Any) -> Any:
    """A copy of ``model`` whose int64 inputs and outputs are int32 (cast inside to and from int64).

    TensorRT indexes in int32; the runtime sends int32 ids and reads int32 top-k ids.
    """
    onnx = _onnx()
    from onnx import helper

    INT64, INT32 = onnx.TensorProto.INT64, onnx.TensorProto.INT32
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    renamed = {}
    head = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == INT64:
            renamed[value.name] = f"{value.name}/i64"
            value.type.tensor_type.elem_type = INT32
            head.append(helper.make_node("Cast", [value.name], [renamed[value.name]], to=INT64, name=f"{value.name}/i64"))
    tail = []
    for value in graph.output:
        if value.type.tensor_type.elem_type == INT64:
            inner = f"{value.name}/i64-out"
            for node in graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            value.type.tensor_type.elem_type = INT32
            tail.append(helper.make_node("Cast", [inner], [value.name], to=INT32, name=f"{value.name}/i32"))
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def write_half_folder(folder: Path, manifest: Any, dtype: str, dst: Path, emulate: bool = False,
                      int32: bool = False) -> dict[str, Path]:
    """``folder``'s graphs in ``dtype`` written to ``dst`` (created), weights as external data beside each
    graph; returns each role's graph path. ``manifest`` must be fp32 (an int8/int4 folder's weights are
    already rounded, and TensorRT cannot run ONNX Runtime's quantised ops)."""
    from engine.errors import ManifestError

    onnx = _onnx()
    from onnx.external_data_helper import load_external_data_for_model

    if manifest.precision != "fp32":
        raise ManifestError(
            f"engine folder {folder} is {manifest.precision}: half-precision TensorRT engines are built from fp32 "
            "graphs; convert the checkpoint again with dlm-convert --precision fp32"
        )
    dst.mkdir(parents=True, exist_ok=True)
    written = {}
    for role, name in manifest.graphs.items():
        model = onnx.load(str(folder / name), load_external_data=False)
        model = half_graph(model, dtype, folder, emulate=emulate)
        load_external_data_for_model(model, str(folder))  # the fp32 weights it keeps are still the folder's
        if int32:
            model = int32_ids(model)
        path = dst / name
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.data", size_threshold=1024)
        written[role] = path
    return written
