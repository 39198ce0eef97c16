"""Show only what is likely right: the confidence and syntax gate after post-processing.

A user would rather see nothing than junk. The engine reports, for every middle
token, the probability the model gave it when it was committed; the gate keeps
the leading part of a suggestion whose tokens all reached ``min_confidence`` and
cuts it before the first token that did not (at an identifier boundary, so a
word is never shown half written). What is left is shown only if

* it shows at least two characters that are not spaces,
* it does not change the indentation of the cursor's line (the line holds only
  indentation and the suggestion starts with more) or double a space,
* inserting it adds no tree-sitter parse error to the document beyond those
  already there (languages with a grammar). The whole document is parsed up to
  50,000 characters: a window can start or end inside a string or a bracket,
  where a suggestion that breaks the code after it looks harmless.

When only a tail is unsure, the longest confident leading part (at token
boundaries, never splitting an identifier) that passes these checks is shown.

``min_confidence = 0`` turns the gate off. The default is calibrated on held-out
code with ``dlm-lsp evaluate`` (see ``docs/quality.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from dlm_lsp.postprocess import Context, Suggestion
from dlm_lsp.syntax import parse_errors, parser_for

IDENTIFIER_CHAR = re.compile(r"\w")
MIN_VISIBLE_CHARS = 2
"""A suggestion must show at least this many non-space characters: a lone ``=`` or ``)`` is noise."""
MAX_CUTS = 4
"""Leading parts of an unsure suggestion tried against the parse check, longest first."""
WHOLE_DOCUMENT_CHARS = 50_000
"""Up to this size the parse check reads the whole document (tree-sitter: ~0.2 ms per KB of Python on
our 2-core machine); beyond it, the window around the cursor that the other syntax decisions use."""
REASONS = ("shown", "cut", "confidence", "short", "indentation", "whitespace", "parse")
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


def adds_parse_errors(parser: Any, before: str, text: str, after: str) -> bool:
    """Whether inserting ``text`` between ``before`` and ``after`` adds ``ERROR``/missing nodes."""
    return parse_errors(parser, before + text + after) > parse_errors(parser, before + after)


def parse_surroundings(text: str, offset: int, ctx: Context) -> tuple[str, str]:
    """The text before and after the cursor that the parse check reads.

    The whole document when it is small enough: a window can start or end inside a
    string or a bracket, and then a suggestion that breaks what follows looks harmless.
    """
    if len(text) <= WHOLE_DOCUMENT_CHARS:
        return text[:offset], text[offset:]
    return ctx.text_before or ctx.line_prefix, ctx.text_after or ctx.line_suffix


def gate(
    suggestion: Suggestion,
    raw_text: str,
    token_ends: Sequence[int],
    confidence: Sequence[float],
    ctx: Context,
    min_confidence: float,
    surroundings: tuple[str, str] | None = None,
) -> Verdict:
    """The part of ``suggestion`` (post-processed from the engine's ``raw_text``) that may be shown.

    ``token_ends`` / ``confidence`` describe the tokens of ``raw_text`` (see
    :class:`engine.Completion`); the suggestion's text is a prefix of it, as every
    post-processing filter only trims. ``surroundings`` is the text before and
    after the cursor to parse (:func:`parse_surroundings`; default: ``ctx``'s window).
    """
    if min_confidence <= 0:
        return Verdict(suggestion, "shown")
    text = suggestion.text
    if not raw_text.startswith(text.rstrip()):
        return Verdict(None, "confidence")  # no token information for this text: do not vouch for it
    confident = min(len(text), confident_length(token_ends, confidence, min_confidence))
    if confident == len(text):
        candidates = [suggestion]
    else:  # the confident part, then shorter ones at token boundaries, longest first
        ends = sorted({min(confident, e) for e in token_ends if 0 < e <= confident} | {confident}, reverse=True)
        cuts = dict.fromkeys(text[: _word_boundary(text, end)].rstrip() for end in ends[:MAX_CUTS])
        candidates = [Suggestion(cut) for cut in cuts if cut.strip()]  # what it absorbed after the cursor is cut away
    if not candidates:
        return Verdict(None, "confidence")
    candidates = [c for c in candidates if len("".join(c.text.split())) >= MIN_VISIBLE_CHARS]
    if not candidates:
        return Verdict(None, "short")
    line_prefix = ctx.line_prefix
    if candidates[0].text[0] in " \t" and line_prefix:
        if not line_prefix.strip():
            return Verdict(None, "indentation")
        if line_prefix[-1] in " \t":
            return Verdict(None, "whitespace")
    parser = parser_for(ctx.language)
    before, after = surroundings or (ctx.text_before or line_prefix, ctx.text_after or ctx.line_suffix)
    for candidate in candidates:
        if parser is None or not adds_parse_errors(parser, before, candidate.text, after[candidate.replace_suffix :]):
            return Verdict(candidate, "shown" if candidate is suggestion else "cut")
    return Verdict(None, "parse")
