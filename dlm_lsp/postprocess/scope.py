"""Trim a suggestion to what belongs at the cursor: one line, or the current block.

Single-line mode keeps the first line. Multi-line mode keeps lines while they stay
inside the cursor's block. The block's indentation is that of the cursor line.
If the cursor line opens a block (ends with ``:``, ``{``, ``(`` or ``[``), the
suggestion may only add that block's body: it ends before the first non-blank
line indented no deeper than the cursor line, except a closing bracket line at
the same indentation, which is kept as the last line. Otherwise it ends before
the first non-blank line indented less than the cursor line. Trailing blank
lines are dropped.
"""

from __future__ import annotations

from engine import single_line

from dlm_lsp.postprocess.base import Context, Suggestion

OPENERS = (":", "{", "(", "[")
CLOSERS = ("}", ")", "]")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def trim_to_scope(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Keep the first line (single-line mode) or the lines inside the cursor's block."""
    lines = s.text.split("\n")
    if not ctx.multiline:
        return s.changed(single_line(s.text)) if len(lines) > 1 else s
    cursor_line = ctx.line_prefix + lines[0]
    base = _indent(cursor_line) if cursor_line.strip() else len(cursor_line)
    opens = cursor_line.rstrip().endswith(OPENERS)
    kept = [lines[0]]
    for line in lines[1:]:
        if line.strip():
            ind = _indent(line)
            if opens and ind <= base:
                if ind == base and line.strip().startswith(CLOSERS):
                    kept.append(line)
                break
            if not opens and ind < base:
                break
        kept.append(line)
    while len(kept) > 1 and not kept[-1].strip():
        kept.pop()
    text = "\n".join(kept)
    return s if text == s.text else s.changed(text)
