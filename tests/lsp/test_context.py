"""Context building: windows, multi-line decision, other-file snippets."""

from __future__ import annotations

from dataclasses import replace

from dlm_lsp.context import PARSE_WINDOW_AFTER, PARSE_WINDOW_BEFORE, OpenDocument, build_context, jaccard, similar_snippets
from dlm_lsp.settings import Settings

DOC = "import os\n\n\ndef load_config(path):\n    \n\n\ndef main():\n    cfg = load_config('x')\n"
CURSOR = DOC.index("    \n\n\ndef main") + 4


def test_windows_and_filter_context():
    ctx = build_context(DOC, CURSOR, "python", Settings(other_files=False))
    assert ctx.prefix == DOC[:CURSOR] and ctx.suffix == DOC[CURSOR:]
    assert ctx.post.line_prefix == "    " and ctx.post.line_suffix == ""
    assert ctx.post.previous_lines[-1] == "def load_config(path):"
    assert ctx.multiline  # empty function body
    assert ctx.post.text_before.endswith("def load_config(path):\n    ")


def test_character_pre_cut_follows_token_budgets():
    long_doc = "x = 1\n" * 5000
    ctx = build_context(long_doc, len(long_doc) // 2, "python", Settings(prefix_tokens=10, suffix_tokens=5, other_files=False))
    assert len(ctx.prefix) == 60 and len(ctx.suffix) == 30


def test_multiline_setting_overrides_syntax():
    assert not build_context(DOC, CURSOR, "python", Settings(multiline="never")).multiline
    mid_line = DOC.index("cfg = ") + 6
    assert not build_context(DOC, mid_line, "python", Settings()).multiline
    assert build_context(DOC, mid_line, "python", Settings(multiline="always")).multiline


def test_snippets_from_similar_same_language_documents():
    other = OpenDocument("file:///w/config_utils.py", "python",
                         "def read_config(path):\n    with open(path) as handle:\n        return load_config_text(handle.read())\n")
    unrelated = OpenDocument("file:///w/colors.py", "python", "RED = 1\nGREEN = 2\nBLUE = 3\n")
    js = OpenDocument("file:///w/config.js", "javascript", "function load_config(path) { return path; }\n")
    ctx = build_context(DOC, CURSOR, "python", Settings(), [other, unrelated, js])
    assert ctx.snippets == 1
    assert ctx.prefix.startswith("# From config_utils.py:\n# def read_config(path):")
    assert ctx.prefix.endswith(DOC[:CURSOR])
    assert "GREEN" not in ctx.prefix and "function" not in ctx.prefix
    none = build_context(DOC, CURSOR, "python", replace(Settings(), other_files=False), [other])
    assert none.snippets == 0


def test_snippet_budget_and_jaccard():
    assert jaccard({"a", "b"}, {"b", "c"}) == 1 / 3 and jaccard(set(), set()) == 0.0
    big = OpenDocument("file:///w/big.py", "python", "\n".join(f"load_config_{i} = load_config(path_{i})" for i in range(200)))
    chosen = similar_snippets("load_config path", [big], budget_chars=300)
    assert sum(len(chunk) for _, chunk in chosen) <= 300


def test_syntax_decisions_look_at_a_window_that_starts_at_a_top_level_line():
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(2000))  # ~60,000 characters
    doc = body + "def new_function(x):\n    \n\n" + body
    cursor = len(body) + len("def new_function(x):\n    ")
    ctx = build_context(doc, cursor, "python", Settings(other_files=False))
    assert ctx.multiline  # the empty body is seen as in the whole document
    before = ctx.post.text_before
    assert before.startswith("def ") and doc[:cursor].endswith(before)
    assert PARSE_WINDOW_BEFORE <= len(before) <= 2 * PARSE_WINDOW_BEFORE
    after = ctx.post.text_after  # ends before a top-level line within the window's size
    assert PARSE_WINDOW_AFTER - 40 <= len(after) <= PARSE_WINDOW_AFTER
    assert doc[cursor:].startswith(after) and doc[cursor + len(after) :].startswith("def ")
