"""Property-based fuzzing (hypothesis) of framing, document sync, context building and post-processing.

Unit properties run the code directly; the last test drives a real server process
with random edits (ranges anywhere, odd characters), completions at random
positions and broken frames, and checks after every example that the server
answered everything and holds exactly the client's text.

``DLM_FUZZ_EXAMPLES`` (default 60) sets the examples per property; ``docs/reliability.md``
records a long run: ``DLM_FUZZ_EXAMPLES=2000 python -m pytest tests/lsp/test_fuzz.py
--hypothesis-show-statistics``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lsprotocol import types
from raw_lsp import StdioServer, frame

from dlm_lsp.context import WHOLE_TEXT_CHARS, build_context, window
from dlm_lsp.documents import Document, split_lines
from dlm_lsp.framing import MAX_HEADER_BYTES, Broken, Frame, FrameDecoder
from dlm_lsp.positions import offset_at, position_at
from dlm_lsp.postprocess import postprocess
from dlm_lsp.settings import Settings

EXAMPLES = int(os.environ.get("DLM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ENCODINGS = [types.PositionEncodingKind.Utf16, types.PositionEncodingKind.Utf8, types.PositionEncodingKind.Utf32]
ODD = ["a", "b", " ", "\t", "\n", "\r", "\r\n", "\x00", "\x0c", "\x0b", "\x85", "\u2028", "\u2029", "é", "中",
       "\U0001f600", "\ud800", "\udfff", "(", ")", ":", "{", "}", "'", '"', "#"]
odd_text = st.lists(st.sampled_from(ODD), max_size=40).map("".join)
positions = st.builds(
    lambda line, character: types.Position(line=line, character=character),
    st.one_of(st.integers(0, 12), st.just(2**31 - 1)),
    st.one_of(st.integers(0, 30), st.just(2**31 - 1)),
)


def chop(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given points."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def drive(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame | Broken]:
    """Feed ``chunks`` as the server's connection does: a frame that is not JSON is handed back
    (:meth:`FrameDecoder.recover`), and the stream's end counts as a stall."""
    events: list[Frame | Broken] = []

    def take(new: Iterator[Frame | Broken]) -> None:
        for event in new:
            events.append(event)
            if isinstance(event, Frame):
                try:
                    json.loads(event.body)
                except ValueError:
                    decoder.recover(event.body)

    for chunk in chunks:
        take(decoder.feed(chunk))
        assert len(decoder._buffer) <= decoder.max_body + MAX_HEADER_BYTES + 4
    for _ in range(4):
        take(decoder.stall())
    return events


json_bodies = st.lists(
    st.dictionaries(st.sampled_from(["id", "method", "params", "text"]), st.one_of(st.integers(), st.text(max_size=30)), max_size=4),
    min_size=1, max_size=6,
).map(lambda items: [json.dumps(item).encode() for item in items])


# -- framing ---------------------------------------------------------------------------------
@FUZZ
@given(bodies=st.lists(st.binary(max_size=300), max_size=8), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_valid_frames_come_out_whole_however_the_stream_is_cut(bodies: list[bytes], cuts: list[int]):
    stream = b"".join(frame(body) for body in bodies)
    decoder = FrameDecoder()
    events = [event for chunk in chop(stream, cuts) for event in decoder.feed(chunk)]
    assert not list(decoder.stall())
    assert events == [Frame(body) for body in bodies]
    assert not decoder.mid_frame


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=3000), bodies=json_bodies, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_garbage_before_frames_never_hides_them(garbage: bytes, bodies: list[bytes], cuts: list[int]):
    if b"content-length" in garbage.lower():
        garbage = garbage.lower().replace(b"content-length", b"c")
    events = drive(FrameDecoder(), chop(garbage + b"".join(frame(body) for body in bodies), cuts))
    frames = [event.body for event in events if isinstance(event, Frame)]
    assert frames[len(frames) - len(bodies):] == bodies


@FUZZ
@given(bodies=json_bodies, error=st.integers(-40, 400).filter(lambda e: e != 0), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_after_a_wrong_length_the_following_messages_are_read(bodies: list[bytes], error: int, cuts: list[int]):
    first = json.dumps({"id": 1, "method": "dlm/status"}).encode()
    wrong = frame(first, length=max(0, len(first) + error))
    events = drive(FrameDecoder(), chop(wrong + b"".join(frame(body) for body in bodies), cuts))
    frames = [event.body for event in events if isinstance(event, Frame)]
    # the frame right after the wrong one may be lost with it (its header swallowed), never more
    assert bodies[1:] == frames[len(frames) - len(bodies) + 1 :]


@FUZZ
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_any_bytes_at_all_never_raise_and_stay_bounded(data: bytes, cuts: list[int]):
    decoder = FrameDecoder(max_body=1000)
    drive(decoder, chop(data, cuts))


# -- documents ---------------------------------------------------------------------------------
def reference_edit(text: str, start: types.Position, end: types.Position, new: str, encoding: str) -> str:
    """Offsets by the independent implementation in :mod:`dlm_lsp.positions`, ordered, spliced."""
    a, b = offset_at(text, start, encoding), offset_at(text, end, encoding)
    return text[: min(a, b)] + new + text[max(a, b) :]


edits = st.lists(st.tuples(positions, positions, odd_text), max_size=8)


@FUZZ
@given(text=odd_text, changes=edits, encoding=st.sampled_from(ENCODINGS))
@example(  # two lone surrogates side by side are two characters, not the pair UTF-16 would decode them to
    text="\ud800\udfff", encoding=types.PositionEncodingKind.Utf16,
    changes=[(types.Position(line=0, character=2**31 - 1), types.Position(line=0, character=0), "")],
)
def test_the_document_always_equals_the_clients_text(text: str, changes: list, encoding: str):  # type: ignore[type-arg]
    doc = Document("file:///f", "python", 1, split_lines(text), encoding)
    expected = text
    for start, end, new in changes:
        doc.apply(types.TextDocumentContentChangePartial(range=types.Range(start=start, end=end), text=new))
        expected = reference_edit(expected, start, end, new, encoding)
        assert doc.text == expected
        assert len(doc) == len(expected)
    doc.apply(types.TextDocumentContentChangeWholeDocument(text=text))
    assert doc.text == text


@FUZZ
@given(text=odd_text, position=positions, offset=st.integers(-5, 60), encoding=st.sampled_from(ENCODINGS))
def test_positions_agree_with_the_reference(text: str, position: types.Position, offset: int, encoding: str):
    doc = Document("file:///f", "python", 1, split_lines(text), encoding)
    assert doc.offset_at(position) == offset_at(text, position, encoding)
    assert doc.position_at(offset) == position_at(text, offset, encoding)


# -- context and post-processing ---------------------------------------------------------------------
code_lines = st.lists(
    st.sampled_from(["def f(x):", "    return x", "class A:", "    pass", "", "x = [1, 2,", "    3]", "if a:", "\tb = 'c'",
                     "# comment", "print(x)  # é", "y = \"\"\"doc", "\"\"\""]),
    min_size=1, max_size=60,
)


@FUZZ
@given(lines=code_lines, repeat=st.integers(1, 2000), where=st.floats(0, 1), prefix_tokens=st.sampled_from([0, 192, 3000]))
def test_the_window_gives_the_same_context_as_the_whole_document(lines: list[str], repeat: int, where: float, prefix_tokens: int):
    text = "\n".join(lines * repeat)
    offset = int(where * len(text))
    current = Settings(prefix_tokens=prefix_tokens)
    part, at, start = window(text, offset, current)
    assert part[at:at + 10] == text[offset:offset + 10] and (start == 0) == (len(text) <= WHOLE_TEXT_CHARS or offset - at == 0)
    whole, cut = build_context(text, offset, "python", current), build_context(part, at, "python", current)
    assert (cut.prefix, cut.suffix, cut.post, cut.multiline) == (whole.prefix, whole.suffix, whole.post, whole.multiline)


@FUZZ
@given(completion=odd_text, lines=code_lines, where=st.floats(0, 1), language=st.sampled_from(["python", "go", "lua", "plaintext"]))
def test_post_processing_takes_any_completion_anywhere(completion: str, lines: list[str], where: float, language: str):
    text = "\n".join(lines)
    offset = int(where * len(text))
    ctx = build_context(text, offset, language, Settings())
    suggestion = postprocess(completion, ctx.post)
    if suggestion is not None:
        assert suggestion.text and 0 <= suggestion.replace_suffix <= len(ctx.post.line_suffix)


# -- the real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live():  # type: ignore[no-untyped-def]
    server = StdioServer()
    assert "result" in server.initialize({"backend": "cpu", "debounceMs": 0, "minConfidence": 0})
    assert server.wait_ready()["state"] == "ready"
    yield server
    code, err = server.stop()
    assert code == 0, err


wire_text = st.lists(st.sampled_from([c for c in ODD if c != "\udfff"]), max_size=40).map("".join)
"""No lone low surrogate: after a lone high one, JSON (like a UTF-16 client) reads the two as one character."""
operations = st.lists(
    st.one_of(
        st.tuples(st.just("edit"), positions, positions, wire_text),
        st.tuples(st.just("complete"), positions),
        st.tuples(st.just("garbage"), st.binary(max_size=200)),
    ),
    max_size=12,
)
counter = {"examples": 0, "requests": 0}


@settings(max_examples=max(10, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck))
@given(text=wire_text, ops=operations)
def test_the_server_answers_everything_and_stays_in_step(live: StdioServer, text: str, ops: list):  # type: ignore[type-arg]
    counter["examples"] += 1
    uri = f"file:///fuzz/{counter['examples']}.py"
    live.open(uri, text)
    version, expected = 1, text
    for op in ops:
        counter["requests"] += 1
        msg_id = f"fuzz-{counter['requests']}"
        if op[0] == "edit":
            _, start, end, new = op
            version += 1
            live.change(uri, version, [{"range": {"start": {"line": start.line, "character": start.character},
                                                  "end": {"line": end.line, "character": end.character}}, "text": new}])
            expected = reference_edit(expected, start, end, new, types.PositionEncodingKind.Utf16)
        elif op[0] == "complete":
            reply = live.complete(msg_id, uri, op[1].line, op[1].character)
            assert "result" in reply, reply
        else:
            live.send_bytes(frame(op[1]))  # a frame whose body is anything at all
    state = live.document_state(uri)
    assert state is not None and state["version"] == version
    assert state["length"] == len(expected)
    assert state["sha256"] == hashlib.sha256(expected.encode("utf-8", "surrogatepass")).hexdigest()
    live.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    assert live.alive()


@FUZZ
@given(bodies=json_bodies, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_after_a_length_over_the_limit_the_following_messages_are_read(bodies: list[bytes], cuts: list[int]):
    """``Content-Length: 99999999999``: its bytes are dropped as they come, but the messages after them
    are read, however the stream is cut (a header split across two chunks included)."""
    first = json.dumps({"id": 12, "method": "dlm/status"}).encode()
    stream = frame(first, length=99_999_999_999) + b"".join(frame(body) for body in bodies)
    events = drive(FrameDecoder(), chop(stream, cuts))
    frames = [event.body for event in events if isinstance(event, Frame)]
    assert frames == bodies
