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
(``cpu`` here; ``cuda``/``tensorrt`` providers on NVIDIA GPUs) and a PyTorch
reference (``torch``) used for validation and tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.errors import BackendUnavailableError, InputError
from engine.families import ArchConfig, TokenIds

log = logging.getLogger(__name__)

SERVING_BACKENDS = ("auto", "tensorrt", "cuda", "cpu")
"""Backends that serve engine folders (the server's ``backend`` setting)."""
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


@dataclass
class StepOutput:
    """Per-position summary of the model's predictive distribution.

    ids, probs: (B, S, K), best first; entropy: (B, S) in nats.
    """

    ids: np.ndarray
    probs: np.ndarray
    entropy: np.ndarray


class ContextCache(Protocol):
    """Backend-owned keys/values of the context, opaque to the sampler: it only hands it back to :meth:`Denoiser.step`."""


class Denoiser(Protocol):
    """The small interface the sampler needs from a model runtime."""

    info: ModelInfo

    def encode_context(
        self, input_ids: np.ndarray, positions: np.ndarray, cache_index: np.ndarray, span_index: np.ndarray
    ) -> tuple[ContextCache, StepOutput]:
        """input_ids, positions (T,); cache_index (Tc,); span_index (S,) -> cache of the Tc positions
        and the outputs (1, S, ...) at the S rows, as :meth:`step` would return them for that span."""
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
    """ONNX Runtime providers for ``backend`` (``auto``/``cpu``/``cuda``/``tensorrt``) and the chosen name.

    ``auto`` takes CUDA when ONNX Runtime's CUDA provider is installed, else the
    CPU, and logs why. ``cuda`` and ``tensorrt`` raise
    :class:`BackendUnavailableError` naming what is missing.
    """
    if backend not in BACKENDS or backend == "torch":
        raise InputError(f"backend {backend!r} is not an ONNX Runtime backend; choose one of auto, tensorrt, cuda, cpu")
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
    provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[backend]
    if provider not in available:
        raise BackendUnavailableError(
            f"backend {backend!r} needs ONNX Runtime's {provider}, which this installation lacks "
            f"(available: {', '.join(sorted(available))}); {gpu_hint}, or use backend 'cpu'/'auto'"
        )
    providers: list[Any] = [provider, "CPUExecutionProvider"]
    if backend == "tensorrt":
        providers.insert(1, "CUDAExecutionProvider")
    return providers, backend
