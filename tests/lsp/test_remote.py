"""The language server with the ``endpoint`` setting: completions from a ``dlm-serve`` (a real one,
with the scripted model so that the text is known) instead of a model loaded in the editor."""

from __future__ import annotations

import json
import time

import pytest
from http_client import Serve, free_port
from raw_lsp import StdioServer

KEY = "remote-mode-test-key-0123456789"
URI = "file:///w/remote.py"
TEXT = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"
SETTINGS = {"backend": "cpu", "debounceMs": 0, "minConfidence": 0, "latencyBudgetMs": 2000, "tokenHealing": False}


@pytest.fixture(scope="module")
def served():  # type: ignore[no-untyped-def]
    server = Serve("--min-confidence", "0", "--settings", '{"tokenHealing": false}',
                   script={"text": "a + b", "p": 0.95}, env={"DLM_SERVE_API_KEYS": KEY})
    yield server
    server.stop()


def start(settings: dict, key: str | None = KEY) -> StdioServer:  # type: ignore[type-arg]
    server = StdioServer(env={"DLM_API_KEY": key} if key else {"DLM_API_KEY": ""})
    assert "result" in server.initialize(settings)
    return server


def test_completions_come_from_the_endpoint(served: Serve):
    lsp = start({**SETTINGS, "endpoint": served.url})
    try:
        status = lsp.wait_ready()
        assert status["state"] == "ready" and status["backend"] == "remote" and status["endpoint"] == served.url
        assert status["model"] == "dlm-default"
        lsp.open(URI, TEXT)
        item = lsp.complete("r1", URI, 1, 11)["result"]["items"][0]
        assert item["insertText"] == "a + b"
        assert item["range"]["start"] == {"line": 1, "character": 11}
        again = lsp.complete("r2", URI, 1, 11)["result"]["items"][0]  # the type-through cache, not the network
        assert again["insertText"] == "a + b" and lsp.status()["cache_hits"] == 1
        # a settings change that leaves the endpoint alone does not reconnect (no new load)
        loaded = lsp.status()["load_ms"]
        lsp.notify("workspace/didChangeConfiguration", {"settings": {"dlm": {**SETTINGS, "endpoint": served.url,
                                                                             "latencyBudgetMs": 1500}}})
        status = lsp.status()
        assert status["state"] == "ready" and status["load_ms"] == loaded
        assert status["settings"]["latencyBudgetMs"] == 1500
    finally:
        lsp.stop()


def test_a_refused_key_or_an_absent_server_is_reported_and_clearing_the_setting_recovers(served: Serve):
    lsp = start({**SETTINGS, "endpoint": served.url}, key="wrong-key-wrong-key-wrong")
    try:
        status = lsp.wait_ready()
        assert status["state"] == "error" and "refused the API key" in status["error"] and "DLM_API_KEY" in status["error"]
        lsp.notify("workspace/didChangeConfiguration", {"settings": {"dlm": {**SETTINGS, "endpoint": f"http://127.0.0.1:{free_port()}"}}})
        status = lsp.wait_ready()
        assert status["state"] == "error" and "cannot be reached" in status["error"]
        for bad in ("ftp://x", "http://localhost:80800", "http://bad host:1"):
            lsp.notify("workspace/didChangeConfiguration", {"settings": {"dlm": {**SETTINGS, "endpoint": bad}}})
            assert "not an http(s) URL" in lsp.wait_ready()["error"], bad
        lsp.notify("workspace/didChangeConfiguration", {"settings": {"dlm": SETTINGS}})  # back to a local model
        status = lsp.wait_ready()
        assert status["state"] == "ready" and status["backend"] == "cpu"
    finally:
        lsp.stop()


class SlowEndpoint:
    """A Mercury endpoint that lists a model and then never answers a completion, recording when
    each completion's connection was closed by the client."""

    def __init__(self) -> None:
        import http.server
        import threading

        closed: list[float] = []
        self.closed = closed

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                body = json.dumps({"object": "list", "data": [{"id": "slow", "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self.connection.settimeout(30)
                try:
                    self.connection.recv(1)  # returns b"" when the client closes the request
                finally:
                    closed.append(time.monotonic())

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def test_the_budget_is_a_timeout_that_closes_the_request_and_shows_nothing():
    slow = SlowEndpoint()
    lsp = start({**SETTINGS, "endpoint": slow.url, "latencyBudgetMs": 300}, key=None)
    try:
        assert lsp.wait_ready()["state"] == "ready"
        lsp.open(URI, TEXT)
        started = time.monotonic()
        reply = lsp.complete("late", URI, 1, 11)
        assert reply["result"]["items"] == [] and time.monotonic() - started < 5
        deadline = time.monotonic() + 5
        while not slow.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.closed, "the client never closed the request it gave up on"
        assert lsp.status()["budget_cuts"] == 1
    finally:
        lsp.stop()
        slow.stop()
