"""What the model sees: prefix and suffix windows, and snippets from other open files.

The text is cut by characters first (cheap, generous: about 6 characters per
budgeted token) and then by tokens in the engine (``max_prefix_tokens`` /
``max_suffix_tokens``). Snippets from other open documents of the same language
are chosen by Jaccard similarity of identifier sets against the lines around the
cursor, and placed before the prefix as a commented block, within their own
token budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from dlm_lsp.postprocess import Context
from dlm_lsp.settings import Settings
from dlm_lsp.syntax import wants_multiline

CHARS_PER_TOKEN = 6  # generous upper bound for code; the engine cuts by tokens exactly
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
COMMENT = {"python": "#", "ruby": "#", "shellscript": "#", "r": "#", "perl": "#", "yaml": "#", "toml": "#", "lua": "--", "sql": "--"}
SNIPPET_LINES = 12
PARSE_WINDOW_BEFORE = 4000  # characters of the document parsed around a suggestion
PARSE_WINDOW_AFTER = 1500
TOP_LEVEL_LINE = re.compile(r"\n(?=[^\s])")
WHOLE_TEXT_CHARS = 64_000
"""Documents up to this size are passed whole (the gate parses documents of up to 50,000 characters whole)."""
WINDOW_MARGIN = 1_000
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class OpenDocument:
    """Another document open in the editor."""

    uri: str
    language_id: str
    text: str


@dataclass(frozen=True)
class CompletionContext:
    """Everything a completion needs from the document."""

    prefix: str
    """Text before the cursor given to the model (other-file snippets first)."""
    suffix: str
    """Text after the cursor given to the model."""
    post: Context
    """What the post-processing filters need."""
    multiline: bool
    snippets: int
    """How many other-file snippets were added."""


def identifiers(text: str) -> set[str]:
    """Identifiers of three or more characters."""
    return set(IDENTIFIER.findall(text))


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b| (0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 0.0


def similar_snippets(around: str, others: Iterable[OpenDocument], budget_chars: int) -> list[tuple[str, str]]:
    """(uri, snippet) pairs from ``others``, most similar to ``around`` first, within ``budget_chars``."""
    target = identifiers(around)
    scored = []
    for doc in others:
        lines = doc.text.splitlines()
        for start in range(0, max(1, len(lines)), SNIPPET_LINES // 2):
            chunk = "\n".join(lines[start : start + SNIPPET_LINES])
            score = jaccard(target, identifiers(chunk))
            if score > 0.1 and chunk.strip():
                scored.append((score, doc.uri, chunk))
    scored.sort(key=lambda item: -item[0])
    chosen, used = [], 0
    for _score, uri, chunk in scored:
        if used + len(chunk) > budget_chars:
            continue
        chosen.append((uri, chunk))
        used += len(chunk)
    return chosen


def parse_window(prefix: str, suffix: str) -> tuple[str, str]:
    """The text around the cursor that syntax decisions look at: about ``PARSE_WINDOW_BEFORE``
    characters before it and ``PARSE_WINDOW_AFTER`` after it.

    Splitting and parsing the whole document on every keystroke costs tens of
    milliseconds in a 10,000-line file. The window before the cursor starts at a
    line that is not indented (a top-level statement, so it parses cleanly) at or
    before the cut, looking back at most another window; failing that, at the
    first line start after the cut. The window after it ends likewise before the
    last top-level line within its size (a cut inside a statement or a string would
    count errors that are not there).
    """
    after = suffix
    if len(suffix) > PARSE_WINDOW_AFTER:  # end before a top-level line too, not inside a statement or string
        after = suffix[:PARSE_WINDOW_AFTER]
        ends = [m.start() + 1 for m in TOP_LEVEL_LINE.finditer(after)]
        after = after[: ends[-1]] if ends and ends[-1] > after.find("\n") + 1 else after
    cut = len(prefix) - PARSE_WINDOW_BEFORE
    if cut <= 0:
        return prefix, after
    lookback = prefix[max(0, cut - PARSE_WINDOW_BEFORE) : cut + 1]
    starts = [m.end() for m in TOP_LEVEL_LINE.finditer(lookback)]
    if starts:
        start = max(0, cut - PARSE_WINDOW_BEFORE) + starts[-1]
    else:
        start = prefix.find("\n", cut) + 1 or cut
    return prefix[start:], after


def without_surrogates(text: str) -> str:
    """``text`` with each lone surrogate (JSON allows ``"\\ud800"``; no tokenizer takes it) as U+FFFD.

    One character for one, so every offset into the text stays where it was.
    """
    if text.isascii() or not SURROGATE.search(text):
        return text
    return SURROGATE.sub("\ufffd", text)


def window(text: str, offset: int, settings: Settings) -> tuple[str, int, int]:
    """The part of ``text`` a completion at ``offset`` can use: (window, offset in it, where it starts).

    Everything after this works on the window, so a completion in a 5 MB file, or on a
    5 MB line, copies, hashes and scans what one in a small file does. It holds the
    prefix and suffix windows, the text the syntax checks parse around the cursor
    (:func:`parse_window`: up to twice ``PARSE_WINDOW_BEFORE`` before it), and a margin.
    """
    if len(text) <= WHOLE_TEXT_CHARS:
        return text, offset, 0
    before = max(settings.prefix_tokens * CHARS_PER_TOKEN, 2 * PARSE_WINDOW_BEFORE) + WINDOW_MARGIN
    after = max(settings.suffix_tokens * CHARS_PER_TOKEN, PARSE_WINDOW_AFTER) + WINDOW_MARGIN
    start = max(0, offset - before)
    return text[start : offset + after], offset - start, start


def build_context(
    text: str,
    offset: int,
    language_id: str,
    settings: Settings,
    others: Iterable[OpenDocument] = (),
) -> CompletionContext:
    """Prefix/suffix windows, snippets and filter context at character ``offset`` of ``text``."""
    prefix_full, suffix_full = text[:offset], text[offset:]
    prefix = prefix_full[-settings.prefix_tokens * CHARS_PER_TOKEN :] if settings.prefix_tokens else ""
    suffix = suffix_full[: settings.suffix_tokens * CHARS_PER_TOKEN] if settings.suffix_tokens else ""
    before, after = parse_window(prefix_full, suffix_full)
    head = before.split("\n")
    tail = after.split("\n")
    row, col = len(head) - 1, len(head[-1])
    lines = head[:-1] + [head[-1] + tail[0]] + tail[1:]
    multiline = {"always": True, "never": False}.get(settings.multiline) if settings.multiline != "auto" else None
    if multiline is None:
        multiline = wants_multiline(lines, row, col, language_id)
    snippets = []
    if settings.other_files and settings.other_files_tokens > 0:
        same_language = [d for d in others if d.language_id == language_id]
        around = "\n".join(head[-15:] + tail[:5])
        snippets = similar_snippets(around, same_language, settings.other_files_tokens * CHARS_PER_TOKEN // 2)
    if snippets:
        mark = COMMENT.get(language_id, "//")
        block = "".join(
            f"{mark} From {uri.rsplit('/', 1)[-1]}:\n" + "".join(f"{mark} {line}\n" for line in chunk.splitlines())
            for uri, chunk in snippets
        )
        prefix = block + "\n" + prefix
    post = Context(
        line_prefix=head[-1],
        line_suffix=tail[0],
        next_lines=tuple(tail[1:8]),
        previous_lines=tuple(head[-6:-1]),
        multiline=multiline,
        language=language_id,
        text_before=before,
        text_after=after,
    )
    return CompletionContext(prefix=prefix, suffix=suffix, post=post, multiline=multiline, snippets=len(snippets))
