"""Text <-> token ids, and the special token ids a diffusion model needs.

Wraps Hugging Face ``tokenizers`` (a ``tokenizer.json``): fast, torch-free, and the
format every checkpoint we support ships. Special ids are read from the
checkpoint (``config.json`` first, then ``tokenizer_config.json`` /
``special_tokens_map.json``, then the family's well-known token strings);
they are never hard-coded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.errors import TokenizerError
from engine.families import Family, TokenIds


class Tokenizer:
    """A ``tokenizer.json`` loaded with Hugging Face ``tokenizers``."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"{path} not found: a model folder needs the tokenizer.json its model was trained with"
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{path} is not a readable tokenizer.json ({exc})") from exc
        self.path = path

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without adding any special token."""
        if not text:
            return []
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept: callers strip what they must)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)

    def unassigned_ids(self, vocab_size: int) -> list[int]:
        """Ids below ``vocab_size`` that no token has.

        Checkpoints pad their embedding past the tokenizer (Qwen2's 151,936 rows,
        LLaDA's 126,464): those rows were never trained and must never be predicted.
        """
        return [i for i in range(vocab_size) if self._tok.id_to_token(i) is None]

    def ids_containing(self, text: str) -> frozenset[int]:
        """Ids whose own text contains ``text`` (every id decoded once, in one batch)."""
        pieces = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return frozenset(i for i, piece in enumerate(pieces) if text in piece)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _token_string(value: Any) -> str | None:
    """``special_tokens_map`` entries are strings or ``{"content": ...}`` objects."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def resolve_token_ids(
    folder: Path, config: Mapping[str, Any], tokenizer: Tokenizer, family: Family
) -> TokenIds:
    """Find the mask, EOS, pad and BOS ids of a checkpoint.

    Order of precedence for each: ``<name>_token_id`` in ``config.json``; the
    ``<name>_token`` string of ``tokenizer_config.json`` or
    ``special_tokens_map.json``; the family's well-known strings. Pad falls back
    to EOS; BOS is optional.
    """
    token_maps = [_read_json(folder / "tokenizer_config.json"), _read_json(folder / "special_tokens_map.json")]
    found: dict[str, int | None] = {}
    for name in ("mask", "eos", "pad", "bos"):
        value = config.get(f"{name}_token_id")
        if isinstance(value, list):  # generation configs sometimes list several EOS ids
            value = value[0] if value else None
        if value is None:
            for token_map in token_maps:
                token = _token_string(token_map.get(f"{name}_token"))
                if token is not None and tokenizer.token_to_id(token) is not None:
                    value = tokenizer.token_to_id(token)
                    break
        if value is None:
            for token in family.special_token_names.get(name, ()):
                if tokenizer.token_to_id(token) is not None:
                    value = tokenizer.token_to_id(token)
                    break
        found[name] = int(value) if value is not None else None
    if found["mask"] is None:
        raise TokenizerError(
            f"no mask token found for {folder}: set mask_token_id in config.json or add one of "
            f"{', '.join(family.special_token_names.get('mask', ()))} to the tokenizer"
        )
    if found["eos"] is None:
        raise TokenizerError(f"no EOS token found for {folder}: set eos_token_id in config.json")
    return TokenIds(
        mask=found["mask"],
        eos=found["eos"],
        pad=found["pad"] if found["pad"] is not None else found["eos"],
        bos=found["bos"],
    )
