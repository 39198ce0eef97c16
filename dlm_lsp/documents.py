"""The open documents, kept in step with the client by ``didOpen``/``didChange``/``didClose``.

Replaces pygls' workspace documents, which split lines with :meth:`str.splitlines`
(form feeds, U+2028 and five more characters count as line breaks, so edits land
on the wrong line), silently drop the text of a range whose start is after its end,
and re-split and re-join the whole document on every keystroke (0.6-0.8 s per
keystroke on a 5 MB line).

Here a document is a list of lines split where LSP splits them (``\\n``,
``\\r\\n``, ``\\r``), each keeping its line break. An edit inside one line, the
common keystroke, rewrites that line only; an edit across lines re-splits just
the lines it touches. Ranges are read the way Microsoft's reference
implementation (``vscode-languageserver-textdocument``) reads them: a start after
the end is swapped with it, a character past the end of its line means the end of
the line, a line past the last means the end of the document. Such repairs are
counted (:attr:`Document.repairs`) and logged once per document.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
from dataclasses import dataclass, field

from lsprotocol import types

log = logging.getLogger(__name__)

UTF8 = types.PositionEncodingKind.Utf8
UTF32 = types.PositionEncodingKind.Utf32
_OTHER_BREAKS = re.compile("[\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
"""What :meth:`str.splitlines` breaks at beyond LSP's three line breaks."""
_LSP_BREAK = re.compile(r"\r\n|\r|\n")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def split_lines(text: str) -> list[str]:
    """Lines as LSP counts them, each with its line break; the last has none (it is empty after a final break)."""
    if not _OTHER_BREAKS.search(text):
        lines = text.splitlines(keepends=True)  # the same split when only \r, \n and \r\n occur
    else:
        lines, start = [], 0
        for match in _LSP_BREAK.finditer(text):
            lines.append(text[start : match.end()])
            start = match.end()
        if start < len(text):
            lines.append(text[start:])
    if not lines or lines[-1].endswith(("\n", "\r")):
        lines.append("")
    return lines


def content_length(line: str) -> int:
    """Characters of ``line`` before its line break."""
    if line.endswith("\r\n"):
        return len(line) - 2
    if line.endswith(("\n", "\r")):
        return len(line) - 1
    return len(line)


def column(content: str, units: int, encoding: str | None) -> int:
    """Character index in ``content`` (one line, no break) of ``units`` code units of ``encoding``,
    clamped to the line's end. A count that ends inside a character (half a surrogate pair,
    part of a UTF-8 sequence) lands after that character."""
    if units <= 0:
        return 0
    if encoding == UTF32 or content.isascii():  # isascii() is O(1) on CPython's strings
        return min(units, len(content))
    head = content[:units]  # a character is at least one code unit: these cover ``units`` units
    if encoding == UTF8:
        data = head.encode("utf-8", "surrogatepass")[:units]
        try:
            return len(data.decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError as exc:  # the count ends inside the last character
            return len(data[: exc.start].decode("utf-8", "surrogatepass")) + 1
    # UTF-16: one unit a character, two for each astral one (decoding would pair up two lone surrogates)
    index, counted = 0, 0
    for astral in _ASTRAL.finditer(head):
        if counted + astral.start() - index >= units:
            break
        counted += astral.start() - index + 2
        index = astral.start() + 1
        if counted >= units:
            return index  # the count ended inside (or right after) this character
    return min(len(content), index + units - counted)


def units(text: str, encoding: str | None) -> int:
    """Length of ``text`` in code units of ``encoding`` (UTF-16 unless UTF-8 or UTF-32)."""
    if encoding == UTF32 or text.isascii():
        return len(text)
    if encoding == UTF8:
        return len(text.encode("utf-8", "surrogatepass"))
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


@dataclass
class Document:
    """One open document: its lines, version and language."""

    uri: str
    language_id: str
    version: int
    lines: list[str]
    encoding: str | None = types.PositionEncodingKind.Utf16
    repairs: int = 0
    """Changes whose range had to be repaired (swapped or clamped)."""
    _text: str | None = field(default=None, repr=False)
    _starts: list[int] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, item: types.TextDocumentItem, encoding: str | None) -> Document:
        """A document as ``didOpen`` gives it."""
        return cls(item.uri, item.language_id, item.version, split_lines(item.text), encoding)

    @property
    def text(self) -> str:
        """The whole text (joined once per version)."""
        if self._text is None:
            self._text = "".join(self.lines)
        return self._text

    def __len__(self) -> int:
        return self.starts[-1] + len(self.lines[-1])

    @property
    def starts(self) -> list[int]:
        """Offset of the first character of each line."""
        if self._starts is None:
            self._starts = [0, *itertools.accumulate(len(line) for line in self.lines[:-1])]
        return self._starts

    def locate(self, position: types.Position) -> tuple[int, int, bool]:
        """(line, character index) of ``position``, clamped as LSP prescribes; and whether it was clamped."""
        if position.line >= len(self.lines):
            last = len(self.lines) - 1
            return last, content_length(self.lines[last]), True
        content = self.lines[position.line]
        end = content_length(content)
        index = column(content[:end], position.character, self.encoding)
        return position.line, index, index >= end and units(content[:end], self.encoding) < position.character

    def offset_at(self, position: types.Position) -> int:
        """Character offset of ``position`` in :attr:`text`."""
        line, index, _ = self.locate(position)
        return self.starts[line] + index

    def position_at(self, offset: int) -> types.Position:
        """LSP position of character ``offset`` (clamped to the document; never between ``\\r`` and ``\\n``)."""
        offset = min(max(0, offset), len(self))
        line = bisect.bisect_right(self.starts, offset) - 1
        content = self.lines[line][: content_length(self.lines[line])]
        return types.Position(line=line, character=units(content[: offset - self.starts[line]], self.encoding))

    def apply(self, change: types.TextDocumentContentChangeEvent) -> None:
        """Apply one content change (whole text, or a range and its replacement)."""
        self._text = self._starts = None
        if not isinstance(change, types.TextDocumentContentChangePartial):
            self.lines = split_lines(change.text)
            return
        start, end = change.range.start, change.range.end
        if (start.line, start.character) > (end.line, end.character):
            start, end = end, start
            self._repaired("a range that ends before it starts")
        first, first_index, clamped_start = self.locate(start)
        last, last_index, clamped_end = self.locate(end)
        if clamped_start or clamped_end:
            self._repaired("a position past the end of its line or of the document")
        new = change.text
        if first == last and "\r" not in new and "\n" not in new:  # a keystroke: one line rewritten
            line = self.lines[first]
            self.lines[first] = line[:first_index] + new + line[last_index:]
            return
        segment = self.lines[first][:first_index] + new + self.lines[last][last_index:]
        if first > 0 and self.lines[first - 1].endswith("\r"):  # "\r" + "\n" may become one break
            first -= 1
            segment = self.lines[first] + segment
        if segment.endswith("\r") and last + 1 < len(self.lines):
            last += 1
            segment += self.lines[last]
        replacement = split_lines(segment)
        if last < len(self.lines) - 1:
            replacement.pop()  # the segment ends with its last line's break: no empty line after it
        self.lines[first : last + 1] = replacement

    def _repaired(self, what: str) -> None:
        if not self.repairs:
            log.warning("%s: the client sent %s; read as the reference implementation reads it", self.uri, what)
        self.repairs += 1


class Documents(dict[str, Document]):
    """The open documents by URI."""

    def open(self, item: types.TextDocumentItem, encoding: str | None) -> Document:
        """``didOpen`` (a second open of the same URI replaces the first)."""
        document = Document.open(item, encoding)
        self[item.uri] = document
        return document

    def change(self, params: types.DidChangeTextDocumentParams) -> Document | None:
        """``didChange``: the changes in order; None for a document that is not open."""
        document = self.get(params.text_document.uri)
        if document is None:
            log.warning("didChange for %s, which is not open: ignored", params.text_document.uri)
            return None
        for change in params.content_changes:
            document.apply(change)
        document.version = params.text_document.version
        return document

    def close(self, uri: str) -> None:
        """``didClose``."""
        self.pop(uri, None)
