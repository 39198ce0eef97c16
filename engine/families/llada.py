"""The llada family: LLaDA-8B-Base/Instruct and LLaDA-1.5 (GSAI-ML).

Architecture: LLaMA blocks (RMSNorm, rotary embeddings in the ``rotate_half``
convention, grouped- or multi-head attention without biases, SwiGLU MLP, an
untied LM head) in the OLMo code base's layout, as the published
``modeling_llada.py`` builds them:

* attention is fully bidirectional;
* logits are **not** shifted: the token at position i is predicted from the
  hidden state at position i (unlike Dream);
* the mask id comes from the checkpoint (``mask_token_id``, 126336 in
  LLaDA-8B: ``<|mdm_mask|>``, which ``tokenizer_config.json`` does not name);
* the embedding is padded past the tokenizer (126,464 rows): the padding ids
  are suppressed like the mask (see ``Tokenizer.unassigned_ids``).

``config.json`` uses OLMo's keys (``d_model``, ``n_heads``, ``n_layers``,
``mlp_hidden_size``, ...). It also carries ``mlp_ratio`` beside
``mlp_hidden_size``; the modelling code uses ``mlp_hidden_size`` when it is set,
and so do we. Weight names are ``model.transformer.blocks.N.{attn_norm, q_proj,
k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}``, with
``ff_out(silu(ff_proj(x)) * up_proj(x))`` as the MLP.
"""

from __future__ import annotations

from typing import Any, Mapping

from engine.errors import UnsupportedConfigError
from engine.families import ArchConfig, Family, TokenIds


def _matches(config: Mapping[str, Any]) -> bool:
    model_type = str(config.get("model_type", "")).lower()
    archs = [str(a) for a in config.get("architectures") or []]
    return model_type == "llada" or any(a.startswith("LLaDA") for a in archs)


def _require(config: Mapping[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise UnsupportedConfigError(f"config.json lacks {key!r}, which a llada-family model needs")
    return config[key]


_MUST_BE = {
    # key: (value we can run, why another value cannot run)
    "block_type": ("llama", "only LLaMA blocks (separate q/k/v projections, SwiGLU) are expressed by our graphs"),
    "activation_type": ("silu", "the MLP must be SwiGLU"),
    "layer_norm_type": ("rms", "normalisation must be RMSNorm"),
    "rope": (True, "positions must be rotary"),
    "alibi": (False, "ALiBi attention biases are not supported"),
    "attention_layer_norm": (False, "q/k layer norms of the OLMo kind are not supported"),
    "input_emb_norm": (False, "a norm on the input embeddings is not supported"),
    "include_bias": (False, "bias terms in every linear layer are not supported"),
    "include_qkv_bias": (False, "q/k/v biases are not supported in this family"),
    "bias_for_layer_norm": (False, "layer-norm biases are not supported"),
    "scale_logits": (False, "scaled logits are not supported"),
}


def _parse_config(config: Mapping[str, Any]) -> ArchConfig:
    for key, (wanted, why) in _MUST_BE.items():
        value = config.get(key, wanted)
        if key == "block_type":
            value = str(value).lower()
        if value is None and isinstance(wanted, bool):
            value = False
        if value != wanted:
            raise UnsupportedConfigError(f"{key}={config.get(key)!r} cannot run here: {why}")
    if config.get("clip_qkv") is not None:
        raise UnsupportedConfigError(f"clip_qkv={config['clip_qkv']!r} is not supported")
    if not config.get("layer_norm_with_affine", True):
        raise UnsupportedConfigError("layer_norm_with_affine=false is not supported (norms carry a weight)")
    hidden = int(_require(config, "d_model"))
    heads = int(_require(config, "n_heads"))
    kv_heads = config.get("n_kv_heads")
    if config.get("multi_query_attention"):
        kv_heads = 1
    ffn = config.get("mlp_hidden_size")
    if ffn is None:  # OLMo's rule when no explicit size is given
        ffn = int(_require(config, "mlp_ratio")) * hidden
    if hidden % heads:
        raise UnsupportedConfigError(f"d_model={hidden} is not a multiple of n_heads={heads}")
    head_dim = hidden // heads
    if head_dim % 2:
        raise UnsupportedConfigError(f"head dimension {head_dim} must be even for rotary embeddings")
    vocab = int(config.get("embedding_size") or _require(config, "vocab_size"))
    # LLaDA's llama block gives ff_proj and up_proj mlp_hidden_size outputs each (LLaDA-8B:
    # 12288, not mlp_ratio x d_model = 16384); the parameter-count test holds us to it.
    return ArchConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(ffn),
        num_layers=int(_require(config, "n_layers")),
        num_heads=heads,
        num_kv_heads=int(kv_heads or heads),
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        max_positions=int(config.get("max_sequence_length", 4096)),
        qkv_bias=False,
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        shifted=False,
    )


def to_config(arch: ArchConfig, token_ids: TokenIds, **extra: Any) -> dict[str, Any]:
    """A LLaDA-style ``config.json`` for ``arch`` (the keys the published one carries)."""
    if arch.qkv_bias or arch.shifted or arch.qk_norm or arch.head_dim * arch.num_heads != arch.hidden_size:
        raise UnsupportedConfigError("this architecture is not one a llada checkpoint can describe")
    return {
        "activation_type": "silu",
        "alibi": False,
        "architectures": ["LLaDAModelLM"],
        "attention_layer_norm": False,
        "bias_for_layer_norm": False,
        "block_type": "llama",
        "d_model": arch.hidden_size,
        "embedding_size": arch.vocab_size,
        "eos_token_id": token_ids.eos,
        "include_bias": False,
        "include_qkv_bias": False,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": token_ids.mask,
        "max_sequence_length": arch.max_positions,
        "mlp_hidden_size": arch.intermediate_size,
        "mlp_ratio": max(1, arch.intermediate_size // arch.hidden_size),
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": arch.num_heads,
        "n_kv_heads": arch.num_kv_heads,
        "n_layers": arch.num_layers,
        "pad_token_id": token_ids.pad,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope": True,
        "rope_theta": arch.rope_theta,
        "scale_logits": False,
        "vocab_size": arch.vocab_size,
        "weight_tying": arch.tie_word_embeddings,
        **({"bos_token_id": token_ids.bos} if token_ids.bos is not None else {}),
        **extra,
    }


_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}


def _weight_names(arch: ArchConfig) -> dict[str, str]:
    names = {
        "model.embed_tokens.weight": "model.transformer.wte.weight",
        "model.norm.weight": "model.transformer.ln_f.weight",
    }
    for i in range(arch.num_layers):
        for ours, theirs in _BLOCK.items():
            names[f"model.layers.{i}.{ours}"] = f"model.transformer.blocks.{i}.{theirs}"
    if not arch.tie_word_embeddings:
        names["lm_head.weight"] = "model.transformer.ff_out.weight"
    return names


FAMILY = Family(
    name="llada",
    matches=_matches,
    parse_config=_parse_config,
    weight_names=_weight_names,
    special_token_names={
        "mask": ("<|mdm_mask|>",),
        "eos": ("<|endoftext|>", "<|eot_id|>"),
        "pad": ("<|endoftext|>",),
        "bos": ("<|startoftext|>",),
    },
    to_config=to_config,
)
