"""The denoiser interface the sampler drives, and backend selection.

A *denoiser* runs a masked diffusion model in the two shapes the engine needs:

* :meth:`Denoiser.encode_context`: one pass over the whole window (prefix, masked
  span, suffix) returning an opaque :class:`ContextCache` of per-layer keys/values
  at the positions the span steps reuse, and the outputs of that pass at the
  span's rows: the first denoising step of the fully masked span, for free;
* :meth:`Denoiser.step`: one denoising forward of a batch of spans against that cache;
* :meth:`Denoiser.full`: one forward of whole windows with no cache (the exact
  reference mode).

Every call returns, per input position, the top-k token ids and probabilities and
the entropy (:class:`StepOutput`): full-vocabulary logits never leave the backend.
Arrays are numpy, shapes as documented; ids are int64. Backends: ONNX Runtime
(``cpu`` here; its ``cuda``/``tensorrt-ep`` providers on NVIDIA GPUs), native TensorRT
engines (``tensorrt``) and a PyTorch
reference (``torch``) used for validation and tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from engine.errors import BackendUnavailableError, InputError
from engine.families import ArchConfig, TokenIds

log = logging.getLogger(__name__)

SERVING_BACKENDS = ("auto", "tensorrt", "tensorrt-ep", "cuda", "cpu")
"""Backends that serve engine folders (the server's ``backend`` setting): ``tensorrt`` runs native TensorRT
engines (:mod:`engine.backends.tensorrt`); ``tensorrt-ep`` and ``cuda`` are ONNX Runtime's TensorRT and CUDA
providers, the middle path for a TensorRT install the native engines cannot use."""
BACKENDS = (*SERVING_BACKENDS, "torch")
"""Accepted backend names. ``torch`` is the PyTorch reference on checkpoint folders, not a serving backend."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is and where it runs."""

    family: str
    arch: ArchConfig
    token_ids: TokenIds
    precision: str
    backend: str
    device: str
    top_k: int
    max_window: int | None = None
    """Positions one forward pass may span on this backend (the TensorRT provider's profiles,
    :mod:`engine.backends.tensorrt_ep`); None: the model's ``max_positions``."""

    @property
    def window(self) -> int:
        """The longest window (prefix, middle and suffix) this model runs here."""
        return self.arch.max_positions if self.max_window is None else min(self.arch.max_positions, self.max_window)


@dataclass
class StepOutput:
    """Per-position summary of the model's predictive distribution.

    ids, probs: (B, S, K), best first; entropy: (B, S) in nats.
    """

    ids: np.ndarray
    probs: np.ndarray
    entropy: np.ndarray


@dataclass
class Prior:
    """Context kept from an earlier pass (:mod:`engine.reuse`): the entries ``index`` of ``cache``,
    now at ``positions`` (their keys are rotated there)."""

    cache: Any
    index: np.ndarray
    positions: np.ndarray


def priors(prior: "Prior | Sequence[Prior] | None") -> list[Prior]:
    """``encode_context``'s ``prior`` argument as a list (empty: none)."""
    if prior is None:
        return []
    return [prior] if isinstance(prior, Prior) else list(prior)


@dataclass
class SpanBatch:
    """One request's share of a span step: its context cache and its rows (the arguments of :meth:`Denoiser.step`)."""

    cache: Any
    span_ids: np.ndarray
    span_pos: np.ndarray
    span_valid: np.ndarray
    cache_pos: np.ndarray


@dataclass
class MergedBatch:
    """Several requests' span rows as one batch: spans padded to the widest, contexts to the longest.

    ``keys`` and ``values`` are (L, B, Hkv, Tc, D) with every row's own context (its
    keys rotated to its layout); ``cache_valid`` (B, Tc) masks the padding.
    """

    span_ids: np.ndarray
    span_pos: np.ndarray
    span_valid: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    cache_valid: np.ndarray
    rows: list[slice]
    """Each part's rows of the batch."""
    widths: list[int]
    """Each part's span width (its outputs are cut back to it)."""


def merge_span_rows(parts: Sequence[SpanBatch], cached: Sequence[int]) -> MergedBatch:
    """One batch of ``parts``' span rows, padded to the widest, and ``cache_valid`` for contexts of ``cached``
    entries each; ``keys`` and ``values`` are left empty for the caller to fill where its caches live."""
    batch = sum(len(p.span_ids) for p in parts)
    width = max(p.span_ids.shape[1] for p in parts)
    span_ids = np.zeros((batch, width), np.int64)
    span_pos = np.zeros((batch, width), np.int64)
    span_valid = np.zeros((batch, width), bool)
    cache_valid = np.zeros((batch, max(cached)), bool)
    rows, widths, at = [], [], 0
    for part, tc in zip(parts, cached):
        n, w = len(part.span_ids), part.span_ids.shape[1]
        rows.append(slice(at, at + n))
        widths.append(w)
        span_ids[at : at + n, :w] = part.span_ids
        span_pos[at : at + n, :w] = part.span_pos
        span_valid[at : at + n, :w] = part.span_valid
        cache_valid[at : at + n, :tc] = True
        at += n
    return MergedBatch(span_ids, span_pos, span_valid, np.empty(0), np.empty(0), cache_valid, rows, widths)


def merge_span_batches(parts: Sequence[SpanBatch], keys: Sequence[np.ndarray], values: Sequence[np.ndarray]) -> MergedBatch:
    """One batch of ``parts``: their keys (L, B_i, Hkv, Tc_i, D), already rotated, and values
    (L, 1 or B_i, Hkv, Tc_i, D), padded with zeros and masked by ``cache_valid``."""
    merged = merge_span_rows(parts, [k.shape[3] for k in keys])
    layers, _, heads, _, dim = keys[0].shape
    shape = (layers, len(merged.span_ids), heads, merged.cache_valid.shape[1], dim)
    merged.keys, merged.values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for rows, k, v in zip(merged.rows, keys, values):
        merged.keys[:, rows, :, : k.shape[3]] = k
        merged.values[:, rows, :, : k.shape[3]] = v  # (L, 1, ...) broadcasts to the part's rows
    return merged


def split_output(out: StepOutput, merged: MergedBatch) -> list[StepOutput]:
    """Each part's outputs of a merged step (its rows, its span width)."""
    return [
        StepOutput(ids=out.ids[rows, :w], probs=out.probs[rows, :w], entropy=out.entropy[rows, :w])
        for rows, w in zip(merged.rows, merged.widths)
    ]


def step_batches(denoiser: "Denoiser", parts: Sequence[SpanBatch]) -> list[StepOutput]:
    """The span steps of several requests: one forward pass when the denoiser can merge them
    (``step_many``), else one per request."""
    many = getattr(denoiser, "step_many", None)
    if many is not None and len(parts) > 1:
        return list(many(parts))
    return [denoiser.step(p.cache, p.span_ids, p.span_pos, p.span_valid, p.cache_pos) for p in parts]


class ContextCache(Protocol):
    """Backend-owned keys/values of the context, opaque to the sampler: it only hands it back to :meth:`Denoiser.step`."""


class Denoiser(Protocol):
    """The small interface the sampler needs from a model runtime."""

    info: ModelInfo

    def encode_context(
        self, input_ids: np.ndarray, positions: np.ndarray, cache_index: np.ndarray, span_index: np.ndarray
    ) -> tuple[ContextCache, StepOutput]:
        """input_ids, positions (T,); cache_index (Tc,); span_index (S,) -> cache of the Tc positions
        and the outputs (1, S, ...) at the S rows, as :meth:`step` would return them for that span.

        A denoiser that can reuse context (``reuses_context``, :mod:`engine.reuse`) also takes
        ``prior=``:class:`Prior` (or a sequence of them, attended to as one, in order), attended
        to by every row, and joins caches with ``join``."""
        ...

    def step(
        self,
        cache: Any,
        span_ids: np.ndarray,
        span_pos: np.ndarray,
        span_valid: np.ndarray,
        cache_pos: np.ndarray,
    ) -> StepOutput:
        """span_ids, span_pos, span_valid (B, S); cache_pos (B, Tc) -> outputs for the S positions."""
        ...

    def full(self, input_ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> StepOutput:
        """input_ids, positions, valid (B, T) -> outputs for every position (no cache)."""
        ...


def onnxruntime_providers(backend: str) -> tuple[list[Any], str]:
    """ONNX Runtime providers for ``backend`` (``auto``/``cpu``/``cuda``/``tensorrt-ep``) and the chosen name.

    ``auto`` takes CUDA when ONNX Runtime's CUDA provider is installed, else the
    CPU, and logs why. ``cuda`` and ``tensorrt-ep`` raise
    :class:`BackendUnavailableError` naming what is missing.
    """
    if backend not in BACKENDS or backend in ("torch", "tensorrt"):
        raise InputError(f"backend {backend!r} is not an ONNX Runtime backend; choose one of auto, tensorrt-ep, cuda, cpu")
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from exc
    available = set(ort.get_available_providers())
    gpu_hint = (
        "install the GPU extra (pip install -e '.[gpu]' in your dlm-lsp clone, which brings onnxruntime-gpu and TensorRT) "
        "on a machine with an NVIDIA GPU and driver"
    )
    if backend == "auto":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
        log.info("backend auto: ONNX Runtime has no CUDA provider here (%s); using the CPU", sorted(available))
        return ["CPUExecutionProvider"], "cpu"
    if backend == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    provider = {"cuda": "CUDAExecutionProvider", "tensorrt-ep": "TensorrtExecutionProvider"}[backend]
    if provider not in available:
        raise BackendUnavailableError(
            f"backend {backend!r} needs ONNX Runtime's {provider}, which this installation lacks "
            f"(available: {', '.join(sorted(available))}); {gpu_hint}, or use backend 'cpu'/'auto'"
        )
    providers: list[Any] = [provider, "CPUExecutionProvider"]
    if backend == "tensorrt-ep":
        providers.insert(1, "CUDAExecutionProvider")
    return providers, backend
