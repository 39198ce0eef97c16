"""An exported graph's weights, rewritten one tensor at a time: consolidated, or quantised.

:func:`consolidate` gathers the weights the ONNX exporter wrote (one file per
tensor past 2 GB) into one ``<graph>.data`` file, or inline for a small graph.
:func:`quantize` quantises the matrices to int8 or to 4 bits. Both read one
tensor, write it and drop it before reading the next, so the memory they need is
about the largest tensor, not the model: that is what lets a 2B model convert on
a 24 GB machine.

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

4-bit weights (int4)
--------------------

Every such ``MatMul`` becomes ONNX Runtime's ``com.microsoft.MatMulNBits``: the
weight stored as (N, K / 32, 16) bytes, two 4-bit codes per byte packed low
first along K, one float scale per block of 32 inputs of an output channel
(``<W>_q4``, ``<W>_q4_scale``), the zero point left at its default 8, so that
a weight is ``(code - 8) x scale``. The scale is the block's value of largest
magnitude over -8 (its sign kept), so that value is exact and the other end of
the range keeps 7 steps. ``accuracy_level`` 4 lets the kernel quantise the
activations to int8 per block and use the CPU's int8 dot products. Nearly half
the bytes of int8; on a CPU without VNNI it is faster only one row at a time, and
what it costs in agreement is measured by the conversion's validation and by
``scripts/precision_compare.py`` (docs/engine.md, "Precision").

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


INT4_BLOCK = 32
"""Inputs per 4-bit scale (``MatMulNBits``' ``block_size``): llama.cpp's Q4_0 block, a power of two >= 16."""

INT4_ACCURACY_LEVEL = 4
"""``MatMulNBits``' ``accuracy_level``: 4 computes with int8 activations (the CPU's int8 dot products)."""

QUANTIZED = ("int8", "int4")
"""The precisions :func:`quantize` writes."""

BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1.0, "int4": 0.5 + 4 / INT4_BLOCK}
"""Bytes a matrix weight takes at each precision (int4: its code and its share of a float scale)."""


def quantize_int8(src: Path, dst: Path, inline_limit: int) -> None:
    """:func:`quantize` to int8."""
    quantize(src, dst, inline_limit, "int8")


def quantize(src: Path, dst: Path, inline_limit: int, precision: str) -> None:
    """Quantise ``src`` (an ONNX model, its weights inline or in external data) into ``dst``.

    ``precision`` is ``int8`` or ``int4`` (see the module's docstring). The result
    keeps its weights in ``<dst>.data`` when they pass ``inline_limit`` bytes,
    like :func:`consolidate`.
    """
    if precision not in QUANTIZED:
        raise ValueError(f"precision {precision!r}: quantize writes {' or '.join(QUANTIZED)}")
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
    per_weight = BYTES_PER_WEIGHT[precision]
    out_bytes = sum(
        int(np.prod(t.dims)) * (per_weight if t.name in quantized else np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)
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
            if precision == "int4":
                weight = numpy_helper.to_array(init[w], base_dir=base_dir) if w not in done else None
                new_nodes.append(_int4_node(node, w, weight, writer, new_init, init[w].dims))
                done.add(w)
                continue
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
    if precision == "int4" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(dst))


def _int4_node(node: Any, w: str, weight: np.ndarray | None, writer: _TensorWriter, new_init: list[Any], dims: Any) -> Any:
    """The ``MatMulNBits`` node replacing ``node``; writes the weight's codes and scales unless already written."""
    from onnx import helper

    if weight is not None:
        packed, scales = quantize_blocks_int4(weight)
        new_init.append(writer.add(packed, f"{w}_q4"))
        new_init.append(writer.add(scales, f"{w}_q4_scale"))
    k, n = (int(d) for d in dims)
    return helper.make_node(
        "MatMulNBits", [node.input[0], f"{w}_q4", f"{w}_q4_scale"], list(node.output),
        name=f"{node.name or node.output[0]}_q4", domain="com.microsoft",
        K=k, N=n, bits=4, block_size=INT4_BLOCK, accuracy_level=INT4_ACCURACY_LEVEL,
    )


def quantize_blocks_int4(weight: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """4-bit codes of a (K, N) float matrix, packed as ``MatMulNBits`` reads them, and their scales.

    Returns ``packed`` (N, ceil(K / block), block / 2) uint8, two codes per byte,
    the lower K index in the low nibble, and ``scales`` (N * blocks,) float32;
    ``(code - 8) * scale`` is the weight. K is padded with zeros to whole blocks.
    """
    k, n = weight.shape
    blocks = -(-k // block)
    packed = np.empty((n, blocks, block // 2), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    for start in range(0, n, COLUMNS_PER_BLOCK):
        cols = np.zeros((min(COLUMNS_PER_BLOCK, n - start), blocks * block), np.float32)
        cols[:, :k] = weight[:, start : start + COLUMNS_PER_BLOCK].T
        cols = cols.reshape(len(cols), blocks, block)
        widest = np.take_along_axis(cols, np.abs(cols).argmax(axis=2)[..., None], axis=2)[..., 0]
        step = np.where(widest != 0, widest / np.float32(-8.0), np.float32(1.0)).astype(np.float32)
        codes = (np.clip(np.rint(cols / step[..., None]), -8, 7) + 8).astype(np.uint8)
        packed[start : start + len(cols)] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales[start : start + len(cols)] = step
    return packed, scales.reshape(-1)


def dequantize_blocks_int4(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The (K, N) float matrix that :func:`quantize_blocks_int4`'s codes stand for."""
    n, blocks, half = packed.shape
    codes = np.empty((n, blocks, 2 * half), np.float32)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    values = (codes - 8) * scales.reshape(n, blocks, 1)
    return values.reshape(n, -1)[:, :k].T.copy()


SHARED_DATA_FILE = "weights.data"
"""One file beside the graphs holding the weights of both, each tensor once (:func:`share_weights`)."""

PAGE = 4096
"""Offsets in :data:`SHARED_DATA_FILE` are page-aligned: ONNX Runtime maps the file instead of reading it."""


def share_weights(folder: Path, graphs: list[str]) -> None:
    """Rewrite ``graphs`` (in ``folder``, weights in ``<graph>.data`` files) so that they keep every
    tensor in one :data:`SHARED_DATA_FILE`, each tensor stored once.

    The context and span-step graphs hold the same weights under names the exporter chose
    independently: a tensor of identical type, shape and bytes is written once and given one
    name in every graph that uses it (a model parameter's own, ``model.…``, else ``shared.<n>``). ONNX Runtime maps external data
    into memory, so both sessions (and a second server process) read the same pages of the
    page cache instead of each holding its own copy; the folder is half the size on disk.
    Tensors under 1 KB stay inline. Streams one tensor at a time, like :func:`quantize`.
    """
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def size(t: Any) -> int:
        return int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize

    models = {name: onnx.load(str(folder / name), load_external_data=False) for name in graphs}
    if any(e.value == SHARED_DATA_FILE for m in models.values() for t in m.graph.initializer for e in t.external_data):
        raise ValueError(f"{folder}: the graphs already share {SHARED_DATA_FILE}")

    # names a new name must not take (the large initializers' own names are all replaced)
    taken = {n for m in models.values() for node in m.graph.node for n in node.output}
    taken |= {v.name for m in models.values() for v in (*m.graph.input, *m.graph.output, *m.graph.value_info)}
    taken |= {t.name for m in models.values() for t in m.graph.initializer if size(t) < 1024}
    written: dict[tuple[int, tuple[int, ...], str], tuple[str, int, int]] = {}
    names: set[str] = set()
    offset = 0
    with (folder / SHARED_DATA_FILE).open("wb") as out:
        for graph, model in models.items():
            if any(attr.g.node or attr.graphs for node in model.graph.node for attr in node.attribute):
                raise ValueError(f"{graph}: subgraphs are not expected in an exported graph")
            renames: dict[str, str] = {}
            kept: list[Any] = []
            for tensor in model.graph.initializer:
                array = np.ascontiguousarray(numpy_helper.to_array(tensor, base_dir=str(folder)))
                if array.nbytes < 1024:
                    kept.append(numpy_helper.from_array(array, tensor.name))
                    continue
                data = array.tobytes()
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())
                if key not in written:
                    name = tensor.name  # a parameter keeps its name (recovering a checkpoint reads it)
                    if not name.startswith("model.") or name in names or name in taken:
                        name = f"shared.{len(written)}"
                        while name in taken or name in names:
                            name += "_"
                    names.add(name)
                    pad = -offset % PAGE
                    out.write(b"\0" * pad)
                    offset += pad
                    out.write(data)
                    written[key] = (name, offset, len(data))
                    offset += len(data)
                name, at, length = written[key]
                renames[tensor.name] = name
                if any(t.name == name for t in kept):
                    continue  # the same bytes twice in one graph: one initializer serves both uses
                shared = TensorProto(name=name, data_type=tensor.data_type, dims=tensor.dims)
                shared.data_location = TensorProto.EXTERNAL
                for k, v in (("location", SHARED_DATA_FILE), ("offset", str(at)), ("length", str(length))):
                    entry = shared.external_data.add()
                    entry.key, entry.value = k, v
                kept.append(shared)
                del array, data
            for node in model.graph.node:
                node.input[:] = [renames.get(i, i) for i in node.input]
            for value in model.graph.input:  # initializers listed as inputs too (older exports)
                value.name = renames.get(value.name, value.name)
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept)
    for graph, model in models.items():
        onnx.save_model(model, str(folder / graph))
        (folder / (graph + EXTERNAL_DATA_SUFFIX)).unlink(missing_ok=True)


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
