"""PyTorch reference denoiser: runs a checkpoint folder directly, for validation and tests.

Same interface and numbers as the ONNX graphs (they are exported from the very
same :mod:`engine.modeling` methods), float32 on the CPU. Not a serving backend:
it needs torch, which the server does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from engine.backends.base import ModelInfo, Prior, SpanBatch, StepOutput, merge_span_batches, priors, split_output
from engine.errors import BackendUnavailableError

if TYPE_CHECKING:
    import torch

    from engine.checkpoint import Checkpoint


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(
            "the torch reference backend needs PyTorch: pip install -e '.[export]' in your dlm-lsp clone (torch==2.13.0, CPU build)"
        ) from exc
    return torch


@dataclass
class TorchContextCache:
    """Context keys (pre-rotary) and values as torch tensors, (L, 1, Hkv, Tc, D)."""

    keys: torch.Tensor
    values: torch.Tensor



class TorchDenoiser:
    """The :class:`~engine.backends.base.Denoiser` of a checkpoint, in eager PyTorch."""

    def __init__(self, checkpoint: Checkpoint, top_k: int = 2, streamed: bool = False) -> None:
        """``streamed``: hold no weights, read each from the checkpoint as it is used
        (:class:`engine.modeling.StreamedTransformer`; for a model larger than memory)."""
        torch = _torch()
        from engine.modeling import load_transformer, suppress_vector

        self.torch = torch
        self.model = load_transformer(checkpoint, streamed=streamed)
        arch, token_ids = checkpoint.arch, checkpoint.token_ids
        self.suppress = suppress_vector(arch.vocab_size, [token_ids.mask, *checkpoint.tokenizer.unassigned_ids(arch.vocab_size)])
        self.top_k = top_k
        self.info = ModelInfo(
            family=checkpoint.family.name,
            arch=arch,
            token_ids=token_ids,
            precision="fp32",
            backend="torch",
            device="cpu",
            top_k=top_k,
        )

    def _tensor(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return self.torch.as_tensor(np.asarray(array), dtype=dtype)

    reuses_context = True
    """The context pass takes prior context (:mod:`engine.reuse`)."""

    def encode_context(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        cache_index: np.ndarray,
        span_index: np.ndarray,
        prior: Prior | Sequence[Prior] | None = None,
    ) -> tuple[TorchContextCache, StepOutput]:
        """See :meth:`engine.backends.base.Denoiser.encode_context`."""
        torch = self.torch
        with torch.inference_mode():
            prior_keys = prior_values = None
            given = priors(prior)
            if given:
                indices = [self._tensor(part.index, torch.long) for part in given]
                prior_keys = torch.cat([
                    self.model.rotate_cache_keys(part.cache.keys.index_select(3, index),
                                                 self._tensor(part.positions, torch.long)[None])
                    for part, index in zip(given, indices)], dim=3)
                prior_values = torch.cat([part.cache.values.index_select(3, index)
                                          for part, index in zip(given, indices)], dim=3)
            keys, values, ids, probs, entropy = self.model.encode_context(
                self._tensor(input_ids, torch.long)[None],
                self._tensor(positions, torch.long)[None],
                self._tensor(cache_index, torch.long),
                self._tensor(span_index, torch.long),
                self.suppress,
                self.top_k,
                prior_keys,
                prior_values,
            )
        first_step = StepOutput(ids=ids.numpy(), probs=probs.numpy(), entropy=entropy.numpy())
        return TorchContextCache(keys=keys, values=values), first_step

    def join(self, parts: Sequence[tuple[TorchContextCache, np.ndarray]]) -> TorchContextCache:
        """One cache of the entries ``index`` of each cache, in this order (:mod:`engine.reuse`)."""
        torch = self.torch
        index = [self._tensor(i, torch.long) for _, i in parts]
        return TorchContextCache(
            keys=torch.cat([c.keys.index_select(3, i) for (c, _), i in zip(parts, index)], dim=3),
            values=torch.cat([c.values.index_select(3, i) for (c, _), i in zip(parts, index)], dim=3),
        )

    def step(
        self,
        cache: TorchContextCache,
        span_ids: np.ndarray,
        span_pos: np.ndarray,
        span_valid: np.ndarray,
        cache_pos: np.ndarray,
    ) -> StepOutput:
        """See :meth:`engine.backends.base.Denoiser.step`."""
        torch = self.torch
        with torch.inference_mode():
            keys = self.model.rotate_cache_keys(cache.keys, self._tensor(cache_pos, torch.long))
            ids, probs, entropy = self.model.span_step(
                self._tensor(span_ids, torch.long),
                self._tensor(span_pos, torch.long),
                self._tensor(span_valid, torch.bool),
                keys,
                cache.values,
                self.suppress,
                self.top_k,
            )
        return StepOutput(ids=ids.numpy(), probs=probs.numpy(), entropy=entropy.numpy())

    def step_many(self, parts: Sequence[SpanBatch]) -> list[StepOutput]:
        """The span steps of several requests as one forward pass (see :func:`engine.backends.base.merge_span_batches`)."""
        torch = self.torch
        with torch.inference_mode():
            keys = [self.model.rotate_cache_keys(p.cache.keys, self._tensor(p.cache_pos, torch.long)).numpy() for p in parts]
        merged = merge_span_batches(parts, keys, [p.cache.values.numpy() for p in parts])
        with torch.inference_mode():
            ids, probs, entropy = self.model.span_step(
                self._tensor(merged.span_ids, torch.long),
                self._tensor(merged.span_pos, torch.long),
                self._tensor(merged.span_valid, torch.bool),
                torch.from_numpy(merged.keys),
                torch.from_numpy(merged.values),
                self.suppress,
                self.top_k,
                torch.from_numpy(merged.cache_valid),
            )
        out = StepOutput(ids=ids.numpy(), probs=probs.numpy(), entropy=entropy.numpy())
        return split_output(out, merged)

    def full(self, input_ids: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> StepOutput:
        """Plain forward over whole windows (no cache)."""
        torch = self.torch
        from engine.modeling import summarize

        with torch.inference_mode():
            logits = self.model(
                self._tensor(input_ids, torch.long), self._tensor(positions, torch.long), self._tensor(valid, torch.bool)
            )
            ids, probs, entropy = summarize(logits, self.suppress, self.top_k)
        return StepOutput(ids=ids.numpy(), probs=probs.numpy(), entropy=entropy.numpy())
