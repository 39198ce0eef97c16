"""Issue 15's protocol findings, each reproduced against the real server over stdio.

Every test sends what a broken or hostile client sends, checks the answer (the
JSON-RPC code the specification gives) and then that the server still answers a
normal request: nothing makes it deaf, nothing makes it die.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from raw_lsp import StdioServer, frame

from dlm_lsp.positions import offset_at

SETTINGS = {"backend": "cpu", "debounceMs": 0, "minConfidence": 0}
URI = "file:///w/robust.py"


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    srv = StdioServer()
    yield srv
    srv.stop()


@pytest.fixture
def ready(server: StdioServer) -> StdioServer:
    assert "result" in server.initialize(SETTINGS)
    assert server.wait_ready()["state"] == "ready"
    return server


def answers(server: StdioServer) -> None:
    """The server is alive and in step: a fresh request gets its own reply."""
    msg_id = f"check-{os.urandom(4).hex()}"
    assert "result" in server.request(msg_id, "dlm/status", {}, timeout=15)
    assert server.alive()


def error_code(reply: dict) -> int:  # type: ignore[type-arg]
    return reply["error"]["code"]


def null_id_error(server: StdioServer, code: int) -> dict:  # type: ignore[type-arg]
    return server.wait_for(lambda m: isinstance(m, dict) and m.get("id") is None and m.get("error", {}).get("code") == code)


# -- framing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [b"Content-Length: -5", b"Content-Length: abc", b"Content-Length: 1e3", b"Content-Length:"])
def test_an_invalid_content_length_is_answered_and_the_stream_resyncs(ready: StdioServer, header: bytes):
    ready.send_bytes(header + b"\r\n\r\n" + json.dumps({"jsonrpc": "2.0", "id": 7, "method": "dlm/status"}).encode())
    ready.send_bytes(frame({"jsonrpc": "2.0", "id": 8, "method": "dlm/status", "params": {}}))
    assert "result" in ready.reply(8)
    assert ready.other and all(m["error"]["code"] == -32700 for m in ready.other if "error" in m)
    answers(ready)


def test_a_content_length_too_short_is_answered_and_the_next_message_read(ready: StdioServer):
    body = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "dlm/status", "params": {}}).encode()
    ready.send_bytes(frame(body, length=len(body) - 10))
    assert error_code(ready.reply(9)) == -32700  # the id is recovered from the broken bytes
    answers(ready)


def test_a_content_length_too_long_is_cut_at_the_next_message(ready: StdioServer):
    body = json.dumps({"jsonrpc": "2.0", "id": 10, "method": "dlm/status", "params": {}}).encode()
    ready.send_bytes(frame(body, length=len(body) + 500))
    ready.send_bytes(frame({"jsonrpc": "2.0", "id": 11, "method": "dlm/status", "params": {}}))
    assert "result" in ready.reply(11, timeout=20)
    assert error_code(ready.reply(10)) == -32700
    answers(ready)


def test_a_huge_content_length_neither_crashes_nor_allocates(ready: StdioServer):
    ready.send_bytes(b"Content-Length: 99999999999\r\n\r\n" + b'{"jsonrpc": "2.0", "id": 12, "method": "dlm/status"}')
    ready.send_bytes(frame({"jsonrpc": "2.0", "id": 13, "method": "dlm/status", "params": {}}))
    assert "result" in ready.reply(13, timeout=20)
    assert "over the limit" in ready.reply(12)["error"]["message"]  # the id is recovered from the bytes
    answers(ready)


# -- JSON-RPC ------------------------------------------------------------------------------
def test_malformed_json_gets_a_parse_error(ready: StdioServer):
    ready.send_bytes(frame(b'{"jsonrpc": "2.0", "id": 14, "method": '))
    assert error_code(ready.reply(14)) == -32700
    ready.send_bytes(frame(b"[[[[[[[[[[" * 100_000))  # nesting deeper than the parser's recursion
    null_id_error(ready, -32700)
    answers(ready)


def test_bytes_that_are_not_utf8_get_a_parse_error(ready: StdioServer):
    ready.send_bytes(frame(b'{"jsonrpc": "2.0", "id": 15, "method": "dlm/status", "params": {"x": "\xff\xfe"}}'))
    reply = ready.reply(15)
    assert error_code(reply) == -32700 and "UTF-8" in reply["error"]["message"]
    answers(ready)


def test_a_batch_is_rejected_request_by_request(ready: StdioServer):
    ready.send([{"jsonrpc": "2.0", "id": 16, "method": "dlm/status"}, {"jsonrpc": "2.0", "method": "dlm/didShowCompletion"},
                {"jsonrpc": "2.0", "id": 17, "method": "dlm/status"}])
    batch = ready.reply(16)
    assert isinstance(batch, list) and {m["id"] for m in batch} == {16, 17}
    assert all(m["error"]["code"] == -32600 for m in batch)
    ready.send([])
    null_id_error(ready, -32600)
    answers(ready)


@pytest.mark.parametrize("bad_id", [{"a": 1}, [1], 1.5, True])
def test_an_id_that_is_not_a_number_or_string_is_an_invalid_request(ready: StdioServer, bad_id: object):
    ready.send({"jsonrpc": "2.0", "id": bad_id, "method": "dlm/status", "params": {}})
    null_id_error(ready, -32600)
    answers(ready)


@pytest.mark.parametrize("position", [{"line": -1, "character": 0}, {"line": 0, "character": -3},
                                      {"line": 2**31, "character": 0}, {"line": 0, "character": 2**40}])
def test_positions_outside_the_protocol_range_are_invalid_params(ready: StdioServer, position: dict):  # type: ignore[type-arg]
    ready.open(URI, "x = 1\n")
    reply = ready.request(18, "textDocument/inlineCompletion",
                          {"textDocument": {"uri": URI}, "position": position, "context": {"triggerKind": 1}})
    assert error_code(reply) == -32602 and "position" in reply["error"]["message"]
    answers(ready)


def test_a_wrong_jsonrpc_version_and_a_non_object_are_invalid_requests(ready: StdioServer):
    assert error_code(_send_v1(ready)) == -32600
    ready.send("just a string")
    null_id_error(ready, -32600)
    answers(ready)


def _send_v1(server: StdioServer) -> dict:  # type: ignore[type-arg]
    server.send({"jsonrpc": "1.0", "id": 19, "method": "dlm/status", "params": {}})
    return server.reply(19)


# -- the session's life ----------------------------------------------------------------------
def test_a_request_before_initialize_is_server_not_initialized(server: StdioServer):
    assert error_code(server.request(20, "dlm/status", {})) == -32002
    # the session's state is answered before the params are looked at
    assert error_code(server.request(22, "textDocument/inlineCompletion", {"position": {"line": -1}})) == -32002
    server.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1, "text": "a"}})
    assert "result" in server.initialize(SETTINGS)
    assert server.document_state(URI) is None  # notifications before initialize are dropped (LSP)


def test_a_second_initialize_is_refused_and_forgets_nothing(ready: StdioServer):
    ready.open(URI, "def f():\n    pass\n")
    before = ready.document_state(URI)
    reply = ready.initialize({"backend": "cpu", "model": "/nonexistent"}, msg_id="again")
    assert error_code(reply) == -32600
    assert ready.document_state(URI) == before
    assert ready.status()["state"] == "ready"  # and the settings it carried were not applied


def test_a_request_after_shutdown_is_answered(ready: StdioServer):
    assert "result" in ready.request(21, "shutdown")
    assert error_code(ready.request(22, "dlm/status", {})) == -32600
    ready.notify("exit")
    assert ready.proc.wait(timeout=10) == 0


# -- documents -----------------------------------------------------------------------------
def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def splice(text: str, start: dict, end: dict, new: str) -> str:  # type: ignore[type-arg]
    """The reference: the range's two offsets (ordered), LSP's clamping, the text between replaced."""
    from lsprotocol import types

    a = offset_at(text, types.Position(**start))
    b = offset_at(text, types.Position(**end))
    a, b = min(a, b), max(a, b)
    return text[:a] + new + text[b:]


@pytest.mark.parametrize(("start", "end"), [
    ({"line": 0, "character": 6}, {"line": 0, "character": 2}),  # start after end: the text was dropped
    ({"line": 9, "character": 0}, {"line": 12, "character": 4}),  # past the end of the document
    ({"line": 0, "character": 99}, {"line": 1, "character": 99}),  # past the end of lines
])
def test_malformed_ranges_are_read_as_the_reference_implementation_reads_them(ready: StdioServer, start: dict, end: dict):  # type: ignore[type-arg]
    text = "alpha beta\ngamma\n"
    ready.open(URI, text)
    ready.change(URI, 2, [{"range": {"start": start, "end": end}, "text": "XY"}])
    state = ready.document_state(URI)
    assert state is not None and state["version"] == 2
    assert state["sha256"] == sha(splice(text, start, end, "XY"))
    assert state["repairs"] == 1


def test_form_feeds_and_line_separators_are_not_line_breaks(ready: StdioServer):
    text = "a = 1\x0cb = 2\u2028c\nd = 4\n"
    ready.open(URI, text)
    ready.change(URI, 2, [{"range": {"start": {"line": 1, "character": 0}, "end": {"line": 1, "character": 1}}, "text": "D"}])
    assert ready.document_state(URI)["sha256"] == sha(text.replace("d = 4", "D = 4"))  # type: ignore[index]


def test_a_lone_surrogate_does_not_break_completions(ready: StdioServer):
    ready.send_bytes(frame(b'{"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": '
                           b'{"uri": "file:///w/s.py", "languageId": "python", "version": 1, '
                           b'"text": "name = \\"\\ud800\\"\\nvalue = "}}}'))
    reply = ready.complete(23, "file:///w/s.py", 1, 8)
    assert "result" in reply, reply
    assert ready.document_state("file:///w/s.py")["length"] == len('name = "\ud800"\nvalue = ')  # type: ignore[index]


def test_a_five_megabyte_line_is_edited_and_completed(ready: StdioServer):
    text = "x = '" + "a" * 5_000_000 + "'\n" + "def f():\n    return "
    ready.open(URI, text)
    for version in range(2, 12):  # typing inside the long line
        at = {"line": 0, "character": 2_500_000 + version}
        ready.change(URI, version, [{"range": {"start": at, "end": at}, "text": "b"}])
        text = text[: 2_500_000 + version] + "b" + text[2_500_000 + version :]
    assert ready.document_state(URI)["sha256"] == sha(text)  # type: ignore[index]
    assert "result" in ready.complete(24, URI, 2, 11)
    assert "result" in ready.complete(25, URI, 0, 2_500_000)


def test_middles_longer_than_the_model_window_are_capped_with_a_warning(server: StdioServer):
    server.initialize({**SETTINGS, "lengthCandidates": [512], "maxMiddleTokens": 512, "multiline": "always"})
    assert server.wait_ready()["state"] == "ready"
    server.open(URI, "def f():\n    ")
    reply = server.complete(26, URI, 1, 4)
    assert "result" in reply, reply
    warning = [m for m in server.other if m.get("method") == "window/showMessage" and "window" in m["params"]["message"]]
    assert warning, server.other


def test_notifications_leave_nothing_behind(ready: StdioServer):
    """pygls 2.1 kept a future per notification handled by a coroutine or generator (about 2 KB each)."""
    ready.open(URI, "x = 1\n")
    for version in range(2, 1502):
        ready.change(URI, version, [{"range": {"start": {"line": 0, "character": 5}, "end": {"line": 0, "character": 5}}, "text": "1"}])
        ready.notify("dlm/didAcceptCompletion", {"acceptedLength": 1})
    ready.notify("workspace/didChangeConfiguration", {"settings": {"dlm": SETTINGS}})
    status = ready.status()
    assert status["pending_messages"] <= 2, status["pending_messages"]
    assert ready.document_state(URI)["version"] == 1501  # type: ignore[index]
