"""The qwen3 family: diffusion models adapted from Qwen3, such as Salesforce's CoDA-v0 (1.7B).

Architecture: Qwen3 blocks (RMSNorm, rotary embeddings, grouped-query
attention without biases, a per-head RMSNorm on queries and keys before rotary,
SwiGLU MLP; ``head_dim`` is its own key, not ``hidden_size / heads``) with, as
in the dream family, fully bidirectional attention and *shifted* logits.

Checked against the published CoDA code (``CoDALanguageModel/modeling_coda.py``
and ``generation_utils.py``): attention runs with ``is_causal=False`` (a causal
mask is built but never passed on), generation shifts the logits by one, and
``lm_head`` is a separate linear layer that the class never ties to the
embedding, so a config without ``tie_word_embeddings`` means untied here.
Weight names are Qwen3's (``model.layers.N.self_attn.q_norm.weight``, ...).
"""

from __future__ import annotations

from typing import Any, Mapping

from engine.errors import UnsupportedConfigError
from engine.families import ArchConfig, Family, TokenIds
from engine.families.dream import parse_qwen_config, qwen_config_keys, qwen_weight_names


def _matches(config: Mapping[str, Any]) -> bool:
    model_type = str(config.get("model_type", "")).lower()
    archs = [str(a) for a in config.get("architectures") or []]
    if model_type == "coda" or any(a.startswith("CoDA") for a in archs):
        return True
    return model_type == "qwen3" and "mask_token_id" in config


def _parse_config(config: Mapping[str, Any]) -> ArchConfig:
    return parse_qwen_config(config, family="qwen3", qkv_bias=False, qk_norm=True, tied=False)


def to_config(arch: ArchConfig, token_ids: TokenIds, **extra: Any) -> dict[str, Any]:
    """A CoDA-style ``config.json`` for ``arch``."""
    if not arch.qk_norm or not arch.shifted:
        raise UnsupportedConfigError("this architecture is not one a qwen3 checkpoint can describe")
    return {
        **qwen_config_keys(arch, token_ids),
        "architectures": ["CoDALanguageModel"],
        "model_type": "CoDA",
        "attention_bias": arch.qkv_bias,
        **extra,
    }


FAMILY = Family(
    name="qwen3",
    matches=_matches,
    parse_config=_parse_config,
    weight_names=qwen_weight_names,
    special_token_names={
        "mask": ("<|mask|>",),
        "eos": ("<|im_end|>", "<|endoftext|>"),
        "pad": ("<|endoftext|>",),
        "bos": ("<|im_start|>",),
    },
    to_config=to_config,
)
