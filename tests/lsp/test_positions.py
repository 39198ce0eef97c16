"""LSP positions <-> offsets at every end-of-document shape, in each position encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lsprotocol.types import Position, PositionEncodingKind

from dlm_lsp.positions import offset_at, position_at

UTF8, UTF16, UTF32 = PositionEncodingKind.Utf8, PositionEncodingKind.Utf16, PositionEncodingKind.Utf32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (0, 0)),  # an empty document
        ("def f(x):\n    return x", (1, 12)),  # no final newline: the end is on the last line
        ("def f(x):\n    return x\n", (2, 0)),  # a final newline opens an empty last line
        ("a = 1\r\nb = 2", (1, 5)),  # CRLF, no final line break
        ("a = 1\r\nb = 2\r\n", (2, 0)),
        ("a = 1\rb", (1, 1)),  # a lone CR is a line break in LSP
        ("def f():\n    ", (1, 4)),  # a last line of only whitespace
        ("x\n\n\n", (3, 0)),
    ],
)
def test_end_of_document(text: str, expected: tuple[int, int]) -> None:
    position = position_at(text, len(text))
    assert (position.line, position.character) == expected
    assert offset_at(text, position) == len(text)


def test_only_lsp_line_breaks_count() -> None:
    """Form feed, U+2028 and \\x1c are characters inside a line for LSP, not line breaks."""
    text = "a\x0cb\u2028c\x1cd\ne"
    assert position_at(text, text.index("d")) == Position(line=0, character=6)
    assert position_at(text, len(text)) == Position(line=1, character=1)
    assert offset_at(text, Position(line=1, character=0)) == text.index("e")


def test_between_cr_and_lf_is_the_end_of_the_line() -> None:
    assert position_at("ab\r\ncd", 3) == Position(line=0, character=2)


@pytest.mark.parametrize(("encoding", "column"), [(UTF8, 11), (UTF16, 8), (UTF32, 7)])
def test_encodings(encoding: str, column: int) -> None:
    text = 'x = "é😋"\ny'  # é: 2 UTF-8 bytes / 1 UTF-16 unit; 😋: 4 UTF-8 bytes / 2 UTF-16 units
    offset = text.index('"', 5)
    assert position_at(text, offset, encoding) == Position(line=0, character=column)
    assert offset_at(text, Position(line=0, character=column), encoding) == offset


def test_out_of_range_positions_clamp() -> None:
    text = "ab\ncd"
    assert offset_at(text, Position(line=0, character=99)) == 2  # past the line's end: its end
    assert offset_at(text, Position(line=7, character=0)) == len(text)  # past the last line: the end
    assert position_at(text, 999) == Position(line=1, character=2)
    assert offset_at(text, Position(line=0, character=1), UTF16) == 1


def test_inside_a_surrogate_pair_lands_after_it() -> None:
    text = "😋x"
    assert offset_at(text, Position(line=0, character=1), UTF16) == 1


documents = st.lists(st.sampled_from(["a", " ", "\n", "\r", "\r\n", "é", "😋", "\x0c", "\u2028", "\t"]), max_size=40).map("".join)


@given(documents, st.data(), st.sampled_from([UTF8, UTF16, UTF32]))
def test_round_trip(text: str, data: st.DataObject, encoding: str) -> None:
    """Every offset not inside a CRLF pair maps to a position and back to itself."""
    offset = data.draw(st.integers(0, len(text)))
    if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n":
        offset -= 1
    assert offset_at(text, position_at(text, offset, encoding), encoding) == offset
