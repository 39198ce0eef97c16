"""``dlm-lsp --tcp``: one authenticated session per connection (issue 15's TCP findings).

pygls' TCP mode shared one server between connections: a bare connect-and-close
stopped it, a second client re-initialised it, wiped the first client's documents,
changed its model and received its responses; and anyone on the machine could
connect. Each test here starts the real server and connects real sockets.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from raw_lsp import ROOT, TcpClient

from dlm_lsp import transport

SETTINGS = {"backend": "cpu", "debounceMs": 0, "minConfidence": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpServer:
    """``python -m dlm_lsp --tcp`` on a free port with its own token file."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.token_file = tmp / "token"
        self.log = tmp / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlm_lsp", "--tcp", "--host", host, "--port", str(self.port),
             "--token-file", str(self.token_file), "--log-file", str(self.log), "--log-level", "info"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while "listening" not in (self.log.read_text() if self.log.exists() else ""):
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.05)

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def client(self, token: str | None = None, settings: dict | None = None) -> TcpClient:  # type: ignore[type-arg]
        client = TcpClient(self.port)
        reply = client.initialize({**(settings or SETTINGS), "authToken": token or self.token})
        assert "result" in reply, reply
        return client

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=20)


@pytest.fixture
def tcp(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = TcpServer(tmp_path)
    yield server
    server.stop()


def test_the_token_file_is_the_users_alone(tcp: TcpServer):
    mode = stat.S_IMODE(tcp.token_file.stat().st_mode)
    assert mode == 0o600 and len(tcp.token) >= 32


def test_a_client_without_the_token_is_refused_and_disconnected(tcp: TcpServer):
    for token in (None, "wrong-token-" + "x" * 30):
        client = TcpClient(tcp.port)
        options = {} if token is None else {"authToken": token}
        reply = client.request("init", "initialize", {"processId": None, "capabilities": {}, "initializationOptions": options})
        assert reply["error"]["code"] == -32001
        assert client.next(timeout=10) is None  # the server closed the connection
    assert tcp.proc.poll() is None


def test_nothing_but_initialize_is_served_before_it(tcp: TcpServer):
    client = TcpClient(tcp.port)
    assert client.request(1, "dlm/status", {})["error"]["code"] == -32002
    client.close()


def test_a_bare_connect_and_close_leaves_the_server_serving(tcp: TcpServer):
    for _ in range(3):
        socket.create_connection(("127.0.0.1", tcp.port), timeout=10).close()
    time.sleep(0.3)
    client = tcp.client()
    assert client.wait_ready()["state"] == "ready"
    assert tcp.proc.poll() is None


def test_sessions_share_no_documents_settings_or_responses(tcp: TcpServer):
    first = tcp.client()
    assert first.wait_ready()["state"] == "ready"
    first.open("file:///w/mine.py", "def mine():\n    return ")
    second = tcp.client(settings={**SETTINGS, "latencyBudgetMs": 999, "model": "/nowhere"})
    # the second client's settings are its own: its model fails, the first one's stays ready
    assert second.wait_ready()["state"] == "error"
    status = first.status()
    assert status["state"] == "ready" and status["settings"]["latencyBudgetMs"] != 999
    assert second.document_state("file:///w/mine.py") is None
    assert first.document_state("file:///w/mine.py") is not None
    # the same request id on both connections: each gets its own reply, and only that
    first.send({"jsonrpc": "2.0", "id": 42, "method": "dlm/status", "params": {}})
    second.send({"jsonrpc": "2.0", "id": 42, "method": "dlm/status", "params": {}})
    assert first.reply(42)["result"]["state"] == "ready"
    assert second.reply(42)["result"]["state"] == "error"
    assert "result" in first.complete(43, "file:///w/mine.py", 1, 11)
    time.sleep(0.3)
    leaked = [m for m in second.other if isinstance(m, dict) and m.get("id") == 43]
    assert not leaked
    # one session ending (exit) leaves the other running
    assert "result" in second.request("bye", "shutdown")
    second.notify("exit")
    assert second.next(timeout=10) is None
    assert first.status()["state"] == "ready"


def test_binding_beyond_loopback_warns(tmp_path: Path):
    server = TcpServer(tmp_path, host="0.0.0.0")
    try:
        assert "beyond this machine" in server.log.read_text()
    finally:
        server.stop()


def test_a_token_file_others_can_read_is_refused(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("t" * 40)
    os.chmod(token, 0o644)
    proc = subprocess.run(
        [sys.executable, "-m", "dlm_lsp", "--tcp", "--port", str(free_port()), "--token-file", str(token)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "chmod 600" in proc.stderr


def test_a_silent_connection_is_closed_after_the_authentication_timeout(monkeypatch: pytest.MonkeyPatch):
    from dlm_lsp.server import create_server

    monkeypatch.setattr(transport, "AUTH_TIMEOUT_S", 0.5)
    ports: list[int] = []
    loop = asyncio.new_event_loop()
    task = loop.create_task(transport.serve_tcp(create_server, "127.0.0.1", 0, "t" * 40, ready=lambda a: ports.append(a[0][1])))
    def run() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not ports and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server, with nothing sent
            assert time.monotonic() - started < 8
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(10)
