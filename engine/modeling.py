"""The bidirectional transformer every supported family maps onto (PyTorch).

One readable model: Qwen2-style blocks (RMSNorm, rotary embeddings, grouped-query
attention with optional q/k/v bias and optional per-head q/k RMSNorm as in Qwen3,
SwiGLU MLP) with *full* attention. Parameter names are Qwen2's (plus Qwen3's
``q_norm``/``k_norm``); other families map their checkpoint names onto them.

Besides the plain forward (training, reference tests) it has the two computations
the engine exports to ONNX:

* :meth:`Transformer.encode_context`: one full pass over the whole window with the
  middle masked; returns every layer's keys (before rotary) and values at the
  positions the span step will reuse (the DualCache of Fast-dLLM), and the
  span's outputs of that pass, which are the first denoising step.
* :meth:`Transformer.span_step`: runs only the span (plus, for a shifted model, the
  last prefix position) against that cache and returns, per input position, the
  top-k token ids and probabilities and the entropy of the distribution, so full
  vocabulary logits never leave the device.

Keys are cached *before* rotary so one context encoding serves every candidate
middle length of a batch (each places the suffix at a different offset). They are
rotated once per candidate layout (:meth:`Transformer.rotate_cache_keys`, or its
numpy twin in the ONNX Runtime backend), not in every step.

torch is needed only here and in export/training; the server never imports this.
"""

from __future__ import annotations

from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.families import ArchConfig

SUPPRESSED_LOGIT = -1e9
"""Added to the logits of tokens that must never be predicted (the mask token, ids no token has).

Finite on purpose: ``exp(-inf) * -inf`` would turn the entropy into NaN.
"""


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as Qwen2 does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RMS-normalised ``x`` (computed in float32, cast back), scaled by the learned weight."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding; ``x`` (B|1, H, T, D), ``cos``/``sin`` (B, 1, T, D) broadcast."""
    return x * cos + rotate_half(x) * sin


class Rotary(nn.Module):
    """cos/sin tables of the rotary embedding for arbitrary position ids."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine and sine tables for ``positions`` (B, T), each (B, 1, T, D) to broadcast over heads."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos(), emb.sin()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention without materialising repeated keys/values.

    q (B, H, S, D); k, v (B, Hkv, T, D); bias (B, 1, 1, T) additive or None.
    Query head h uses key/value head h // G, as Qwen2's ``repeat_kv`` does.
    """
    b, h, s, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, hkv, (h // hkv) * s, d)  # (B, Hkv, G*S, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, Hkv, G*S, D)
    return out.reshape(b, h, s, d)


class Attention(nn.Module):
    """Qwen2 self-attention projections; the attention itself is :func:`attend`."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_proj = nn.Linear(arch.hidden_size, arch.num_heads * arch.head_dim, bias=arch.qkv_bias)
        self.k_proj = nn.Linear(arch.hidden_size, arch.num_kv_heads * arch.head_dim, bias=arch.qkv_bias)
        self.v_proj = nn.Linear(arch.hidden_size, arch.num_kv_heads * arch.head_dim, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False)
        if arch.qk_norm:  # Qwen3: every head's query and key RMS-normalised before rotary
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm

    def project(
        self, x: torch.Tensor, queries: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T', D), k and v (B, Hkv, T, D); no rotary yet.

        ``queries`` (T',) picks the rows that get a query (default: all T).
        """
        b, t, _ = x.shape
        xq = x if queries is None else x.index_select(1, queries)
        q = self.q_proj(xq).view(b, xq.shape[1], self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """attn (B, H, T, D) -> (B, T, C)."""
        b, _, t, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual attention output, then the residual MLP."""
        x = x + self.self_attn.output(attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm (``model.*`` in checkpoint names)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Block(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def blocks(self) -> list[Block]:
        """The transformer blocks, in order (``layers`` typed for what it holds)."""
        return cast("list[Block]", list(self.layers))


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """valid (B, T) bool/int -> additive attention bias (B, 1, 1, T)."""
    blocked = torch.full_like(valid, torch.finfo(dtype).min, dtype=dtype)
    return torch.where(valid.bool(), torch.zeros_like(blocked), blocked)[:, None, None, :]


class Transformer(nn.Module):
    """A bidirectional decoder-style transformer with Qwen2 parameter names."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.model = Backbone(arch)
        self.rotary = Rotary(arch.head_dim, arch.rope_theta)
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    # -- plain forward ---------------------------------------------------------------
    def head_weight(self) -> torch.Tensor:
        """The LM head matrix (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.arch.tie_word_embeddings else self.lm_head.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of final hidden states (..., C)."""
        return F.linear(hidden, self.head_weight())

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, T) -> final normed hidden states (B, T, C); ``valid`` masks padding keys."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids)
        bias = None if valid is None else key_bias(valid, x.dtype)
        for layer in self.model.blocks():
            q, k, v = layer.self_attn.project(layer.input_layernorm(x))
            x = layer.finish(x, attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, bias))
        return self.model.norm(x)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unshifted logits (B, T, V): row i is the output at position i."""
        return self.head(self.hidden_states(input_ids, position_ids, valid))

    # -- the two exported computations -------------------------------------------------
    def encode_context(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_index: torch.Tensor,
        span_index: torch.Tensor,
        suppress: torch.Tensor,
        top_k: int,
        prior_keys: torch.Tensor | None = None,
        prior_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full pass over the window: the cache, and the first denoising step of the span for free.

        input_ids, position_ids (1, T); cache_index (Tc,); span_index (S,) ->
        keys (pre-rotary), values (L, 1, Hkv, Tc, D) at ``cache_index``, and the
        top-k ids, probabilities (1, S, K) and entropy (1, S) at the rows
        ``span_index`` (the masked span, plus the anchor of a shifted model):
        exactly what a span step of the still fully masked span would return, so
        the sampler's first step costs no forward pass of its own. The last
        layer runs only the ``span_index`` rows: nothing reads the others.

        ``prior_keys`` (rotated to their positions) and ``prior_values``
        (L, 1, Hkv, Tp, D): context kept from an earlier pass that every row
        also attends to (:mod:`engine.reuse`); then ``input_ids`` holds only what
        changed around the span. None (or Tp = 0): the whole window is here.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids)
        keys, values = [], []
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.blocks()):
            h = layer.input_layernorm(x)
            if i == last:  # only the span's rows go on to the head: their queries are all it needs
                x = x.index_select(1, span_index)
                q, k, v = layer.self_attn.project(h, queries=span_index)
                q_cos, q_sin = cos.index_select(2, span_index), sin.index_select(2, span_index)
            else:
                q, k, v = layer.self_attn.project(h)
                q_cos, q_sin = cos, sin
            keys.append(k.index_select(2, cache_index))
            values.append(v.index_select(2, cache_index))
            k = apply_rope(k, cos, sin)
            if prior_keys is not None and prior_values is not None:
                k, v = torch.cat((prior_keys[i], k), dim=2), torch.cat((prior_values[i], v), dim=2)
            x = layer.finish(x, attend(apply_rope(q, q_cos, q_sin), k, v, None))
        top_ids, top_probs, entropy = summarize(self.head(self.model.norm(x)), suppress, top_k)
        return torch.stack(keys), torch.stack(values), top_ids, top_probs, entropy

    def span_hidden(
        self,
        span_ids: torch.Tensor,
        span_pos: torch.Tensor,
        span_valid: torch.Tensor,
        cache_keys: torch.Tensor,
        cache_values: torch.Tensor,
        cache_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of the span attending to the cached context and to itself.

        span_ids, span_pos, span_valid (B, S); cache_keys (L, B, Hkv, Tc, D), already
        rotated to each row's layout (:meth:`rotate_cache_keys`); cache_values
        (L, 1, Hkv, Tc, D), shared by every row, or (L, B, Hkv, Tc, D), one per row;
        cache_valid (B, Tc): which cached positions each row attends to (all when
        None). Rows of different requests, their contexts padded to one length, so
        run as one batch (:mod:`engine.scheduler`).
        """
        x = self.model.embed_tokens(span_ids)
        b = x.shape[0]
        cos, sin = self.rotary(span_pos)
        if cache_valid is None:
            cache_valid = torch.ones_like(cache_keys[0, :, 0, :, 0], dtype=torch.bool)  # (B, Tc)
        bias = key_bias(torch.cat((cache_valid.bool(), span_valid.bool()), dim=1), x.dtype)  # (B, 1, 1, Tc+S)
        for i, layer in enumerate(self.model.blocks()):
            q, k, v = layer.self_attn.project(layer.input_layernorm(x))
            k = torch.cat((cache_keys[i], apply_rope(k, cos, sin)), dim=2)
            v = torch.cat((cache_values[i].expand(b, -1, -1, -1), v), dim=2)
            x = layer.finish(x, attend(apply_rope(q, cos, sin), k, v, bias))
        return self.model.norm(x)

    def rotate_cache_keys(self, cache_keys: torch.Tensor, cache_pos: torch.Tensor) -> torch.Tensor:
        """Pre-rotary cached keys (L, 1, Hkv, Tc, D) placed at each row's positions (B, Tc) -> (L, B, Hkv, Tc, D).

        Done once per candidate layout, not in every step: the span step takes the result.
        """
        cos, sin = self.rotary(cache_pos)  # (B, 1, Tc, D)
        return apply_rope(cache_keys, cos[None], sin[None])

    def span_step(
        self,
        span_ids: torch.Tensor,
        span_pos: torch.Tensor,
        span_valid: torch.Tensor,
        cache_keys: torch.Tensor,
        cache_values: torch.Tensor,
        suppress: torch.Tensor,
        top_k: int,
        cache_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One denoising forward of the span: (B, S, K) ids, (B, S, K) probabilities, (B, S) entropy.

        ``cache_keys`` are rotated per row (:meth:`rotate_cache_keys`); see :meth:`span_hidden`.
        """
        hidden = self.span_hidden(span_ids, span_pos, span_valid, cache_keys, cache_values, cache_valid)
        return summarize(self.head(hidden), suppress, top_k)


def summarize(logits: torch.Tensor, suppress: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B, S, V) -> top-k ids and probabilities (B, S, K) and entropy (B, S) in nats."""
    logp = F.log_softmax(logits.float() + suppress, dim=-1)
    top_logp, top_ids = logp.topk(top_k, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return top_ids, top_logp.exp(), entropy


def suppress_vector(vocab_size: int, token_ids: list[int]) -> torch.Tensor:
    """(V,) additive logit bias that rules out ``token_ids``."""
    bias = torch.zeros(vocab_size)
    bias[token_ids] = SUPPRESSED_LOGIT
    return bias


class StreamedTransformer(Transformer):
    """A :class:`Transformer` that holds no weights: each module reads its own from the checkpoint
    as it runs and drops them when it is done.

    The PyTorch reference of a model larger than memory (a 7-8B model's float32
    weights are 30 GB): conversion validates the graphs against it. Every pass
    reads the whole checkpoint once, so it is slow, and it answers exactly as the
    loaded model does (``tests/engine/test_binding.py``).
    """

    def __init__(self, arch: ArchConfig, read: Callable[[str], torch.Tensor]) -> None:
        with torch.device("meta"):
            super().__init__(arch)
        self.rotary = Rotary(arch.head_dim, arch.rope_theta)  # a buffer, not a checkpoint tensor
        self._read = read
        names = {module: prefix for prefix, module in self.named_modules()}
        for module in self.modules():
            if module._parameters:
                module.register_forward_pre_hook(lambda m, _args, prefix=names[module]: self._fill(m, prefix))
                module.register_forward_hook(lambda m, _args, _out: self._drop(m))

    def _fill(self, module: nn.Module, prefix: str) -> None:
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(self._read(f"{prefix}.{name}"), requires_grad=False)

    @staticmethod
    def _drop(module: nn.Module) -> None:
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty(param.shape, device="meta"), requires_grad=False)

    def head_weight(self) -> torch.Tensor:
        """The LM head matrix, read for this use (the embedding when tied)."""
        return self._read("model.embed_tokens.weight" if self.arch.tie_word_embeddings else "lm_head.weight")


def load_transformer(checkpoint: "object", streamed: bool = False) -> Transformer:
    """Build a float32 :class:`Transformer` from an :class:`engine.checkpoint.Checkpoint`.

    The module is built on the ``meta`` device and takes the checkpoint's tensors
    as its parameters (``assign=True``): no second copy of the weights, which at a
    real size is gigabytes of peak memory. ``streamed``: a
    :class:`StreamedTransformer`, for a model larger than memory.
    """
    arch = checkpoint.arch  # type: ignore[attr-defined]
    if streamed:
        return StreamedTransformer(arch, checkpoint.read_tensor).eval()  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = Transformer(arch)
    stored = checkpoint.load_state("pt")  # type: ignore[attr-defined]
    # widened one tensor at a time, each stored (bfloat16) copy dropped as it goes: about 1x the
    # float32 weights at the peak, not the 1.5x of both dicts at once
    state = {name: stored.pop(name).float() for name in list(stored)}
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary = Rotary(arch.head_dim, arch.rope_theta)  # its buffer is not a checkpoint tensor: build it for real
    return model.eval()
