"""Never return a completion that breaks the bracket balance of the line it completes.

The completed line (text before the cursor + the suggestion's first line + what
stays after it) must not have a closing bracket without its opener where the
original line had none. If it does, the suggestion is cut before the offending
bracket; if nothing is left, it is dropped. Strings and comments are skipped
roughly (quotes toggle, ``#`` and ``//`` end the line).
"""

from __future__ import annotations

from dlm_lsp.postprocess.base import Context, Suggestion

PAIRS = {")": "(", "]": "[", "}": "{"}


def _first_unmatched_closer(text: str) -> int | None:
    """Index of the first closing bracket in ``text`` with no opener before it, or None."""
    stack: list[str] = []
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch == "#" or text.startswith("//", i):
            return None
        elif ch in "([{":
            stack.append(ch)
        elif ch in PAIRS:
            if not stack or stack[-1] != PAIRS[ch]:
                return i
            stack.pop()
        i += 1
    return None


def keep_brackets_balanced(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Cut the suggestion before a closing bracket that would leave the line unbalanced (see the module)."""
    if _first_unmatched_closer(ctx.line_prefix + ctx.line_suffix) is not None:
        return s  # the line was unbalanced before we touched it
    first, newline, _ = s.text.partition("\n")
    replace = s.replace_suffix
    candidate = first
    while True:
        kept_suffix = "" if newline else ctx.line_suffix[replace:]
        bad = _first_unmatched_closer(ctx.line_prefix + candidate + kept_suffix)
        if bad is None:
            break
        cut = bad - len(ctx.line_prefix)
        if cut < len(candidate):
            candidate = candidate[:cut].rstrip()  # cut before our unmatched bracket
        elif candidate.rstrip() and candidate.rstrip()[-1] in PAIRS:
            candidate = candidate.rstrip()[:-1]  # our extra closer orphaned one after the cursor
        else:
            return None
        newline, replace = "", 0  # what followed the cut is gone; the suffix stays
    if candidate == first:
        return s
    if not candidate.strip():
        return None
    return s.changed(candidate, replace_suffix=replace)
