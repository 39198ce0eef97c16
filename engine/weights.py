"""An exported graph's weights, rewritten one tensor at a time: consolidated, or quantised to int8.

:func:`consolidate` gathers the weights the ONNX exporter wrote (one file per
tensor past 2 GB) into one ``<graph>.data`` file, or inline for a small graph.
:func:`quantize_int8` quantises the matrices. Both read one tensor, write it and
drop it before reading the next, so the memory they need is about the largest
tensor, not the model: that is what lets a 2B model convert on a 24 GB machine.

int8 quantisation
-----------------

The graphs are quantised the way ONNX Runtime's dynamic quantiser does it (and
its kernels expect): every ``MatMul`` whose weight is a constant becomes

    DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q, A_zero, W_zero) -> Cast -> Mul(A_scale * W_scale)

with ``W_q`` int8, symmetric, one scale per output channel (the names
``<W>_quantized``, ``<W>_scale``, ``<W>_zero_point`` are the ones that quantiser
writes), one ``DynamicQuantizeLinear`` per activation shared by every matrix it
feeds (q, k and v), and ONNX Runtime fuses the chain into its int8 matrix
multiply when it loads the graph. Activations stay float.

Why our own pass and not ``onnxruntime.quantization.quantize_dynamic``: that
one holds the whole fp32 graph, a shape-inferred copy of it and the result in
memory at once (8 GB for a 0.5B model's two graphs, 16 bytes per parameter,
measured), which puts a 2B model beyond a 24 GB machine. Here a weight is read
from the fp32 graph's external data, quantised a block of columns at a time and
written out before the next is read: the peak is about the largest matrix
(its fp32 values plus its int8 codes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

EXTERNAL_DATA_SUFFIX = ".data"
"""``<graph>.data`` beside ``<graph>`` holds its weights when they are external."""

ALIGN = 64
"""Offsets of external tensors are aligned (ONNX Runtime can map aligned data)."""


def quantize_int8(src: Path, dst: Path, inline_limit: int) -> None:
    """Quantise ``src`` (an ONNX model, its weights inline or in external data) into ``dst``.

    The result keeps its weights in ``<dst>.data`` when they pass ``inline_limit``
    bytes, like :func:`engine.export._save_graph`.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def quantizable(node: Any) -> bool:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in init:
            return False
        weight = init[node.input[1]]
        return weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2

    nodes = list(graph.node)
    target_at = {i for i, node in enumerate(nodes) if quantizable(node)}
    targets = [nodes[i] for i in sorted(target_at)]
    quantized = {node.input[1] for node in targets}
    # bytes the result will hold: int8 matrices (+ scale, zero point) and every other initializer as is
    out_bytes = sum(
        int(np.prod(t.dims)) * (1 if t.name in quantized else np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)
        for t in graph.initializer
    )
    external = out_bytes > inline_limit
    writer = _TensorWriter(dst, external)
    base_dir = str(src.parent)
    new_init: list[Any] = []
    try:
        for tensor in graph.initializer:
            if tensor.name in quantized and uses.get(tensor.name, 0) == sum(
                1 for node in targets if node.input[1] == tensor.name
            ):
                continue  # replaced by its int8 form below
            new_init.append(writer.add(numpy_helper.to_array(tensor, base_dir=base_dir), tensor.name))
        new_nodes: list[Any] = []
        activations: dict[str, tuple[str, str, str]] = {}
        done: set[str] = set()
        for i, node in enumerate(nodes):
            if i not in target_at:
                new_nodes.append(node)
                continue
            a, w = node.input
            if a not in activations:
                q = (f"{a}_quantized", f"{a}_scale", f"{a}_zero_point")
                new_nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(q), name=f"{a}_QuantizeLinear"))
                activations[a] = q
            a_q, a_scale, a_zero = activations[a]
            if w not in done:
                codes, scale = quantize_columns(numpy_helper.to_array(init[w], base_dir=base_dir))
                new_init.append(writer.add(codes, f"{w}_quantized"))
                new_init.append(writer.add(scale, f"{w}_scale"))
                new_init.append(writer.add(np.zeros(scale.shape, np.int8), f"{w}_zero_point"))
                done.add(w)
            out = node.output[0]
            stem = node.name or out
            new_nodes += [
                helper.make_node(
                    "MatMulInteger", [a_q, f"{w}_quantized", a_zero, f"{w}_zero_point"], [f"{out}_int32"],
                    name=f"{stem}_quant",
                ),
                helper.make_node("Cast", [f"{out}_int32"], [f"{out}_float"], to=TensorProto.FLOAT, name=f"{stem}_cast"),
                helper.make_node("Mul", [a_scale, f"{w}_scale"], [f"{out}_scales"], name=f"{stem}_scales_mul"),
                helper.make_node("Mul", [f"{out}_float", f"{out}_scales"], [out], name=f"{stem}_output_mul"),
            ]
    finally:
        writer.close()
    del graph.initializer[:]
    graph.initializer.extend(new_init)
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.save_model(model, str(dst))


COLUMNS_PER_BLOCK = 1024
"""Columns quantised at a time: temporaries stay a slice of the matrix, not copies of it."""


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of a (in, out) float matrix and one scale per output column (``codes * scale``)."""
    codes = np.empty(weight.shape, np.int8)
    scale = np.empty(weight.shape[1], np.float32)
    for start in range(0, weight.shape[1], COLUMNS_PER_BLOCK):
        block = weight[:, start : start + COLUMNS_PER_BLOCK]
        step = np.abs(block).max(axis=0) / np.float32(127.0)
        step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
        codes[:, start : start + COLUMNS_PER_BLOCK] = np.clip(np.rint(block / step), -127, 127)
        scale[start : start + COLUMNS_PER_BLOCK] = step
    return codes, scale


def consolidate(src: Path, dst: Path, inline_limit: int) -> None:
    """Copy the model ``src`` to ``dst`` with every weight inline, or (past ``inline_limit`` bytes) in ``<dst>.data``."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    total = sum(
        int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize for t in graph.initializer
    )
    writer = _TensorWriter(dst, total > inline_limit)
    base_dir = str(src.parent)
    try:
        tensors = [writer.add(numpy_helper.to_array(t, base_dir=base_dir), t.name) for t in graph.initializer]
    finally:
        writer.close()
    for node in graph.node:  # the exporter also writes Constant nodes' tensors outside: they come back inline
        for attribute in node.attribute:
            for tensor in (attribute.t, *attribute.tensors):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor, base_dir=base_dir), tensor.name))
    del graph.initializer[:]
    graph.initializer.extend(tensors)
    onnx.save_model(model, str(dst))


class _TensorWriter:
    """Turns arrays into initializers: inline, or appended to one external data file."""

    def __init__(self, graph: Path, external: bool) -> None:
        self.graph = graph
        self.location = graph.name + EXTERNAL_DATA_SUFFIX
        self.handle: BinaryIO | None = (graph.parent / self.location).open("wb") if external else None
        self.offset = 0

    def add(self, array: np.ndarray, name: str) -> Any:
        from onnx import TensorProto, helper, numpy_helper

        array = np.ascontiguousarray(array)
        if self.handle is None or array.nbytes < 1024:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        pad = -self.offset % ALIGN
        self.handle.write(b"\0" * pad)
        self.offset += pad
        self.handle.write(array.tobytes())
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return tensor

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
