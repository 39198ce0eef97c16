"""Absorb auto-closed brackets and quotes after the cursor into the replace range.

Editors insert the closing bracket or quote as the user types the opening one,
so the text after the cursor is often just ``)`` or ``")``. When the suggestion's
first line ends by closing those same characters, the suggestion replaces them
instead of inserting a second copy.
"""

from __future__ import annotations

from dlm_lsp.postprocess.base import Context, Suggestion

AUTO_CLOSED = set(")]}\"'`")


def absorb_auto_closed(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Replace auto-closed characters after the cursor that the suggestion's first line ends with."""
    rest = ctx.line_suffix.rstrip()
    if not rest or not set(rest) <= AUTO_CLOSED:
        return s
    first, newline, after = s.text.partition("\n")
    if first.rstrip().endswith(rest):
        first = first.rstrip()
        return s.changed(first + newline + after, replace_suffix=len(rest))
    return s
