"""Model families: how a checkpoint's ``config.json`` and weight names map onto our transformer.

A family is a small module exposing a :class:`Family` object. It knows three
things and nothing else: whether a config belongs to it, how to turn that config
into an :class:`ArchConfig` (rejecting values we cannot run), and which checkpoint
tensor feeds each parameter of :mod:`engine.modeling`. Everything downstream
(export, backends, sampler) sees only ``ArchConfig`` and :class:`TokenIds`.

No torch here: family detection runs on the serving path.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass
from typing import Any, Callable, Mapping

from engine.errors import UnknownFamilyError, UnsupportedConfigError


@dataclass(frozen=True)
class ArchConfig:
    """Architecture of a bidirectional (masked diffusion) decoder-style transformer."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    qkv_bias: bool
    tie_word_embeddings: bool
    shifted: bool
    """True when the token at position i is predicted from the hidden state at i-1 (Dream)."""
    qk_norm: bool = False
    """True when queries and keys are RMS-normalised per head before rotary (Qwen3)."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def kv_groups(self) -> int:
        """Query heads served by each key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in an engine manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArchConfig":
        """Inverse of :meth:`to_dict` (fields added later take their defaults when absent)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: data[k] for k in fields if k in data or fields[k].default is MISSING})

    @property
    def parameters(self) -> int:
        """Number of parameters (the LLM-card count: embedding, blocks, norms, untied head)."""
        h, d, ffn = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0) + (2 * d if self.qk_norm else 0)
        block = attn + 3 * h * ffn + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * block + h + head


@dataclass(frozen=True)
class TokenIds:
    """Special token ids a masked diffusion model needs, read from the checkpoint."""

    mask: int
    eos: int
    pad: int
    bos: int | None = None

    @property
    def end_ids(self) -> frozenset[int]:
        """Ids that end a middle span (EOS and pad; both are stripped from results)."""
        return frozenset({self.eos, self.pad})

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in an engine manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TokenIds":
        """Inverse of :meth:`to_dict`."""
        return cls(mask=data["mask"], eos=data["eos"], pad=data["pad"], bos=data.get("bos"))


@dataclass(frozen=True)
class Family:
    """One model family: detection, config parsing and weight naming."""

    name: str
    matches: Callable[[Mapping[str, Any]], bool]
    """True if a ``config.json`` belongs to this family."""
    parse_config: Callable[[Mapping[str, Any]], ArchConfig]
    """Build the architecture; raises ``UnsupportedConfigError`` for values we cannot run."""
    weight_names: Callable[[ArchConfig], dict[str, str]]
    """Map from :mod:`engine.modeling` parameter names to checkpoint tensor names."""
    special_token_names: Mapping[str, tuple[str, ...]]
    """Token strings to look up in the tokenizer when config.json lacks an id."""
    to_config: Callable[[ArchConfig, TokenIds], dict[str, Any]]
    """The ``config.json`` a checkpoint of this family with ``arch`` carries (random-weight checkpoints)."""


def _registry() -> dict[str, Family]:
    from engine.families import dream, llada, qwen3

    return {family.name: family for family in (dream.FAMILY, llada.FAMILY, qwen3.FAMILY)}


def family_names() -> list[str]:
    """Names accepted by ``--family`` and the ``family`` override."""
    return sorted(_registry())


def get_family(name: str) -> Family:
    """Look a family up by name."""
    registry = _registry()
    if name not in registry:
        raise UnknownFamilyError(
            f"unknown model family {name!r}; supported families: {', '.join(sorted(registry))}"
        )
    return registry[name]


def detect_family(config: Mapping[str, Any], override: str | None = None) -> Family:
    """Pick the family of a checkpoint from its ``config.json`` (or the explicit override)."""
    if override:
        return get_family(override)
    for family in _registry().values():
        if family.matches(config):
            return family
    model_type = config.get("model_type")
    archs = config.get("architectures")
    raise UnknownFamilyError(
        f"config.json (model_type={model_type!r}, architectures={archs!r}) is not a model family "
        f"this engine supports ({', '.join(family_names())}). If it is a dream-family model "
        "(Qwen2 architecture, bidirectional attention, shifted logits), pass --family dream."
    )
