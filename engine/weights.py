"""A graph's weights, written and quantised one tensor at a time.

:func:`quantize_model` quantises the matrices of a graph to int8 or to 4 bits,
reading each weight through a :data:`Reader` (a graph file's own data, or the
checkpoint itself: :mod:`engine.binding`) and writing it through a
:class:`TensorWriter` (inline, or into one external data file, each tensor once
even when two graphs use it). A weight is read, quantised, written and dropped
before the next is read, so the memory conversion needs is a few copies of the
largest tensor (its float32 values, their transpose, its codes), never the model's
weights: that is what lets a 7-8B model convert on a 24 GB machine.
:func:`quantize` does the same for a graph file.

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
measured), which puts a 2B model beyond a 24 GB machine. Here a weight is read,
quantised a block of columns at a time and written out before the next is read:
the peak is about the largest matrix (its fp32 values plus its codes).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable

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


Reader = Callable[[Any], np.ndarray]
"""Reads an initializer's values (an ``onnx.TensorProto`` in, its array out): from the graph's own
external data (:func:`file_reader`), or straight from a checkpoint (:mod:`engine.binding`)."""


def file_reader(graph: Path) -> Reader:
    """A :data:`Reader` of the initializers of the model file ``graph``, inline or in external data beside it."""
    from onnx import numpy_helper

    return lambda tensor: numpy_helper.to_array(tensor, base_dir=str(graph.parent))


def quantize_int8(src: Path, dst: Path, inline_limit: int) -> None:
    """:func:`quantize` to int8."""
    quantize(src, dst, inline_limit, "int8")


def quantize(src: Path, dst: Path, inline_limit: int, precision: str) -> None:
    """Quantise ``src`` (an ONNX model, its weights inline or in external data) into ``dst``.

    ``precision`` is ``int8`` or ``int4`` (see the module's docstring). The result
    keeps its weights in ``<dst>.data`` when they pass ``inline_limit`` bytes.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    quantized = {node.input[1] for node in _targets(model.graph)}
    out_bytes = sum(
        int(np.prod(t.dims))
        * (BYTES_PER_WEIGHT[precision] if t.name in quantized else np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize)
        for t in model.graph.initializer
    )
    writer = TensorWriter(dst.parent, dst.name + EXTERNAL_DATA_SUFFIX if out_bytes > inline_limit else None)
    try:
        quantize_model(model, file_reader(src), writer, precision)
    finally:
        writer.close()
    onnx.save_model(model, str(dst))


def _targets(graph: Any) -> list[Any]:
    """The ``MatMul`` nodes whose weight is a constant float matrix: what quantisation replaces."""
    from onnx import TensorProto

    init = {t.name: t for t in graph.initializer}
    return [
        node for node in graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in init
        and init[node.input[1]].data_type == TensorProto.FLOAT and len(init[node.input[1]].dims) == 2
    ]


def quantize_model(model: Any, read: Reader, writer: TensorWriter, precision: str) -> None:
    """Quantise ``model`` (an ``onnx.ModelProto``) in place to ``precision`` (``int8`` or ``int4``).

    Its initializers are read one at a time through ``read`` and written through
    ``writer``; a weight ``writer`` already holds (the other graph's copy of it) is
    neither read nor quantised again.
    """
    if precision not in QUANTIZED:
        raise ValueError(f"precision {precision!r}: quantize writes {' or '.join(QUANTIZED)}")
    from onnx import TensorProto, helper

    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    targets = _targets(graph)
    target_ids = {id(node) for node in targets}
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    replaced = {
        w for w in {node.input[1] for node in targets}
        if uses.get(w, 0) == sum(1 for node in targets if node.input[1] == w)
    }
    new_init: list[Any] = []
    emitted: set[str] = set()

    def emit(name: str, produce: Callable[[], np.ndarray]) -> None:
        if name not in emitted:
            emitted.add(name)
            new_init.append(writer.tensor(name, produce))

    memo: dict[tuple[str, Callable[..., Any]], tuple[np.ndarray, ...]] = {}

    def once(w: str, compute: Callable[[np.ndarray], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        if (w, compute) not in memo:  # one weight at a time: the previous one's codes are dropped
            memo.clear()
            memo[(w, compute)] = compute(read(init[w]))
        return memo[(w, compute)]

    def part(w: str, compute: Callable[[np.ndarray], tuple[np.ndarray, ...]], index: int) -> np.ndarray:
        return once(w, compute)[index]

    for tensor in graph.initializer:
        if tensor.name not in replaced:
            emit(tensor.name, partial(read, tensor))
    new_nodes: list[Any] = []
    activations: dict[str, tuple[str, str, str]] = {}
    for node in nodes:
        if id(node) not in target_ids:
            new_nodes.append(node)
            continue
        a, w = node.input
        if precision == "int4":
            emit(f"{w}_q4", partial(part, w, quantize_blocks_int4, 0))
            emit(f"{w}_q4_scale", partial(part, w, quantize_blocks_int4, 1))
            k, n = (int(d) for d in init[w].dims)
            new_nodes.append(helper.make_node(
                "MatMulNBits", [a, f"{w}_q4", f"{w}_q4_scale"], list(node.output),
                name=f"{node.name or node.output[0]}_q4", domain="com.microsoft",
                K=k, N=n, bits=4, block_size=INT4_BLOCK, accuracy_level=INT4_ACCURACY_LEVEL,
            ))
            continue
        if a not in activations:
            q = (f"{a}_quantized", f"{a}_scale", f"{a}_zero_point")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(q), name=f"{a}_QuantizeLinear"))
            activations[a] = q
        a_q, a_scale, a_zero = activations[a]
        emit(f"{w}_quantized", partial(part, w, quantize_columns, 0))
        emit(f"{w}_scale", partial(part, w, quantize_columns, 1))
        emit(f"{w}_zero_point", partial(np.zeros, int(init[w].dims[1]), np.int8))
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
    del graph.initializer[:]
    graph.initializer.extend(new_init)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if precision == "int4" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


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
"""One file beside the graphs holding the weights of both, each tensor once (:func:`engine.binding.bind`)."""

PAGE = 4096
"""Offsets in :data:`SHARED_DATA_FILE` are page-aligned: ONNX Runtime maps the file instead of reading it."""


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


class TensorWriter:
    """Turns arrays into initializers: inline, or appended to one external data file in ``folder``.

    ``location`` (a file name in ``folder``, or None for all inline) may be shared by
    several graphs: a name is written once, and asking for it again (:meth:`tensor`)
    returns the same initializer without producing its values. Offsets are aligned to
    ``align`` bytes (:data:`PAGE` lets ONNX Runtime map the file). Tensors under 1 KB
    stay inline.
    """

    def __init__(self, folder: Path, location: str | None, align: int = ALIGN) -> None:
        self.location = location
        self.align = align
        self.handle: BinaryIO | None = (folder / location).open("wb") if location else None
        self.offset = 0
        self.written: dict[str, Any] = {}

    def tensor(self, name: str, produce: Callable[[], np.ndarray]) -> Any:
        """The initializer ``name``: written from ``produce()`` the first time, the same one after."""
        if name not in self.written:
            self.written[name] = self.add(produce(), name)
        out = type(self.written[name])()
        out.CopyFrom(self.written[name])
        return out

    def add(self, array: np.ndarray, name: str) -> Any:
        """Write ``array`` as initializer ``name`` and return it."""
        from onnx import TensorProto, helper, numpy_helper

        array = np.ascontiguousarray(array)
        if self.handle is None or array.nbytes < 1024:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        pad = -self.offset % self.align
        self.handle.write(b"\0" * pad)
        self.offset += pad
        self.handle.write(array.data.cast("B"))  # the array's own bytes, not a copy of them
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return tensor

    def close(self) -> None:
        """Close the data file."""
        if self.handle is not None:
            self.handle.close()
