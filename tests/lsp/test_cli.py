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
         "--log-level", "info", "--token-file", str(tmp_path / "token")],
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
            token = (tmp_path / "token").read_text().strip()
            params = {"capabilities": {}, "processId": None, "initializationOptions": {"authToken": token}}
            sock.sendall(_frame({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}))
            reply = _read_message(sock)
        assert reply["id"] == 1
        assert "inlineCompletionProvider" in reply["result"]["capabilities"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert out == b""  # nothing on stdout: logs went to the file
    assert log.read_text().strip()


def _read_frame(stream) -> dict:  # type: ignore[no-untyped-def]
    length = 0
    while (line := stream.readline().strip()) != b"":
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return json.loads(stream.read(length))


def _session(*args: str, timeout: float = 60) -> str:
    """A whole stdio session (initialize, a document, a completion once the model is ready, shutdown,
    exit) with the server started with ``args``; returns its stderr."""
    uri = "file:///w/a.py"
    proc = subprocess.Popen([sys.executable, "-m", "dlm_lsp", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None

    def send(message: dict) -> None:
        proc.stdin.write(_frame({"jsonrpc": "2.0", **message}))  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def request(id_: int, method: str, params: dict | None = None) -> dict:
        send({"id": id_, "method": method, "params": params or {}})
        while "id" not in (reply := _read_frame(proc.stdout)) or reply["id"] != id_:
            pass  # notifications ($/progress, window/logMessage) and requests to the client
        return reply

    request(1, "initialize", {"capabilities": {}, "processId": None})
    send({"method": "initialized", "params": {}})
    send({"method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": uri, "languageId": "python", "version": 1, "text": "def f(x):\n    return "}}})
    deadline = time.monotonic() + timeout
    while request(2, "dlm/status")["result"]["state"] in ("idle", "loading") and time.monotonic() < deadline:
        time.sleep(0.1)
    reply = request(3, "textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": {"line": 1, "character": 11}, "context": {"triggerKind": 1}})
    assert "result" in reply  # the completion was answered
    request(4, "shutdown")
    send({"method": "exit"})
    _, err = proc.communicate(timeout=timeout)
    return err.decode()


def test_stderr_is_quiet_by_default_and_never_carries_messages():
    assert _session() == ""  # WARNING and up only: a normal session prints nothing
    info = _session("--log-level", "info")
    assert "ready" in info  # the model load is reported at INFO
    assert "def f(x)" not in info and "Sending data" not in info  # no message payloads (the user's code) at INFO
    debug = _session("--log-level", "debug")
    assert "Sending data" in debug  # DEBUG shows everything, the messages too


def test_check_says_when_the_budget_ended_a_completion_before_any_text():
    proc = subprocess.run(
        [sys.executable, "-m", "dlm_lsp", "check", "--budget-ms", "1"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "(budget 1 ms, cut)" in proc.stdout and "(no suggestion)" in proc.stdout
    assert "the 1 ms budget ended it before anything was written" in proc.stdout and "latencyBudgetMs" in proc.stdout
