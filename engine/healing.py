"""Token healing at the cursor: the model sees the tokenizations it was trained on.

The prefix ends wherever the user's cursor is: after indentation, inside an
identifier, after a space. Its last token is then often one that never precedes
what comes next in training text. With the shipped tokenizer ``"\\n    return"``
is ``["\\n   ", " return"]``, but a prefix ending at ``"\\n    "`` encodes as
``["\\n    "]``, after which ``return`` is never seen without its leading space:
the model writes `` return`` and the line gets a stray space. The same happens
inside identifiers (``" res"`` where training had ``" result"``).

Healing (as in Microsoft Guidance) backs the prefix up by its last token and
makes the first middle tokens write that text again: each constrained slot takes
the most probable of the model's top-k candidates whose text either extends the
removed text or is a prefix of what remains of it; when none is compatible the
slot takes the removed text's own token (the unhealed tokenization, for that
slot). The engine strips the removed text from the middle it returns. The
price: each constrained slot takes a denoising step of its own, and a middle cut
by the budget before the removed text is written again is empty.

The sampler sees ids only: it asks a :class:`Healing` which ids may go in the
next constrained slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from engine.errors import InputError


@dataclass(frozen=True)
class Healing:
    """The text cut from the end of the prefix, which the first middle tokens must write again."""

    removed: str
    """Text of the prefix's last token, removed before encoding the window."""
    token_text: Callable[[int], str]
    """Text of one token id (special tokens decode to the empty string)."""
    encode: Callable[[str], list[int]]
    """The tokenizer's encoding of a text (no special tokens)."""

    def remaining(self, lead: Sequence[int]) -> str:
        """What of :attr:`removed` the leading committed ids ``lead`` have not written yet ('' when done)."""
        written = "".join(self.token_text(int(i)) for i in lead)
        if len(written) >= len(self.removed):
            return ""
        return self.removed[len(written) :]

    def pending(self, lead: Sequence[int]) -> bool:
        """Whether the next slot after ``lead`` is still constrained."""
        return bool(self.remaining(lead))

    def compatible(self, token: int, rest: str) -> bool:
        """Whether ``token`` may follow when ``rest`` of the removed text is still to be written."""
        text = self.token_text(int(token))
        return bool(text) and (text.startswith(rest) or rest.startswith(text))

    def choose(self, lead: Sequence[int], ranked: Sequence[int]) -> tuple[int, int | None]:
        """The id for the next constrained slot and its rank among ``ranked`` (None: the fallback).

        ``ranked`` are the model's top-k ids for that slot, best first.
        """
        rest = self.remaining(lead)
        for rank, token in enumerate(ranked):
            if self.compatible(int(token), rest):
                return int(token), rank
        ids = self.encode(rest)
        if not ids:  # cannot happen for text a tokenizer produced; refuse rather than loop
            raise InputError(f"the tokenizer encodes {rest!r} to nothing")
        return ids[0], None
