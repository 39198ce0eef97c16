"""``dlm-lsp`` entry points: TCP serving and logs that never touch stdout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def _read_message(sock: socket.socket) -> dict:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    header, rest = data.split(b"\r\n\r\n", 1)
    length = int(header.split(b"Content-Length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(4096)
    return json.loads(rest[:length])


def test_tcp_server_answers_initialize(tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlm_lsp", "--tcp", "--host", "127.0.0.1", "--port", str(port), "--log-file", str(log),
         "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("server did not listen")
        with sock:
            sock.sendall(_frame({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "processId": None}}))
            reply = _read_message(sock)
        assert reply["id"] == 1
        assert "inlineCompletionProvider" in reply["result"]["capabilities"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert out == b""  # nothing on stdout: logs went to the file
    assert log.read_text().strip()


def _session(*args: str, timeout: float = 60) -> str:
    """A whole stdio session (initialize, a document, a completion once the model is ready, shutdown,
    exit) with the server started with ``args``; returns its stderr."""
    uri = "file:///w/a.py"
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "processId": None}},
        {"jsonrpc": "2.0", "method": "initialized", "params": {}},
        {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": "def f(x):\n    return "}}},
    ]
    proc = subprocess.Popen([sys.executable, "-m", "dlm_lsp", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"".join(_frame(m) for m in messages))
    proc.stdin.flush()
    time.sleep(3)  # the model loads in the background
    request = {"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
        "textDocument": {"uri": uri}, "position": {"line": 1, "character": 11}, "context": {"triggerKind": 1}}}
    end = [{"jsonrpc": "2.0", "id": 3, "method": "shutdown"}, {"jsonrpc": "2.0", "method": "exit"}]
    out, err = proc.communicate(b"".join(_frame(m) for m in [request, *end]), timeout=timeout)
    assert b'"id": 2' in out or b'"id":2' in out  # the completion was answered
    return err.decode()


def test_stderr_is_quiet_by_default_and_never_carries_messages():
    assert _session() == ""  # WARNING and up only: a normal session prints nothing
    info = _session("--log-level", "info")
    assert "ready" in info  # the model load is reported at INFO
    assert "def f(x)" not in info and "Sending data" not in info  # no message payloads (the user's code) at INFO
    debug = _session("--log-level", "debug")
    assert "Sending data" in debug  # DEBUG shows everything, the messages too
