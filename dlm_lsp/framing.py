"""LSP base-protocol framing (``Content-Length`` headers), bounded and self-resynchronising.

pygls' reader (``pygls.io_.run_async``) reads the whole declared length at once
(``Content-Length: 99999999999`` is a ``MemoryError``), never leaves a frame whose
header it could not parse (a negative or non-numeric length makes it deaf for
good) and has no way back after a wrong length. :class:`FrameDecoder` is fed the
bytes as they arrive and gives back frames and broken frames; it never raises and
never holds more than one bounded frame:

* a header block is at most :data:`MAX_HEADER_BYTES`; it must carry one
  ``Content-Length`` of decimal digits (other headers, ``Content-Type`` included,
  are ignored, as the LSP base protocol allows);
* a body over ``max_body`` bytes is reported broken at once and its bytes are
  dropped as they arrive, never stored (up to a header among them: the length lied);
* after anything broken the decoder resynchronises at the next header, found by
  ``Content-Length: <digits>\\r\\n``: a JSON body cannot hold a raw line break inside
  a string, so text that merely mentions the header is never taken for one;
* a length that was too long leaves the decoder waiting for bytes that belong to
  the next messages. :meth:`FrameDecoder.stall` (the caller calls it when no bytes
  came for a while) cuts the frame at a header found inside those bytes; a body
  that is not JSON can be handed back with :meth:`FrameDecoder.recover`, which
  does the same for a length that swallowed the next message exactly.

The decoder is sans-I/O (bytes in, events out), so the property tests drive it
with every way of chopping a stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 8 * 1024
"""A header block longer than this is broken (real ones are under 100 bytes)."""
MAX_BODY_BYTES = 64 * 1024 * 1024
"""Default limit of one message: a 64 MB document is far past anything worth completing in."""
KEPT_BROKEN_BYTES = 64 * 1024
"""Of a broken frame, this much is kept for the caller (to recover a request id from)."""
HEADER_AT = re.compile(rb"Content-Length:[ \t]*\d+[ \t]*\r\n", re.IGNORECASE)
"""Where a header starts: resynchronisation looks for this."""
SPLIT_HEADER_BYTES = 64
"""Enough of a dropped chunk's end to hold the start of a header cut in two."""
_LENGTH_VALUE = re.compile(rb"[ \t]*(\d{1,15})[ \t]*")


@dataclass(frozen=True)
class Frame:
    """A whole message body, exactly as long as its header said."""

    body: bytes


@dataclass(frozen=True)
class Broken:
    """Bytes that were not a valid frame, and why (``data``: the first of them, for id recovery)."""

    reason: str
    data: bytes = b""


Event = Frame | Broken


class FrameDecoder:
    """Turns a byte stream into :class:`Frame` and :class:`Broken` events (see the module docstring)."""

    def __init__(self, max_body: int = MAX_BODY_BYTES) -> None:
        self.max_body = max_body
        self._buffer = bytearray()
        self._length: int | None = None
        """Body length of the frame whose header was read, while its body arrives."""
        self._skip = 0
        """Bytes of an oversized body still to drop."""
        self._skip_tail = b""
        """The last bytes dropped, searched again with the next chunk (a header split across two)."""

    @property
    def mid_frame(self) -> bool:
        """True when part of a message has arrived and the rest has not."""
        return bool(self._buffer) or self._length is not None or self._skip > 0

    @property
    def waiting_for(self) -> int:
        """Bytes the frame in progress still needs (0 when none is in progress or its header is incomplete)."""
        if self._skip:
            return self._skip
        if self._length is None:
            return 0
        return max(0, self._length - len(self._buffer))

    def feed(self, data: bytes) -> Iterator[Event]:
        """Take the next bytes of the stream; the frames (and broken frames) they complete.

        The events come lazily: a frame the caller finds is no message can be handed back
        (:meth:`recover`) before the bytes after it are read as the next frame.
        """
        if self._skip:
            seen = self._skip_tail + data  # the tail of the last chunk: a header may be split across two
            header = HEADER_AT.search(seen)
            if header is not None:  # a message begins inside the oversized body: it was shorter than declared
                self._skip, self._skip_tail = 0, b""
                data = seen[header.start():]
            else:
                dropped = min(self._skip, len(data))
                self._skip -= dropped
                self._skip_tail = seen[-SPLIT_HEADER_BYTES:] if self._skip else b""
                data = data[dropped:]
        self._buffer += data
        return self._drain()

    def stall(self) -> Iterator[Event]:
        """No bytes came for a while: a body still waiting for bytes is cut at a header inside what
        did come (its length was too long and the client went on to its next message). Without
        such a header the frame may just be slow, and it keeps waiting."""
        if self._skip:  # an oversized body that stopped: whatever comes next starts afresh
            self._skip, self._skip_tail = 0, b""
            return self._drain()
        if self._length is None:
            return self._drain(stalled=True)
        cut = self._next_header(0)
        if cut is None:
            return iter(())
        broken = Broken(f"the body ended after {cut} of the {self._length} bytes its header declared", bytes(self._buffer[:cut]))
        del self._buffer[:cut]
        self._length = None
        return _chain(broken, self._drain())

    def recover(self, body: bytes) -> bool:
        """A body of a frame that turned out not to be a message: if a header starts inside it (its
        length swallowed the next message), put the bytes from there back in front of the stream,
        to be read next. True when something was put back."""
        cut = self._next_header(1, body)
        if cut is None:
            return False
        self._buffer[:0] = body[cut:]
        return True

    def _drain(self, stalled: bool = False) -> Iterator[Event]:
        # state changes before each yield: the caller may recover() or feed() before resuming
        while True:
            if self._length is not None:
                if len(self._buffer) < self._length:
                    return
                body = bytes(self._buffer[: self._length])
                del self._buffer[: self._length]
                self._length = None
                yield Frame(body)
                continue
            end = self._buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
            if end < 0:
                if len(self._buffer) <= MAX_HEADER_BYTES and not (stalled and self._buffer):
                    return
                # no header block where one must be: garbage, or a header that never ended
                reason = "bytes that are not a message header" if stalled else f"a header over {MAX_HEADER_BYTES} bytes"
                stalled = False
                yield self._resync(reason, 1, keep_tail=reason.startswith("a header"))
                continue
            problem, length = self._parse_header(bytes(self._buffer[:end]))
            if problem:
                yield self._resync(problem, 1)
                continue
            assert length is not None
            del self._buffer[: end + 4]
            if length > self.max_body:
                reason = f"a message of {length} bytes, over the limit of {self.max_body}"
                header = HEADER_AT.search(self._buffer, 0, length)
                if header is not None:  # the next message already began: the length lied
                    kept = bytes(self._buffer[: min(header.start(), KEPT_BROKEN_BYTES)])
                    del self._buffer[: header.start()]
                    yield Broken(reason, kept)
                    continue
                dropped = min(length, len(self._buffer))
                kept = bytes(self._buffer[: min(dropped, KEPT_BROKEN_BYTES)])
                self._skip_tail = bytes(self._buffer[max(0, dropped - SPLIT_HEADER_BYTES) : dropped])
                del self._buffer[:dropped]
                self._skip = length - dropped
                if not self._skip:
                    self._skip_tail = b""
                yield Broken(reason, kept)
                if self._skip:
                    return
                continue
            self._length = length

    @staticmethod
    def _parse_header(block: bytes) -> tuple[str, int | None]:
        """("", length) for a valid header block, else (what is wrong, None)."""
        length: int | None = None
        for line in block.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                return f"a header line that is not 'Name: value': {line[:60]!r}", None
            if name.lower() == b"content-length":
                match = _LENGTH_VALUE.fullmatch(value)
                if match is None or length is not None:
                    return f"an invalid Content-Length: {value[:30].strip()!r}", None
                length = int(match.group(1))
        if length is None:
            return "a header without Content-Length", None
        return "", length

    def _next_header(self, start: int, data: bytes | bytearray | None = None) -> int | None:
        match = HEADER_AT.search(self._buffer if data is None else data, start)
        return match.start() if match else None

    def _resync(self, reason: str, start: int, keep_tail: bool = True) -> Broken:
        """Drop bytes up to the next header at or after ``start``; when there is none, all of them, or
        all but a short tail (``keep_tail``: a header may be arriving split)."""
        cut = self._next_header(start)
        if cut is None:
            cut = max(1, len(self._buffer) - 32) if keep_tail else len(self._buffer)
        broken = Broken(reason, bytes(self._buffer[: min(cut, KEPT_BROKEN_BYTES)]))
        del self._buffer[:cut]
        return broken


def _chain(first: Event, rest: Iterator[Event]) -> Iterator[Event]:
    yield first
    yield from rest

