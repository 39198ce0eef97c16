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

When the confident part does not parse, shorter leading parts at token boundaries
(never splitting an identifier) are tried, longest first, a few at most.

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
MAX_CANDIDATES = 6
"""Leading parts tried against the parse check, longest first (each costs a parse of the document)."""
WHOLE_DOCUMENT_CHARS = 50_000
"""Up to this size the parse check reads the whole document (its cost is in docs/quality.md, "Latency");
beyond it, the window around the cursor that the other syntax decisions use."""
HIDDEN = {
    "confidence": "its first tokens are below minConfidence",
    "short": "too short to be worth showing",
    "indentation": "it would change the line's indentation",
    "whitespace": "it would double a space",
    "parse": "inserting it adds a parse error",
}
"""Why the gate hid a suggestion (the verdict's reason), as users are told."""
REASONS = ("shown", "cut", *HIDDEN)
"""Every verdict: shown whole, shown cut to a confident leading part, or hidden (:data:`HIDDEN`)."""


@dataclass(frozen=True)
class Verdict:
    """What the gate decided: the suggestion to show (None: nothing) and why (one of :data:`REASONS`)."""

    suggestion: Suggestion | None
    reason: str


def confident_length(token_ends: Sequence[int], confidence: Sequence[float], threshold: float) -> int:
    """Length of the leading part of a middle written by tokens at least ``threshold`` confident.

    ``token_ends[i]`` is where token ``i``'s text ends in the middle (a token that
    holds part of a character ends before it, so the character counts only when
    every token of it is confident).
    """
    kept = 0
    for end, probability in zip(token_ends, confidence):
        if probability < threshold:
            return kept
        kept = max(kept, end)
    return kept


def whitespace_problem(text: str, line_prefix: str) -> str | None:
    """``indentation`` or ``whitespace`` when inserting ``text`` after ``line_prefix`` spoils the
    line's whitespace (more indentation on a line of only indentation, a doubled space), else None."""
    if not text or text[0] not in " \t" or not line_prefix:
        return None
    if not line_prefix.strip():
        return "indentation"
    return "whitespace" if line_prefix[-1] in " \t" else None


def parse_surroundings(text: str, offset: int, ctx: Context) -> tuple[str, str]:
    """The text before and after the cursor that the parse check reads.

    The whole document when it is small enough: a window can start or end inside a
    string or a bracket, and then a suggestion that breaks what follows looks harmless.
    """
    if len(text) <= WHOLE_DOCUMENT_CHARS:
        return text[:offset], text[offset:]
    return ctx.text_before or ctx.line_prefix, ctx.text_after or ctx.line_suffix


def adds_parse_errors(parser: Any, before: str, text: str, after: str, replace_suffix: int = 0,
                      baseline: int | None = None) -> bool:
    """Whether inserting ``text`` at the cursor (replacing ``replace_suffix`` characters after it) gives
    the document more ``ERROR``/missing nodes than it has now (``baseline``, counted when not given)."""
    if baseline is None:
        baseline = parse_errors(parser, before + after)
    return parse_errors(parser, before + text + after[replace_suffix:]) > baseline


def _word_boundary(text: str, cut: int) -> int:
    """``cut`` moved back to the start of the identifier it would split."""
    if 0 < cut < len(text) and IDENTIFIER_CHAR.match(text[cut - 1]) and IDENTIFIER_CHAR.match(text[cut]):
        while cut > 0 and IDENTIFIER_CHAR.match(text[cut - 1]):
            cut -= 1
    return cut


def _line_ends_stripped(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.split("\n"))


def _to_suggestion(length: int, text: str, raw_text: str) -> int | None:
    """``length`` characters of ``raw_text`` as a length in ``text`` (the post-processed suggestion).

    Post-processing only trims, so ``text`` is a prefix of ``raw_text``, except
    that trailing spaces of its lines may be gone; None when it is neither.
    """
    if raw_text.startswith(text.rstrip()):
        return min(len(text), length)
    if _line_ends_stripped(raw_text).startswith(text.rstrip()):
        return min(len(text), len(_line_ends_stripped(raw_text[:length])))
    return None


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

    ``token_ends`` / ``confidence`` describe the tokens of ``raw_text`` that the
    model wrote (see :class:`engine.Completion`; healed tokens left out).
    ``surroundings`` is the text before and after the cursor to parse
    (:func:`parse_surroundings`; default: ``ctx``'s window).
    """
    if min_confidence <= 0:
        return Verdict(suggestion, "shown")
    text = suggestion.text
    raw_confident = confident_length(token_ends, confidence, min_confidence)
    confident = _to_suggestion(raw_confident, text, raw_text)
    if confident is None:
        return Verdict(None, "confidence")  # no token information for this text: do not vouch for it
    candidates: list[Suggestion] = [suggestion] if confident == len(text) else []
    cuts = sorted({_to_suggestion(end, text, raw_text) or 0 for end in token_ends if 0 < end <= raw_confident}, reverse=True)
    for end in cuts:  # shorter leading parts; what a cut part absorbed after the cursor is given back
        part = text[: _word_boundary(text, end)].rstrip()
        if part and part != text and all(part != c.text for c in candidates):
            candidates.append(Suggestion(part))
    if not any(c.text.strip() for c in candidates):
        return Verdict(None, "confidence")
    candidates = [c for c in candidates if len("".join(c.text.split())) >= MIN_VISIBLE_CHARS][:MAX_CANDIDATES]
    if not candidates:
        return Verdict(None, "short")
    problem = whitespace_problem(candidates[0].text, ctx.line_prefix)
    if problem:
        return Verdict(None, problem)
    parser = parser_for(ctx.language)
    before, after = surroundings or (ctx.text_before or ctx.line_prefix, ctx.text_after or ctx.line_suffix)
    baseline = parse_errors(parser, before + after) if parser is not None else 0
    for candidate in candidates:  # longest first; without a grammar the first one
        if parser is None or not adds_parse_errors(parser, before, candidate.text, after, candidate.replace_suffix, baseline):
            return Verdict(candidate, "shown" if candidate is suggestion else "cut")
    return Verdict(None, "parse")
