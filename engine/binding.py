"""The engine's graphs traced without their weights, then bound to a checkpoint one tensor at a time.

A 7-8B model's float32 weights (30 GB) do not fit in a 24 GB machine, and the
ONNX exporter wants the whole model in memory as float32 and writes its weights
out as float32 before anything can quantise them. Conversion therefore runs in
two steps, neither of which holds the model's weights (binding holds one weight
at a time, with its transpose and codes):

1. **Trace** (:func:`trace_skeletons`). :mod:`engine.modeling`'s transformer is
   built with *phantom* parameters: one number broadcast to the parameter's
   shape (stride 0, a few bytes whatever the shape), a different number for
   each parameter so that the exporter merges none of them. Every ``nn.Linear``
   multiplies by its weight stored transposed, (in, out), which is the
   ``MatMul`` the exporter's constant folding makes of a real model's
   ``F.linear``; folded from a parameter, that constant would be anonymous. It
   is traced with ``export_params=False``: every parameter becomes a graph input
   named as in the model (``model.model.layers.3.mlp.up_proj.weight_t``, the
   graph wrapper's ``model.`` first), and the two graphs are a few hundred
   kilobytes.

2. **Bind** (:func:`bind`). Every parameter input becomes an initializer whose
   values are read from the checkpoint when it is written
   (:meth:`engine.checkpoint.Checkpoint.read_tensor`): a transposed matrix is
   named ``matmul.<parameter>``, anything else keeps its input's name. At
   ``int8`` or ``int4`` each matrix is quantised as it is read
   (:func:`engine.weights.quantize_model`), so the float32 graphs of a large
   model never exist. Both graphs' weights go into one page-aligned
   ``weights.data`` (each tensor once, both graphs and every server process
   mapping the same pages), or inline for a small model.

The result computes exactly what the exporter's graph of the loaded model computes:
``tests/engine/test_binding.py`` runs both on ONNX Runtime and compares them bit for bit.
"""

from __future__ import annotations

import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.manifest import CONTEXT_INPUTS, CONTEXT_OUTPUTS, SPAN_INPUTS, SPAN_OUTPUTS
from engine.weights import BYTES_PER_WEIGHT, PAGE, QUANTIZED, SHARED_DATA_FILE, TensorWriter, quantize_model

OPSET = 17
"""ONNX opset of the graphs."""

WRAPPER_PREFIX = "model."
"""The graph modules hold the transformer as ``self.model``: its parameters' graph names start so."""

MATMUL_PREFIX = "matmul."
"""Initializer name of a parameter's transposed (in, out) matrix, as ``MatMul`` takes it."""

INLINE_LIMIT = 64 << 20
"""Graphs whose weights exceed this many bytes keep them outside ``.onnx``, in one
:data:`~engine.weights.SHARED_DATA_FILE` both graphs share.

Protobuf cannot serialise a message over 2 GiB, so a 0.5B model's fp32 graph must
keep its initializers outside; and weights outside are mapped into memory by ONNX
Runtime, so the two graphs (and two server processes) share one copy of them.
Small models (the shipped one: 16 MB a graph) stay self-contained files.
"""

GRAPHS = ("context.onnx", "span_step.onnx")


def graph_modules(model: Any, suppress: Any, top_k: int) -> tuple[Any, Any]:
    """The context-pass and span-step computations of ``model`` as modules the exporter traces."""
    import torch

    class ContextGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("suppress", suppress, persistent=False)

        def forward(
            self, input_ids: Any, position_ids: Any, cache_index: Any, span_index: Any, prior_keys: Any, prior_values: Any
        ) -> Any:
            return self.model.encode_context(
                input_ids, position_ids, cache_index, span_index, self.suppress, top_k, prior_keys, prior_values
            )

    class SpanStepGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("suppress", suppress, persistent=False)

        def forward(
            self, span_ids: Any, span_pos: Any, span_valid: Any, cache_keys: Any, cache_values: Any, cache_valid: Any
        ) -> Any:
            return self.model.span_step(
                span_ids, span_pos, span_valid, cache_keys, cache_values, self.suppress, top_k, cache_valid
            )

    return ContextGraph().eval(), SpanStepGraph().eval()


TRANSPOSED_SUFFIX = "_t"
"""A phantom model's matrices are stored (in, out), as ``MatMul`` takes them: ``weight_t`` for ``weight``."""

HEAD = "head_t"
"""The phantom model's LM head matrix, (C, V): the embedding's transpose when tied, else ``lm_head.weight``'s."""


def phantom_transformer(arch: Any) -> Any:
    """:class:`engine.modeling.Transformer` of ``arch`` whose parameters take no memory.

    Each parameter is one number broadcast to its shape (stride 0), a different
    number for each so that the exporter merges none of them; the outputs are
    meaningless, only the trace is wanted. Every ``nn.Linear`` becomes a ``MatMul``
    by its transposed weight ``weight_t`` (and the LM head one by :data:`HEAD`):
    the graph the exporter's constant folding makes of a real model's
    ``F.linear``, without a fold that holds a weight.
    """
    import torch
    from torch import nn

    from engine.modeling import Rotary, Transformer

    class MatMulLinear(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.weight_t = nn.Parameter(torch.empty(linear.in_features, linear.out_features, device="meta"))
            self.bias = None if linear.bias is None else nn.Parameter(torch.empty(linear.out_features, device="meta"))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.matmul(x, self.weight_t)
            return y if self.bias is None else y + self.bias

    class PhantomTransformer(Transformer):
        head_t: nn.Parameter

        def head(self, hidden: torch.Tensor) -> torch.Tensor:
            return torch.matmul(hidden, self.head_t)

    with torch.device("meta"):
        model = PhantomTransformer(arch)
        model.head_t = nn.Parameter(torch.empty(arch.hidden_size, arch.vocab_size))
        if not arch.tie_word_embeddings:
            del model.lm_head  # its matrix is head_t
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, MatMulLinear(child))
    number = 0
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                number += 1
                phantom = torch.full((), float(number)).expand(param.shape)
                module._parameters[name] = nn.Parameter(phantom, requires_grad=False)
    model.rotary = Rotary(arch.head_dim, arch.rope_theta)  # a buffer, not a parameter: built for real
    return model.eval()


def export_graph(name: str, module: Any, arch: Any, path: Path, *, with_weights: bool) -> None:
    """Trace ``module`` (one of :func:`graph_modules`) as graph ``name`` to ``path``.

    ``with_weights=False`` leaves the parameters as graph inputs (:func:`trace_skeletons`);
    True is the exporter's ordinary export of a loaded model, weights and all.
    """
    import torch

    t, tc, b, s = 12, 9, 2, 4
    cache = (arch.num_layers, 1, arch.num_kv_heads, 3, arch.head_dim)
    outputs = {"top_ids": {0: "batch", 1: "span"}, "top_probs": {0: "batch", 1: "span"}, "entropy": {0: "batch", 1: "span"}}
    specs: dict[str, dict[str, Any]] = {
        "context.onnx": dict(
            args=(
                torch.zeros(1, t, dtype=torch.long), torch.arange(t)[None], torch.arange(tc), torch.arange(tc - 1, t),
                torch.zeros(cache), torch.zeros(cache),
            ),
            input_names=list(CONTEXT_INPUTS), output_names=list(CONTEXT_OUTPUTS),
            dynamic_axes={
                "input_ids": {1: "window"}, "position_ids": {1: "window"}, "cache_index": {0: "cached"},
                "span_index": {0: "span"}, "prior_keys": {3: "prior"}, "prior_values": {3: "prior"},
                "cache_keys": {3: "cached"}, "cache_values": {3: "cached"},
                **{name: {1: "span"} for name in outputs},
            },
        ),
        "span_step.onnx": dict(
            args=(
                torch.zeros(b, s, dtype=torch.long), torch.arange(s)[None].repeat(b, 1), torch.ones(b, s, dtype=torch.bool),
                torch.zeros(arch.num_layers, b, arch.num_kv_heads, tc, arch.head_dim),
                torch.zeros(arch.num_layers, 1, arch.num_kv_heads, tc, arch.head_dim), torch.ones(b, tc, dtype=torch.bool),
            ),
            input_names=list(SPAN_INPUTS), output_names=list(SPAN_OUTPUTS),
            dynamic_axes={
                "span_ids": {0: "batch", 1: "span"}, "span_pos": {0: "batch", 1: "span"},
                "span_valid": {0: "batch", 1: "span"}, "cache_keys": {1: "batch", 3: "cached"},
                "cache_values": {1: "value_rows", 3: "cached"},  # 1 (shared) or batch (one context per row)
                "cache_valid": {0: "batch", 1: "cached"},
                **outputs,
            },
        ),
    }
    spec = specs[name]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, spec["args"], str(path), input_names=spec["input_names"], output_names=spec["output_names"],
            dynamic_axes=spec["dynamic_axes"], opset_version=OPSET, dynamo=False, export_params=with_weights,
        )


def trace_skeletons(arch: Any, suppress: Any, top_k: int, out: Path) -> dict[str, Any]:
    """Trace the context and span-step graphs of ``arch`` without weights; returns them by file name.

    ``suppress`` is the (V,) logit bias of ids never predicted. The graphs are
    written to a scratch folder in ``out`` (the exporter writes files) and read back.
    """
    import onnx

    modules = dict(zip(GRAPHS, graph_modules(phantom_transformer(arch), suppress, top_k)))
    skeletons = {}
    with tempfile.TemporaryDirectory(prefix=".trace.", dir=out) as scratch:
        for name, module in modules.items():
            export_graph(name, module, arch, Path(scratch) / name, with_weights=False)
            skeletons[name] = onnx.load(str(Path(scratch) / name))
    return skeletons


def _weights_of(model: Any, interface: tuple[str, ...], arch: Any) -> dict[str, tuple[str, bool]]:
    """Drop ``model``'s parameter inputs; returns initializer name -> (:mod:`engine.modeling` name, transposed).

    A matrix the graph multiplies by (``weight_t``, :data:`HEAD`) is named
    ``matmul.<parameter>``; any other parameter keeps its input's name.
    """
    graph = model.graph
    if any(attr.g.node or attr.graphs for node in graph.node for attr in node.attribute):
        raise ValueError("traced graph has subgraphs: their inputs would not be bound")
    recipes: dict[str, tuple[str, bool]] = {}
    renames: dict[str, str] = {}
    for value in graph.input:
        if value.name in interface:
            continue
        if not value.name.startswith(WRAPPER_PREFIX):
            raise ValueError(f"traced graph has an input that is not a parameter: {value.name}")
        ours = value.name[len(WRAPPER_PREFIX):]
        if ours == HEAD:
            ours = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
            renames[value.name] = MATMUL_PREFIX + ours
        elif ours.endswith(".weight" + TRANSPOSED_SUFFIX):
            ours = ours.removesuffix(TRANSPOSED_SUFFIX)
            renames[value.name] = MATMUL_PREFIX + ours
        recipes[renames.get(value.name, value.name)] = (ours, value.name in renames)
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    interface_inputs = [i for i in graph.input if i.name in interface]
    del graph.input[:]
    graph.input.extend(interface_inputs)
    return recipes


def bind(
    skeletons: dict[str, Any],
    arch: Any,
    read: Callable[[str], Any],
    shapes: dict[str, tuple[int, ...]],
    folder: Path,
    precision: str,
    inline_limit: int = INLINE_LIMIT,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write ``skeletons`` (from :func:`trace_skeletons`) into ``folder`` with their weights at ``precision``.

    ``arch`` is the model's architecture, ``read(name)`` returns one parameter (a float32 tensor or array, by
    :mod:`engine.modeling` name) and ``shapes`` every parameter's shape.
    ``progress(done, total)`` is called as weights are written. Both graphs keep
    their weights in one :data:`~engine.weights.SHARED_DATA_FILE` when they pass
    ``inline_limit`` bytes (each tensor once), else inline.
    """
    import onnx
    from onnx import TensorProto

    interfaces = {"context.onnx": CONTEXT_INPUTS, "span_step.onnx": SPAN_INPUTS}
    models, recipes = {}, {}
    for name, skeleton in skeletons.items():
        model = type(skeleton)()
        model.CopyFrom(skeleton)
        recipe = _weights_of(model, tuple(interfaces[name]), arch)
        for init_name, (param, transposed) in recipe.items():
            dims = shapes[param][::-1] if transposed else shapes[param]
            model.graph.initializer.append(TensorProto(name=init_name, data_type=TensorProto.FLOAT, dims=dims))
        models[name], recipes[name] = model, recipe
    distinct = {n: r for recipe in recipes.values() for n, r in recipe.items()}
    per_weight = BYTES_PER_WEIGHT[precision]
    total_bytes = sum(int(np.prod(shapes[p])) * (per_weight if t else 4) for p, t in distinct.values())
    writer = TensorWriter(folder, SHARED_DATA_FILE if total_bytes > inline_limit else None, align=PAGE)
    written = 0

    def values(tensor: Any) -> np.ndarray:
        nonlocal written
        param, transposed = distinct[tensor.name]
        array = read(param)
        array = array.numpy() if hasattr(array, "numpy") else np.asarray(array)
        written += 1
        if progress is not None:
            progress(written, len(distinct))
        return np.ascontiguousarray(array.T) if transposed else array

    try:
        for name, model in models.items():
            if precision in QUANTIZED:
                quantize_model(model, values, writer, precision)
            else:
                tensors = [writer.tensor(t.name, partial(values, t)) for t in model.graph.initializer]
                del model.graph.initializer[:]
                model.graph.initializer.extend(tensors)
    finally:
        writer.close()
    for name, model in models.items():
        onnx.save_model(model, str(folder / name))
