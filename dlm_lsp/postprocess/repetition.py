"""Cut degenerate repetition: a line repeated back to back, or a restated previous line.

Small models under a length budget sometimes loop (``x = 1`` three times). The
suggestion is cut before the second copy of a line repeated consecutively, and
dropped when its only line repeats the line just above the cursor.
"""

from __future__ import annotations

from dlm_lsp.postprocess.base import Context, Suggestion


def cut_repetition(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Cut the suggestion where it starts repeating itself."""
    lines = s.text.split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line.strip() and line.strip() == kept[-1].strip():
            break
        kept.append(line)
    if len(kept) == 1 and ctx.previous_lines and not ctx.line_prefix.strip():
        if kept[0].strip() and kept[0].strip() == ctx.previous_lines[-1].strip():
            return None
    text = "\n".join(kept)
    return s if text == s.text else s.changed(text)
