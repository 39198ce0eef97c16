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


def _require(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        raise UnsupportedConfigError(f"config.json lacks {key!r}, which a dream-family model needs")
    return config[key]


def _parse_config(config: Mapping[str, Any]) -> ArchConfig:
    hidden = int(_require(config, "hidden_size"))
    heads = int(_require(config, "num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"hidden_act={act!r} is not supported (dream family uses 'silu')")
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
        vocab_size=int(_require(config, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size")),
        num_layers=int(_require(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        max_positions=int(config.get("max_position_embeddings", 32768)),
        qkv_bias=bool(config.get("attention_bias", True)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        shifted=True,
    )


def to_config(arch: ArchConfig, token_ids: TokenIds, **extra: Any) -> dict[str, Any]:
    """A Dream-style ``config.json`` for ``arch`` (the inverse of parsing); ``extra`` keys are appended."""
    return {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
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
        **extra,
    }


def _weight_names(arch: ArchConfig) -> dict[str, str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
            if arch.qkv_bias and proj != "o_proj":
                names.append(f"{p}self_attn.{proj}.bias")
        names += [f"{p}mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return {name: name for name in names}


FAMILY = Family(
    name="dream",
    matches=_matches,
    parse_config=_parse_config,
    weight_names=_weight_names,
    special_token_names={
        "mask": ("<|mask|>", "<M>", "<mask>", "[MASK]"),
        "eos": ("<|endoftext|>", "</s>", "<|eos|>"),
        "pad": ("<|dlm_pad|>", "<|pad|>", "<|endoftext|>"),
        "bos": ("<|beginoftext|>", "<|bos|>", "<s>"),
    },
)
