"""The confidence and syntax gate: what is shown, cut or hidden, and why."""

from __future__ import annotations

import pytest

from dlm_lsp.gate import HIDDEN, REASONS, Verdict, adds_parse_errors, confident_length, gate, parse_surroundings, whitespace_problem
from dlm_lsp.postprocess import Context, Suggestion
from dlm_lsp.syntax import parser_for

BEFORE = "import os\n\n\ndef size(path):\n    return "
AFTER = "\n\n\ndef main():\n    print(size('.'))\n"


def ctx(line_prefix: str = "    return ", before: str = BEFORE, after: str = AFTER, language: str = "python") -> Context:
    return Context(line_prefix=line_prefix, line_suffix=after.split("\n")[0], language=language,
                   text_before=before, text_after=after)


def tokens(*pieces: tuple[str, float]) -> tuple[str, list[int], list[float]]:
    """The raw middle, token ends and confidences of (text, probability) pieces."""
    ends, text = [], ""
    for piece, _ in pieces:
        text += piece
        ends.append(len(text))
    return text, ends, [p for _, p in pieces]


def test_confident_length_stops_before_the_first_unsure_token():
    assert confident_length([3, 8, 12], [0.9, 0.5, 0.1], 0.4) == 8
    assert confident_length([3, 8], [0.9, 0.9], 0.4) == 8
    assert confident_length([3, 8], [0.1, 0.9], 0.4) == 0
    # a character written by two byte-tokens (the first ends before it): both must be confident
    assert confident_length([1, 1, 2], [0.9, 0.1, 0.9], 0.4) == 1
    assert confident_length([1, 1, 2], [0.9, 0.9, 0.9], 0.4) == 2


def test_a_confident_suggestion_is_shown_whole():
    raw, ends, conf = tokens(("os", 0.8), (".path", 0.7), (".getsize", 0.6), ("(path)", 0.5))
    verdict = gate(Suggestion(raw), raw, ends, conf, ctx(), 0.3)
    assert verdict.reason == "shown" and verdict.suggestion == Suggestion("os.path.getsize(path)")


def test_only_the_confident_leading_part_is_shown_the_longest_that_parses():
    raw, ends, conf = tokens(("os", 0.8), (".path", 0.7), (".", 0.6), ("getsize", 0.1), ("(path)", 0.9))
    verdict = gate(Suggestion(raw), raw, ends, conf, ctx(), 0.3)
    # "os.path." is confident but leaves `return os.path.` unparsable; "os.path" parses
    assert verdict.reason == "cut" and verdict.suggestion == Suggestion("os.path")
    plain = ctx(language="plaintext")  # no grammar: the whole confident part
    assert gate(Suggestion(raw), raw, ends, conf, plain, 0.3).suggestion == Suggestion("os.path.")


def test_a_cut_never_splits_an_identifier():
    raw, ends, conf = tokens(("os", 0.8), (".path", 0.7), (".get", 0.7), ("size", 0.1))
    verdict = gate(Suggestion(raw), raw, ends, conf, ctx(language="plaintext"), 0.3)
    assert verdict.suggestion == Suggestion("os.path.")  # not "os.path.get"


def test_a_cut_gives_back_what_was_absorbed_after_the_cursor():
    raw, ends, conf = tokens(("len", 0.9), ("(path", 0.9), (")", 0.1))
    absorbed = Suggestion("len(path)", replace_suffix=1)  # it replaced an auto-closed ")"
    line = ctx(line_prefix="    return max(", before=BEFORE + "max(", after=")" + AFTER)
    verdict = gate(absorbed, raw, ends, conf, line, 0.3)
    assert verdict.suggestion == Suggestion("len", replace_suffix=0)  # `max(len(path)` would not parse
    plain = ctx(line_prefix="    return max(", before=BEFORE + "max(", after=")" + AFTER, language="plaintext")
    assert gate(absorbed, raw, ends, conf, plain, 0.3).suggestion == Suggestion("len(path", replace_suffix=0)


def test_a_confident_suggestion_that_does_not_parse_is_cut_to_a_part_that_does():
    raw, ends, conf = tokens(("len", 0.9), ("(path", 0.9), ("))", 0.9))  # one ")" too many
    verdict = gate(Suggestion(raw), raw, ends, conf, ctx(), 0.3)
    assert verdict == Verdict(Suggestion("len"), "cut")


def test_the_parse_baseline_is_the_document_as_it_is():
    """Replacing an auto-closed ")" with text that does not close it is a new error."""
    raw, ends, conf = tokens(("xy", 0.9),)
    line = ctx(line_prefix="    return max(", before=BEFORE + "max(", after=")" + AFTER)
    assert gate(Suggestion(raw, replace_suffix=1), raw, ends, conf, line, 0.3) == Verdict(None, "parse")


def test_line_ends_trimmed_by_post_processing_keep_their_confidence():
    raw, ends, conf = tokens(("x)  ", 0.9), ("\n", 0.9), ("y", 0.9))
    trimmed = Suggestion("x)\ny", replace_suffix=1)  # closing.py strips the first line's trailing spaces
    context = Context(line_prefix="f(", line_suffix=")", language="plaintext")
    assert gate(trimmed, raw, ends, conf, context, 0.3) == Verdict(trimmed, "shown")


def test_nothing_confident_is_hidden():
    raw, ends, conf = tokens(("os", 0.1), (".path", 0.9))
    assert gate(Suggestion(raw), raw, ends, conf, ctx(), 0.3) == Verdict(None, "confidence")
    raw, ends, conf = tokens(("  ", 0.9), ("os", 0.1))  # only whitespace is confident
    assert gate(Suggestion(raw), raw, ends, conf, ctx(), 0.3) == Verdict(None, "confidence")


def test_every_hidden_reason_is_explained():
    assert set(REASONS) == {"shown", "cut", *HIDDEN} and all(HIDDEN.values())
    assert whitespace_problem(" return", "    ") == "indentation" and whitespace_problem(" 1", "x = ") == "whitespace"
    assert whitespace_problem("    return", "") is None and whitespace_problem(" 1", "x =") is None


@pytest.mark.parametrize(
    ("line_prefix", "text", "reason"),
    [
        ("        ", "  return x", "indentation"),  # more indentation on a line of only indentation
        ("    x = ", " 10", "whitespace"),  # a doubled space
        ("", "    return x", "shown"),  # at column 0 indentation is what the line needs
        ("    x =", " 10", "shown"),
    ],
)
def test_indentation_and_whitespace(line_prefix: str, text: str, reason: str):
    raw, ends, conf = tokens((text, 0.9))
    context = Context(line_prefix=line_prefix, line_suffix="", language="plaintext")
    assert gate(Suggestion(text), raw, ends, conf, context, 0.3).reason == reason


def test_a_suggestion_that_breaks_the_parse_is_hidden():
    raw, ends, conf = tokens(('"""', 0.9),)
    assert gate(Suggestion(raw), raw, ends, conf, ctx(), 0.3) == Verdict(None, "parse")
    raw, ends, conf = tokens(("len(path)", 0.9),)
    assert gate(Suggestion(raw), raw, ends, conf, ctx(), 0.3).reason == "shown"


def test_a_stray_quote_in_a_list_is_a_parse_error():
    """Seen in hypothesis' codemods.py by ``dlm-lsp evaluate`` (a window starting inside the list missed it)."""
    parser = parser_for("python")
    before = 'NAMES = [\n    "a",\n    '
    after = '\n    "c",\n]\n\n\ndef g():\n    return 2\n'
    assert adds_parse_errors(parser, before, '"', after)
    assert not adds_parse_errors(parser, before, '"b",', after)


def test_min_confidence_zero_turns_the_gate_off():
    raw, ends, conf = tokens(('  """', 0.01),)
    assert gate(Suggestion(raw), raw, ends, conf, ctx(line_prefix="    "), 0.0) == Verdict(Suggestion(raw), "shown")


def test_the_parse_check_reads_the_whole_document_when_it_is_small():
    context = ctx(before="window before", after="window after")
    assert parse_surroundings("abc|def", 3, context) == ("abc", "|def")
    big = "x" * 60_000
    assert parse_surroundings(big, 10, context) == ("window before", "window after")


def test_a_lone_symbol_is_too_short_to_show():
    raw, ends, conf = tokens((" =", 0.9),)
    context = Context(line_prefix="x", line_suffix="", language="plaintext")
    assert gate(Suggestion(raw), raw, ends, conf, context, 0.3) == Verdict(None, "short")
    raw, ends, conf = tokens(("os", 0.9), (".path", 0.1))
    assert gate(Suggestion(raw), raw, ends, conf, context, 0.3) == Verdict(Suggestion("os"), "cut")
