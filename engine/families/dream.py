"""The dream family: Dream-v0, Dream-Coder-v0, DiffuCoder, Open-dCoder (and our default model).

Architecture: Qwen2 (RMSNorm, rotary embeddings with the config's theta,
grouped-query attention, bias on the q/k/v projections, SwiGLU MLP, tied or
untied LM head) with two differences that make it a masked diffusion model:

* attention is fully bidirectional (no causal mask);
* logits are *shifted*: the token at position i is predicted from the hidden
  state at position i-1, as in the autoregressive model Dream was adapted from.

Weight names are exactly Qwen2's (``model.layers.N.self_attn.q_proj.weight``, ...),
which are also the parameter names of :mod:`engine.modeling`.
"""

from __future__ import annotations

from typing import Any, Mapping

from engine.errors import UnsupportedConfigError
from engine.families import ArchConfig, Family, TokenIds


def _matches(config: Mapping[str, Any]) -> bool:
    model_type = str(config.get("model_type", "")).lower()
    archs = [str(a) for a in config.get("architectures") or []]
    if model_type == "dream" or any("Dream" in a for a in archs):
        return True
    # Qwen2 checkpoints trained as diffusion models (Open-dCoder style) carry a mask id.
    return model_type == "qwen2" and "mask_token_id" in config


def _require(config: Mapping[str, Any], key: str, family: str) -> Any:
    if key not in config:
        raise UnsupportedConfigError(f"config.json lacks {key!r}, which a {family}-family model needs")
    return config[key]


def parse_qwen_config(
    config: Mapping[str, Any], *, family: str, qkv_bias: bool, qk_norm: bool, tied: bool
) -> ArchConfig:
    """A shifted bidirectional model from a Qwen2/Qwen3-style ``config.json`` (the keys both use).

    ``qkv_bias`` and ``tied`` are the defaults when ``attention_bias`` /
    ``tie_word_embeddings`` are absent; ``qk_norm`` is the family's (Qwen3).
    """
    hidden = int(_require(config, "hidden_size", family))
    heads = int(_require(config, "num_attention_heads", family))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"hidden_act={act!r} is not supported ({family} family uses 'silu')")
    rope_scaling = config.get("rope_scaling")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type")) if isinstance(rope_scaling, dict) else rope_scaling
    if rope_scaling not in (None, {}) and kind != "default":
        raise UnsupportedConfigError(
            f"rope_scaling={rope_scaling!r} is not supported yet; only plain rotary embeddings are"
        )
    if config.get("use_sliding_window"):
        raise UnsupportedConfigError("use_sliding_window=true is not supported (attention must be full)")
    if head_dim % 2:
        raise UnsupportedConfigError(f"head_dim={head_dim} must be even for rotary embeddings")
    return ArchConfig(
        vocab_size=int(_require(config, "vocab_size", family)),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size", family)),
        num_layers=int(_require(config, "num_hidden_layers", family)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        max_positions=int(config.get("max_position_embeddings", 32768)),
        qkv_bias=bool(config.get("attention_bias", qkv_bias)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", tied)),
        shifted=True,
        qk_norm=qk_norm,
    )


def _parse_config(config: Mapping[str, Any]) -> ArchConfig:
    return parse_qwen_config(config, family="dream", qkv_bias=True, qk_norm=False, tied=False)


def to_config(arch: ArchConfig, token_ids: TokenIds, **extra: Any) -> dict[str, Any]:
    """A Dream-style ``config.json`` for ``arch`` (the inverse of parsing); ``extra`` keys are appended."""
    if arch.qk_norm or not arch.shifted:
        raise UnsupportedConfigError("this architecture is not one a dream checkpoint can describe")
    return {
        **qwen_config_keys(arch, token_ids),
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "attention_bias": arch.qkv_bias,
        **extra,
    }


def qwen_config_keys(arch: ArchConfig, token_ids: TokenIds) -> dict[str, Any]:
    """The Qwen2/Qwen3 ``config.json`` keys that describe ``arch`` and the special ids."""
    return {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_positions,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "use_sliding_window": False,
        "torch_dtype": "float32",
        "mask_token_id": token_ids.mask,
        "eos_token_id": token_ids.eos,
        "pad_token_id": token_ids.pad,
        "bos_token_id": token_ids.bos,
        "head_dim": arch.head_dim,
    }


def qwen_weight_names(arch: ArchConfig) -> dict[str, str]:
    """Qwen2/Qwen3 tensor names, which are also :mod:`engine.modeling`'s (an identity map)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
            if arch.qkv_bias and proj != "o_proj":
                names.append(f"{p}self_attn.{proj}.bias")
        if arch.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [f"{p}mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return {name: name for name in names}


FAMILY = Family(
    name="dream",
    matches=_matches,
    parse_config=_parse_config,
    weight_names=qwen_weight_names,
    special_token_names={
        "mask": ("<|mask|>", "<M>", "<mask>", "[MASK]"),
        "eos": ("<|endoftext|>", "</s>", "<|eos|>"),
        "pad": ("<|dlm_pad|>", "<|pad|>", "<|endoftext|>"),
        "bos": ("<|beginoftext|>", "<|bos|>", "<s>"),
    },
    to_config=to_config,
)
