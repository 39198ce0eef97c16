"""Drop what the suggestion repeats of the text after the cursor.

* The rest of the current line: if the suggestion's last line ends with the text
  after the cursor, that tail is removed (the editor keeps the original).
* The following lines: trailing suggestion lines equal (ignoring surrounding
  whitespace) to the next lines of the document are removed.
"""

from __future__ import annotations

from dlm_lsp.postprocess.base import Context, Suggestion


def drop_suffix_duplicates(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Drop trailing lines and the line's rest that repeat the text after the cursor."""
    lines = s.text.split("\n")
    following = [line.strip() for line in ctx.next_lines if line.strip()]
    # trailing lines that restate the next lines of the document
    if len(lines) > 1 and following:
        for n in range(min(len(lines) - 1, len(following)), 0, -1):
            tail = [line.strip() for line in lines[-n:]]
            if tail == following[:n]:
                lines = lines[:-n]
                while len(lines) > 1 and not lines[-1].strip():
                    lines.pop()
                break
    text = "\n".join(lines)
    rest = ctx.line_suffix[s.replace_suffix :].strip()  # what the editor keeps after the cursor
    if rest and text.rstrip().endswith(rest) and text.rstrip() != rest:
        text = text.rstrip()[: -len(rest)].rstrip() if "\n" in text else text.rstrip()[: -len(rest)]
    elif rest and text.strip() == rest:
        return None
    return s if text == s.text else s.changed(text)
