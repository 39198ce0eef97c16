"""LSP positions <-> character offsets, computed from the document's own line structure.

LSP counts lines at ``\\n``, ``\\r\\n`` and ``\\r`` only, and characters in the
negotiated encoding's code units (UTF-16 by default, UTF-8 or UTF-32 when agreed).
pygls' own helpers split lines with :meth:`str.splitlines`, which also breaks at
form feeds, ``\\x1c``-``\\x1e``, ``\\x85``, U+2028 and U+2029, and map the offset
of the end of a document without a final newline to the start of a line that
does not exist: an editor typing at the end of a new file is then answered with
a range one line below its cursor, which VS Code silently drops. The server
converts the positions of requests and responses with these functions. (pygls
still applies incremental edits by its own line splitting, so a document holding
form feeds or U+2028 can be edited on the wrong line: the reliability issue.)
"""

from __future__ import annotations

import bisect
import re

from lsprotocol import types

LINE_BREAK = re.compile(r"\r\n|\r|\n")


def line_starts(text: str) -> list[int]:
    """Offset of the first character of every line (the first is 0; a final line break opens an empty last line)."""
    return [0, *(match.end() for match in LINE_BREAK.finditer(text))]


def _units(text: str, encoding: str | None) -> int:
    """Length of ``text`` in the code units of ``encoding`` (UTF-16 unless UTF-8 or UTF-32 was agreed)."""
    if encoding == types.PositionEncodingKind.Utf8:
        return len(text.encode("utf-8", "surrogatepass"))
    if encoding == types.PositionEncodingKind.Utf32:
        return len(text)
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _content_end(text: str, start: int, next_start: int) -> int:
    """End of a line's content (before its line break) for the line spanning ``start:next_start``."""
    end = next_start
    if end > start and text[end - 1] == "\n":
        end -= 1
    if end > start and text[end - 1] == "\r":
        end -= 1
    return end


def offset_at(text: str, position: types.Position, encoding: str | None = types.PositionEncodingKind.Utf16) -> int:
    """Character offset of ``position`` in ``text``.

    As LSP prescribes, a ``character`` past the end of its line means the line's
    end, and a ``line`` past the last line means the end of the document. A
    position inside a surrogate pair or a multi-byte UTF-8 sequence lands after it.
    """
    starts = line_starts(text)
    if position.line < 0:
        return 0
    if position.line >= len(starts):
        return len(text)
    start = starts[position.line]
    next_start = starts[position.line + 1] if position.line + 1 < len(starts) else len(text)
    end = _content_end(text, start, next_start)
    wanted = max(0, position.character)
    if encoding == types.PositionEncodingKind.Utf32:
        return min(start + wanted, end)
    units = 0
    for index in range(start, end):
        if units >= wanted:
            return index
        units += _units(text[index], encoding)
    return end


def position_at(text: str, offset: int, encoding: str | None = types.PositionEncodingKind.Utf16) -> types.Position:
    """LSP position of character ``offset`` of ``text`` (clamped to the document).

    The end of a document without a final line break is on its last line, after
    the last character; an offset between ``\\r`` and ``\\n`` is the end of that line.
    """
    offset = min(max(0, offset), len(text))
    starts = line_starts(text)
    line = bisect.bisect_right(starts, offset) - 1
    start = starts[line]
    next_start = starts[line + 1] if line + 1 < len(starts) else len(text)
    offset = min(offset, _content_end(text, start, next_start))
    return types.Position(line=line, character=_units(text[start:offset], encoding))
