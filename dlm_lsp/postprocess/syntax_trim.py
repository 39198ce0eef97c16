"""Trim a multi-line suggestion at a syntactic boundary (tree-sitter).

The document around the cursor is parsed with the suggestion inserted; the
suggestion keeps as many of its lines as it can without adding parse errors
(``ERROR`` or missing nodes) beyond those the document already has without it.
Code being typed often does not parse (an empty function body), so the
comparison is relative. Languages without a grammar are left alone.
"""

from __future__ import annotations

from dlm_lsp.postprocess.base import Context, Suggestion
from dlm_lsp.syntax import parse_errors, parser_for


def trim_to_syntax(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Keep the most lines of a multi-line suggestion that add no parse error."""
    if not ctx.multiline or "\n" not in s.text:
        return s
    parser = parser_for(ctx.language)
    if parser is None:
        return s
    after = (ctx.text_after or ctx.line_suffix)[s.replace_suffix :]
    before = ctx.text_before or ctx.line_prefix
    baseline = parse_errors(parser, before + after)
    lines = s.text.split("\n")
    for n in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:n])
        if parse_errors(parser, before + candidate + after) <= baseline:
            return s if n == len(lines) else s.changed(candidate)
    return s  # nothing parses cleanly: the other filters decide
