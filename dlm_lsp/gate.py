"""Show only what is likely right: the confidence and syntax gate after post-processing.

A user would rather see nothing than junk. The engine reports, for every middle
token, the probability the model gave it when it was committed; the gate keeps
the leading part of a suggestion whose tokens all reached ``min_confidence`` and
cuts it before the first token that did not (at an identifier boundary, so a
word is never shown half written). What is left is shown only if

* it has something visible,
* it does not change the indentation of the cursor's line (the line holds only
  indentation and the suggestion starts with more) or double a space,
* inserting it adds no tree-sitter parse error to the document around the cursor
  beyond those already there (languages with a grammar).

``min_confidence = 0`` turns the gate off. The default is calibrated on held-out
code with ``dlm-lsp evaluate`` (see ``docs/quality.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from dlm_lsp.postprocess import Context, Suggestion
from dlm_lsp.syntax import parse_errors, parser_for

IDENTIFIER_CHAR = re.compile(r"\w")
REASONS = ("shown", "cut", "confidence", "indentation", "whitespace", "parse")
"""Verdicts: shown whole, shown cut to its confident part, or hidden and why."""


@dataclass(frozen=True)
class Verdict:
    """What the gate decided: the suggestion to show (None: nothing) and why."""

    suggestion: Suggestion | None
    reason: str


def confident_length(token_ends: Sequence[int], confidence: Sequence[float], threshold: float) -> int:
    """Length of the leading part of a middle written by tokens at least ``threshold`` confident.

    ``token_ends[i]`` is where token ``i``'s text ends in the middle; tokens that
    end at or before the previous one (healed text, empty pieces) are skipped.
    """
    kept = 0
    for end, probability in zip(token_ends, confidence):
        if end <= kept:
            continue
        if probability < threshold:
            return kept
        kept = end
    return kept


def _word_boundary(text: str, cut: int) -> int:
    """``cut`` moved back to the start of the identifier it would split."""
    if 0 < cut < len(text) and IDENTIFIER_CHAR.match(text[cut - 1]) and IDENTIFIER_CHAR.match(text[cut]):
        while cut > 0 and IDENTIFIER_CHAR.match(text[cut - 1]):
            cut -= 1
    return cut


def gate(
    suggestion: Suggestion,
    raw_text: str,
    token_ends: Sequence[int],
    confidence: Sequence[float],
    ctx: Context,
    min_confidence: float,
) -> Verdict:
    """The part of ``suggestion`` (post-processed from the engine's ``raw_text``) that may be shown.

    ``token_ends`` / ``confidence`` describe the tokens of ``raw_text`` (see
    :class:`engine.Completion`); the suggestion's text is a prefix of it, as every
    post-processing filter only trims.
    """
    if min_confidence <= 0:
        return Verdict(suggestion, "shown")
    text = suggestion.text
    if not raw_text.startswith(text.rstrip()):
        return Verdict(None, "confidence")  # no token information for this text: do not vouch for it
    cut = min(len(text), confident_length(token_ends, confidence, min_confidence))
    replace_suffix = suggestion.replace_suffix
    if cut < len(text):
        text = text[: _word_boundary(text, cut)].rstrip()
        replace_suffix = 0  # what it absorbed after the cursor was in the part cut away
    if not text.strip():
        return Verdict(None, "confidence")
    line_prefix = ctx.line_prefix
    if text[0] in " \t" and line_prefix:
        if not line_prefix.strip():
            return Verdict(None, "indentation")
        if line_prefix[-1] in " \t":
            return Verdict(None, "whitespace")
    parser = parser_for(ctx.language)
    if parser is not None:
        before = ctx.text_before or line_prefix
        after = ctx.text_after or ctx.line_suffix
        if parse_errors(parser, before + text + after[replace_suffix:]) > parse_errors(parser, before + after):
            return Verdict(None, "parse")
    if text == suggestion.text:
        return Verdict(suggestion, "shown")
    return Verdict(Suggestion(text, replace_suffix), "cut")
