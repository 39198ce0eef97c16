"""A raw JSON-RPC client for the robustness tests: exact bytes in, parsed messages out.

pytest-lsp speaks the protocol correctly; these tests need to speak it wrongly
(broken headers, batches, bad ids) and see every byte the server sends back. The
server is the real one (``python -m dlm_lsp``) over stdio, or a TCP session.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def frame(message: Any, length: int | None = None) -> bytes:
    """A message framed as the base protocol frames it (``length`` overrides the true length)."""
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body


def read_frames(stream_read: Callable[[int], bytes], out: queue.Queue) -> None:  # type: ignore[type-arg]
    """Parse frames from a byte source into ``out`` until it ends (None marks the end)."""
    buffer = b""
    while True:
        chunk = stream_read(1 << 16)
        if not chunk:
            out.put(None)
            return
        buffer += chunk
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            header = buffer[:end].decode("ascii")
            length = int([line for line in header.split("\r\n") if line.lower().startswith("content-length")][0].split(":")[1])
            if len(buffer) < end + 4 + length:
                break
            out.put(json.loads(buffer[end + 4 : end + 4 + length]))
            buffer = buffer[end + 4 + length :]


class RawClient:
    """Send bytes or messages; wait for replies by id; everything else the server sends is kept."""

    def __init__(self, write: Callable[[bytes], None], read: Callable[[int], bytes]) -> None:
        self._write = write
        self.inbox: queue.Queue = queue.Queue()  # type: ignore[type-arg]
        self.other: list[dict] = []  # type: ignore[type-arg]
        """Messages that were not the reply waited for (notifications, requests, null-id errors)."""
        self.closed = False
        threading.Thread(target=read_frames, args=(read, self.inbox), daemon=True).start()

    def send_bytes(self, data: bytes) -> None:
        """Exactly these bytes."""
        self._write(data)

    def send(self, message: Any) -> None:
        """One message, framed."""
        self._write(frame(message))

    def notify(self, method: str, params: Any = None) -> None:
        """A notification."""
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def next(self, timeout: float = 20.0) -> dict | None:  # type: ignore[type-arg]
        """The next message from the server (None once the stream ended)."""
        message = self.inbox.get(timeout=timeout)
        if message is None:
            self.closed = True
        return message

    def wait_for(self, match: Callable[[Any], bool], timeout: float = 30.0) -> Any:
        """The first message for which ``match`` holds, among those kept in :attr:`other` first."""
        for index, kept in enumerate(self.other):
            if match(kept):
                return self.other.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if message is None:
                raise ConnectionError("the server closed the stream")
            if match(message):
                return message
            self.answer_server_request(message)
            self.other.append(message)

    def reply(self, msg_id: Any, timeout: float = 30.0) -> dict:  # type: ignore[type-arg]
        """The reply to request ``msg_id`` (a batch reply counts when it holds that id)."""
        def match(m: Any) -> bool:
            if isinstance(m, list):
                return any(item.get("id") == msg_id for item in m)
            return "method" not in m and m.get("id") == msg_id
        return self.wait_for(match, timeout)

    def request(self, msg_id: Any, method: str, params: Any = None, timeout: float = 30.0) -> dict:  # type: ignore[type-arg]
        """Send a request and wait for its reply."""
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return self.reply(msg_id, timeout)

    def answer_server_request(self, message: Any) -> None:
        """Answer the server's own requests (configuration, progress) as a plain client would."""
        if isinstance(message, dict) and "method" in message and "id" in message:
            result: Any = [None] if message["method"] == "workspace/configuration" else None
            self.send({"jsonrpc": "2.0", "id": message["id"], "result": result})

    def initialize(self, options: dict | None = None, msg_id: Any = "init") -> dict:  # type: ignore[type-arg]
        """initialize + initialized; the initialize reply."""
        reply = self.request(msg_id, "initialize", {"processId": None, "capabilities": {}, "initializationOptions": options})
        if "result" in reply:
            self.notify("initialized", {})
        return reply

    def status(self, msg_id: Any = None) -> dict:  # type: ignore[type-arg]
        """``dlm/status``."""
        reply = self.request(msg_id or f"status-{time.monotonic_ns()}", "dlm/status", {})
        return reply["result"]

    def wait_ready(self, timeout: float = 60.0) -> dict:  # type: ignore[type-arg]
        """Poll the status until the model is ready or failed."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["state"] in ("ready", "error") or time.monotonic() > deadline:
                return status
            time.sleep(0.05)

    def open(self, uri: str, text: str, version: int = 1, language: str = "python") -> None:
        """``didOpen``."""
        self.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": language, "version": version, "text": text}})

    def change(self, uri: str, version: int, changes: list[dict]) -> None:  # type: ignore[type-arg]
        """``didChange``."""
        self.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version}, "contentChanges": changes})

    def complete(self, msg_id: Any, uri: str, line: int, character: int, timeout: float = 30.0) -> dict:  # type: ignore[type-arg]
        """``textDocument/inlineCompletion`` (invoked)."""
        return self.request(msg_id, "textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": character}, "context": {"triggerKind": 1}},
            timeout)

    def document_state(self, uri: str) -> dict | None:  # type: ignore[type-arg]
        """``dlm/documentState``."""
        return self.request(f"doc-{time.monotonic_ns()}", "dlm/documentState", {"uri": uri})["result"]


class StdioServer(RawClient):
    """``python -m dlm_lsp`` (or ``script``) over pipes; ``prefix`` runs it under another command,
    ``root`` from another checkout (to measure an older version side by side)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None,
                 script: str | None = None, root: Path = ROOT) -> None:
        entry = [script] if script else ["-m", "dlm_lsp"]
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, *entry, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), **(env or {})},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None

        def write(data: bytes) -> None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

        super().__init__(write, self.proc.stdout.read1)  # type: ignore[union-attr]

    def alive(self) -> bool:
        """The process has not exited."""
        return self.proc.poll() is None

    def stop(self) -> tuple[int, str]:
        """Shut down and exit if it still runs; (exit status, stderr)."""
        if self.alive():
            try:
                self.request("bye", "shutdown", None, timeout=10)
                self.notify("exit")
            except (OSError, ConnectionError, queue.Empty):
                pass
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err.decode("utf-8", "replace")


class TcpClient(RawClient):
    """One connection to a ``dlm-lsp --tcp`` server."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.settimeout(None)

        def read(n: int) -> bytes:
            try:
                return self.sock.recv(n)
            except OSError:
                return b""

        super().__init__(self.sock.sendall, read)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()
