"""ONNX Runtime denoiser: the serving backend (CPU provider here; CUDA/TensorRT providers on NVIDIA GPUs).

Loads the two graphs of an engine folder. The session options are tuned for the
latency of one small request at a time on a machine that is doing other things
(an editor, a build): no inter-op parallelism, every graph optimisation on, and
worker threads that sleep instead of spinning between ops. A small model runs
on one thread (see :func:`default_threads`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engine.backends.base import (
    ModelInfo,
    Prior,
    SpanBatch,
    StepOutput,
    merge_span_batches,
    onnxruntime_providers,
    priors,
    split_output,
)
from engine.errors import BackendUnavailableError, ManifestError
from engine.manifest import Manifest, context_inputs, span_inputs

log = logging.getLogger(__name__)


@dataclass
class OrtContextCache:
    """Context keys (pre-rotary) and values, (L, 1, Hkv, Tc, D) float arrays.

    ``rotated`` memoises the keys rotated to the layouts the span steps asked for
    (:meth:`OnnxRuntimeDenoiser.step`): a layout is rotated once per request.
    """

    keys: np.ndarray
    values: np.ndarray
    rotated: dict[tuple[tuple[int, ...], bytes], np.ndarray] = field(default_factory=dict)



def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """The rotary embedding's D/2 inverse frequencies, float32 as the model computes them."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def rotary_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (..., D) of the rotary embedding at ``positions``, float32 as the model computes them."""
    freqs = positions[..., None].astype(np.float32) * inverse_frequencies(head_dim, theta)
    emb = np.concatenate((freqs, freqs), axis=-1)
    return np.cos(emb), np.sin(emb)


def rotate_keys(keys: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Pre-rotary keys (L, 1, Hkv, Tc, D) placed at ``positions`` (B, Tc) -> (L, B, Hkv, Tc, D).

    The numpy twin of :meth:`engine.modeling.Transformer.rotate_cache_keys` (the
    server does not import torch); the export's validation compares the two.
    """
    half = keys.shape[-1] // 2
    cos, sin = rotary_tables(positions, keys.shape[-1], theta)  # (B, Tc, D)
    cos, sin = cos[None, :, None], sin[None, :, None]  # (1, B, 1, Tc, D)
    rotated_half = np.concatenate((-keys[..., half:], keys[..., :half]), axis=-1)
    return np.ascontiguousarray(keys * cos + rotated_half * sin, dtype=np.float32)


_KV = ("tensor(float)", ("num_layers", None, "num_kv_heads", None, "head_dim"))
_TOP = {
    "top_ids": ("tensor(int64)", (None, None, "top_k")),
    "top_probs": ("tensor(float)", (None, None, "top_k")),
    "entropy": ("tensor(float)", (None, None)),
}
_IDS = ("tensor(int64)", (None, None))
GRAPH_INTERFACE: dict[str, dict[str, dict[str, tuple[str, tuple[str | None, ...]]]]] = {
    "context": {
        "inputs": {"input_ids": _IDS, "position_ids": _IDS, "cache_index": ("tensor(int64)", (None,)),
                   "span_index": ("tensor(int64)", (None,)), "prior_keys": _KV, "prior_values": _KV},
        "outputs": {"cache_keys": _KV, "cache_values": _KV, **_TOP},
    },
    "span_step": {
        "inputs": {"span_ids": _IDS, "span_pos": _IDS, "span_valid": ("tensor(bool)", (None, None)),
                   "cache_keys": _KV, "cache_values": _KV, "cache_valid": ("tensor(bool)", (None, None))},
        "outputs": dict(_TOP),
    },
}
"""What each graph must declare: per input and output, its element type and, per dimension, the manifest
value it must equal (an ``arch`` field or ``top_k``) or None (a dimension the runtime chooses). The names
are :data:`engine.manifest.CONTEXT_INPUTS` and the others, in order (the tests check it); format 2
graphs lack ``prior_keys``, ``prior_values`` and ``cache_valid`` (:func:`engine.manifest.span_inputs`)."""


def interface_mismatches(role: str, session: Any, manifest: Manifest) -> list[str]:
    """How a loaded graph's declared inputs and outputs disagree with the manifest (empty when they agree).

    The graphs fix the number of layers, of key/value heads, the head size and
    top-k in their shapes; the runtime sizes its caches from the manifest, so a
    manifest that disagrees with its graphs is refused at load, naming the field,
    the manifest's value and the graph's.
    """
    name = manifest.graphs[role]
    problems = []
    for side, declared in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        expected = GRAPH_INTERFACE[role][side]
        if side == "inputs":  # format 2 graphs lack the last inputs
            of_version = (span_inputs if role == "span_step" else context_inputs)(manifest.format_version)
            expected = {name: expected[name] for name in of_version}
        names = [arg.name for arg in declared]
        if names != list(expected):
            problems.append(f"{name} {side} are {names}, expected {list(expected)}")
            continue
        for arg in declared:
            kind, dims = expected[arg.name]
            if arg.type != kind:
                problems.append(f"{name} {arg.name} is {arg.type}, expected {kind}")
            shape = list(arg.shape or [])
            if len(shape) != len(dims):
                problems.append(f"{name} {arg.name} has {len(shape)} dimensions, expected {len(dims)}")
                continue
            for axis, (field_name, dim) in enumerate(zip(dims, shape)):
                if field_name is None:
                    continue
                want = manifest.top_k if field_name == "top_k" else getattr(manifest.arch, field_name)
                if dim != want:
                    label = field_name if field_name == "top_k" else f"arch.{field_name}"
                    problems.append(f"{label}: manifest {want}, graph {name} {arg.name} dimension {axis} is {dim!r}")
    return problems


SMALL_MODEL_HIDDEN = 512
"""Models up to this hidden size run each op on one thread by default (see :func:`default_threads`)."""


def default_threads(hidden_size: int | None = None) -> int:
    """Threads for one op: 1 for a small model, else the CPUs this process may use.

    A span step of a small model is hundreds of tiny ops (microseconds each): a
    second thread barely helps it and takes a core from the editor (measured in
    docs/engine.md, "Threads").
    """
    if hidden_size is not None and hidden_size <= SMALL_MODEL_HIDDEN:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def unpacked_context(manifest: Manifest, backend: str) -> bool:
    """Whether the context graph runs on the int8 weights as stored, without ONNX Runtime's prepacked copy.

    Each session prepacks its own copy of every int8 matrix (private memory: about the
    matrices' size per session), so a real-size model held them twice. The context
    pass is compute-bound over hundreds of tokens, and packing the weights as it goes
    costs it nothing measurable; the span step, a few rows per call, keeps its copy.
    At the 0.5B shape: 470 MB less resident memory, context pass 4.84 -> 4.73 s
    (docs/engine.md, "Memory").
    """
    return backend == "cpu" and manifest.precision == "int8" and manifest.arch.hidden_size > SMALL_MODEL_HIDDEN


def session_options(manifest: Manifest, role: str, backend: str = "cpu", threads: int | None = None,
                    config: Mapping[str, str] | None = None) -> Any:
    """The session options the engine opens the ``role`` graph with: tuned for one small request at a time
    (see the module's docstring); ``config`` adds session config entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads(manifest.arch.hidden_size)
    options.inter_op_num_threads = 1
    # Spinning workers burn a core between ops and, when another process wants
    # that core, stall every op they share (measured in docs/engine.md, "Threads").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if role == "context" and unpacked_context(manifest, backend):
        options.add_session_config_entry("session.disable_prepacking", "1")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    return options


class OnnxRuntimeDenoiser:
    """The :class:`~engine.backends.base.Denoiser` of an engine folder, on ONNX Runtime."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        backend: str = "auto",
        threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
        keep_optimized: bool = False,
    ) -> None:
        """Open the folder's graphs; ``session_config`` adds ONNX Runtime session config entries.

        ``keep_optimized`` (the serving path, on the CPU): open the graphs as ONNX Runtime optimised
        them at an earlier load, kept in the model cache (:mod:`engine.backends.ort_optimized`)."""
        import onnxruntime as ort

        providers, chosen = onnxruntime_providers(backend)
        limits = None
        if chosen == "tensorrt-ep":
            from engine.backends import tensorrt_ep
            from engine.catalog import cache_dir

            if manifest.format_version < 3:
                raise ManifestError(f"engine folder {folder} is of format {manifest.format_version}: the TensorRT "
                                    "backend needs format 3 graphs; convert it again (dlm-convert)")
            limits, device = tensorrt_ep.ProfileLimits(), tensorrt_ep.device_identity()

        def providers_for(role: str) -> list[Any]:
            if limits is None:
                return providers
            trt = tensorrt_ep.provider_options(role, manifest, cache_dir() / "tensorrt", limits, device)
            return [(providers[0], trt), *providers[1:]]

        options_for = partial(session_options, manifest, backend=chosen, threads=threads, config=session_config)

        self.sessions = {}
        for role, name in manifest.graphs.items():
            path = folder / name
            session = None
            if keep_optimized and chosen == "cpu" and not session_config and manifest.files.get(name, {}).get("sha256"):
                from engine.backends import ort_optimized

                optimized = ort_optimized.optimized_model(folder, manifest, role, partial(options_for, role))
                if optimized is not None:
                    try:
                        session = ort.InferenceSession(optimized, providers=providers_for(role),
                                                       sess_options=ort_optimized.reading_weights_from(options_for(role), folder))
                    except Exception as exc:  # noqa: BLE001 - the graph as converted is the fallback
                        log.warning("the kept optimised %s graph did not open (%s); optimising it again", role, exc)
                        ort_optimized.forget(manifest, role)  # the next load keeps a fresh one
            try:
                if session is None:
                    session = ort.InferenceSession(str(path), sess_options=options_for(role), providers=providers_for(role))
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ManifestError(f"ONNX Runtime cannot load {path}: {exc}") from exc
            active = session.get_providers()
            if providers[0] not in active:
                raise BackendUnavailableError(
                    f"backend {chosen!r}: ONNX Runtime could not start {providers[0]} for {path.name} "
                    f"(it fell back to {active}); check the CUDA/TensorRT installation"
                )
            self.sessions[role] = session
        problems = [p for role, session in self.sessions.items() for p in interface_mismatches(role, session, manifest)]
        if problems:
            raise ManifestError(
                f"engine folder {folder}: the manifest does not describe its graphs: {'; '.join(problems)}. "
                "Re-run dlm-convert to rebuild the folder"
            )
        self.info = ModelInfo(
            family=manifest.family,
            arch=manifest.arch,
            token_ids=manifest.token_ids,
            precision=manifest.precision,
            backend=chosen,
            device="cpu" if chosen == "cpu" else "cuda:0",
            top_k=manifest.top_k,
            max_window=None if limits is None else limits.capped(manifest.arch).window,
        )
        self._context_run = None
        if chosen == "cpu" and manifest.arch.hidden_size > SMALL_MODEL_HIDDEN:
            # A real-size context pass allocates hundreds of MB of activations (attention over the
            # window); the arena would keep its largest pass for good. Measured at the 0.5B shape
            # (2,048- and 1,024-token passes in turn): RSS 1.7-2.3 GB kept, 1.2-1.8 GB shrunk, no slower.
            self._context_run = ort.RunOptions()
            self._context_run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.merges_contexts = manifest.format_version >= 3
        """Whether the span step takes ``cache_valid``, so that several requests' rows run as one batch."""
        self.reuses_context = manifest.format_version >= 3
        """Whether the context pass takes prior context (:mod:`engine.reuse`)."""
        arch = manifest.arch
        self._empty_cache = OrtContextCache(
            keys=np.zeros((arch.num_layers, 1, arch.num_kv_heads, 0, arch.head_dim), np.float32),
            values=np.zeros((arch.num_layers, 1, arch.num_kv_heads, 0, arch.head_dim), np.float32),
        )

    def encode_context(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        cache_index: np.ndarray,
        span_index: np.ndarray,
        prior: Prior | Sequence[Prior] | None = None,
    ) -> tuple[OrtContextCache, StepOutput]:
        """See :meth:`engine.backends.base.Denoiser.encode_context`."""
        feed = {
            "input_ids": np.asarray(input_ids, np.int64)[None],
            "position_ids": np.asarray(positions, np.int64)[None],
            "cache_index": np.asarray(cache_index, np.int64),
            "span_index": np.asarray(span_index, np.int64),
        }
        given = priors(prior)
        if self.reuses_context:
            if not given:
                feed["prior_keys"] = feed["prior_values"] = self._empty_cache.keys
            else:
                keys, values = zip(*(self._prior(p) for p in given))
                feed["prior_keys"] = keys[0] if len(keys) == 1 else np.concatenate(keys, axis=3)
                feed["prior_values"] = values[0] if len(values) == 1 else np.concatenate(values, axis=3)
        elif given:
            raise ValueError("this engine folder (format 2) cannot reuse context: convert it again")
        keys, values, ids, probs, entropy = self.sessions["context"].run(None, feed, self._context_run)
        return OrtContextCache(keys=keys, values=values), StepOutput(ids=ids, probs=probs, entropy=entropy)

    def _prior(self, prior: Prior) -> tuple[np.ndarray, np.ndarray]:
        """A prior's keys rotated to its positions, and its values. A whole cache in its own order (a
        candidate's context in the cached-span mode, :mod:`engine.sampler`) is rotated once per layout."""
        index = np.asarray(prior.index, np.int64)
        positions = np.asarray(prior.positions, np.int64)[None]
        whole = len(index) == prior.cache.keys.shape[3] and bool((index == np.arange(len(index))).all())
        if whole:
            return self._rotated(prior.cache, positions), prior.cache.values
        return (rotate_keys(prior.cache.keys[:, :, :, index], positions, self.info.arch.rope_theta),
                np.ascontiguousarray(prior.cache.values[:, :, :, index]))

    def join(self, parts: Sequence[tuple[OrtContextCache, np.ndarray]]) -> OrtContextCache:
        """One cache of the entries ``index`` of each cache, in this order (:mod:`engine.reuse`)."""
        return OrtContextCache(
            keys=np.concatenate([c.keys[:, :, :, i] for c, i in parts], axis=3),
            values=np.concatenate([c.values[:, :, :, i] for c, i in parts], axis=3),
        )

    def step(
        self,
        cache: OrtContextCache,
        span_ids: np.ndarray,
        span_pos: np.ndarray,
        span_valid: np.ndarray,
        cache_pos: np.ndarray,
    ) -> StepOutput:
        """See :meth:`engine.backends.base.Denoiser.step`."""
        keys = self._rotated(cache, cache_pos)
        valid = np.ones((keys.shape[1], keys.shape[3]), np.bool_) if self.merges_contexts else None
        return self._run_step(span_ids, span_pos, span_valid, keys, cache.values, valid)

    def step_many(self, parts: Sequence[SpanBatch]) -> list[StepOutput]:
        """The span steps of several requests as one forward pass (format 3 graphs; else one pass each)."""
        if not self.merges_contexts or len(parts) == 1:
            return [self.step(p.cache, p.span_ids, p.span_pos, p.span_valid, p.cache_pos) for p in parts]
        keys = [self._rotated(p.cache, p.cache_pos) for p in parts]
        merged = merge_span_batches(parts, keys, [p.cache.values for p in parts])
        out = self._run_step(merged.span_ids, merged.span_pos, merged.span_valid, merged.keys, merged.values,
                             merged.cache_valid)
        return split_output(out, merged)

    def _rotated(self, cache: OrtContextCache, cache_pos: np.ndarray) -> np.ndarray:
        """The cached keys rotated to ``cache_pos`` (memoised per layout)."""
        cache_pos = np.asarray(cache_pos, np.int64)
        layout = (cache_pos.shape, cache_pos.tobytes())
        keys = cache.rotated.get(layout)
        if keys is None:
            keys = cache.rotated[layout] = rotate_keys(cache.keys, cache_pos, self.info.arch.rope_theta)
        return keys

    def _run_step(
        self,
        span_ids: np.ndarray,
        span_pos: np.ndarray,
        span_valid: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        cache_valid: np.ndarray | None,
    ) -> StepOutput:
        feed = {
            "span_ids": np.asarray(span_ids, np.int64),
            "span_pos": np.asarray(span_pos, np.int64),
            "span_valid": np.asarray(span_valid, np.bool_),
            "cache_keys": keys,
            "cache_values": values,
        }
        if cache_valid is not None:
            feed["cache_valid"] = cache_valid
        ids, probs, entropy = self.sessions["span_step"].run(None, feed)
        return StepOutput(ids=ids, probs=probs, entropy=entropy)

    def full(self, input_ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> StepOutput:
        """The span step graph over whole windows with an empty cache."""
        batch = np.asarray(input_ids).shape[0]
        return self.step(self._empty_cache, input_ids, positions, valid, np.zeros((batch, 0), np.int64))
