"""The language server as a client of a remote engine: a ``dlm-serve`` or another Mercury FIM API.

With the ``endpoint`` setting the server loads no model: each completion is a
``POST /v1/fim/completions`` with the window around the cursor, and everything the
editor relies on stays here (debounce, the type-through cache, stale drops,
post-processing). Cancelling a completion closes its HTTP request (a ``dlm-serve``
then stops the request at its next denoising step); the latency budget is the
request's timeout, and is also sent as ``X-DLM-Budget-Ms`` (a ``dlm-serve`` keeps to
it; other servers ignore the header). The API key comes from an environment variable
or a file, never from the settings (which editors store in plain text).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

FIM_PATH = "/v1/fim/completions"
BUDGET_HEADER = "X-DLM-Budget-Ms"
SESSION_HEADER = "X-Session-Id"
"""Which document a request is for (hashed): Ray Serve's proxy routes on it, dlm-serve keys requests by it."""
NETWORK_SHARE = 0.2
"""Of the budget, this share (at least 10 ms) is left for the round trip; the server gets the rest."""
MAX_REPLY_BYTES = 4 << 20


class EndpointError(Exception):
    """The endpoint cannot be used: a bad URL, no answer, a refused key."""


@dataclass(frozen=True)
class Answer:
    """A remote completion: its text, why it ended, and whether the request was abandoned."""

    text: str
    finish_reason: str
    abandoned: bool = False
    """Cancelled or out of time before the answer came."""


class Endpoint:
    """One remote Mercury FIM endpoint (``base`` URL, or the full ``.../v1/fim/completions`` URL)."""

    def __init__(self, url: str, key_env: str = "DLM_API_KEY", key_file: str = "") -> None:
        parts = urlsplit(url.strip())
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or " " in parts.netloc:
            raise EndpointError(f"endpoint {url!r} is not an http(s) URL such as http://127.0.0.1:8012")
        self.url = url.strip()
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, port or (443 if self.https else 80)
        base = parts.path.rstrip("/")
        self.base = base[: -len(FIM_PATH)] if base.endswith(FIM_PATH) else base
        self.key_env, self.key_file = key_env, key_file
        self.key = _read_key(key_env, key_file)
        self.model = ""
        """The served model's name (``GET /v1/models``), sent with each request."""

    def headers(self) -> dict[str, str]:
        """Content type and, with a key, ``Authorization: Bearer``."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers

    def check(self, timeout_s: float = 10.0) -> str:
        """Ask ``GET /v1/models``; the served model's name (:class:`EndpointError` saying what is wrong)."""
        status, data = self._request("GET", self.base + "/v1/models", None, timeout_s, lambda: False)
        if status == 401:
            raise EndpointError(f"{self.url} refused the API key (from {self._key_source()})")
        if status != 200:
            raise EndpointError(f"{self.url} answered {status} to GET /v1/models: {_message(data)}")
        try:
            models = json.loads(data)["data"]
            self.model = str(models[0]["id"]) if models else ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EndpointError(f"{self.url} is not a Mercury FIM API (GET /v1/models: {exc})") from exc
        return self.model

    def complete(self, prompt: str, suffix: str, max_tokens: int, budget_ms: float,
                 stop: Callable[[], bool], document: str | None = None) -> Answer:
        """One completion; abandoned (no text) when ``stop`` turns true or the budget runs out first.

        ``document`` (its URI) goes as the request's ``user`` and ``X-Session-Id``, hashed: a ``dlm-serve``
        then lets a newer request of that document replace the older one and reuse its context pass, and
        Ray Serve keeps the document on one replica (:mod:`dlm_lsp.http.ray_app`); the path never leaves."""
        fields: dict[str, Any] = {"model": self.model, "prompt": prompt, "suffix": suffix, "max_tokens": max_tokens,
                                  "stream": False}
        server_budget = max(1.0, budget_ms - max(10.0, NETWORK_SHARE * budget_ms))
        headers = {BUDGET_HEADER: f"{server_budget:.0f}"}
        if document:
            session = "doc-" + hashlib.sha256(document.encode("utf-8", "surrogatepass")).hexdigest()[:24]
            fields["user"] = session
            headers[SESSION_HEADER] = session  # Ray Serve's proxy routes on it: one document, one replica
        body = json.dumps(fields).encode()
        status, data = self._request("POST", self.base + FIM_PATH, body, budget_ms / 1000, stop, headers)
        if status is None:
            return Answer("", "", abandoned=True)
        if status != 200:
            raise EndpointError(f"{self.url} answered {status}: {_message(data)}")
        try:
            choice = json.loads(data)["choices"][0]
            return Answer(str(choice.get("text") or ""), str(choice.get("finish_reason") or "stop"))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EndpointError(f"{self.url} sent a reply that is not a FIM completion: {exc}") from exc

    def _request(self, method: str, path: str, body: bytes | None, timeout_s: float, stop: Callable[[], bool],
                 extra: dict[str, str] | None = None) -> tuple[int | None, bytes]:
        """(status, body), or (None, b"") when stopped or out of time: the connection is closed then,
        which is how the server learns that the answer is no longer wanted."""
        deadline = time.monotonic() + timeout_s
        connection: http.client.HTTPConnection
        if self.https:
            connection = http.client.HTTPSConnection(self.host, self.port, timeout=max(0.05, timeout_s),
                                                     context=_tls_context())
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=max(0.05, timeout_s))
        connection.auto_open = 0  # never reconnect by itself after an abort
        outcome: dict[str, Any] = {}
        abandoned = threading.Event()

        def run() -> None:
            try:
                connection.connect()
                if abandoned.is_set():  # given up while connecting: send nothing
                    connection.close()
                    return
                connection.request(method, path or "/", body=body, headers={**self.headers(), **(extra or {})})
                response = connection.getresponse()
                outcome["reply"] = (response.status, response.read(MAX_REPLY_BYTES))
            except (OSError, http.client.HTTPException, AttributeError) as exc:  # AttributeError: closed under it
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="dlm-endpoint", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.01)
            if worker.is_alive() and (stop() or time.monotonic() > deadline):
                abandoned.set()
                _abort(connection)  # the server sees the request closed (the worker ends on its own)
                return None, b""
        connection.close()
        if "error" in outcome:
            error = outcome["error"]
            if isinstance(error, (socket.timeout, TimeoutError)):
                return None, b""
            raise EndpointError(f"{self.url} cannot be reached: {error}")
        status, data = outcome["reply"]
        return int(status), bytes(data)

    def _key_source(self) -> str:
        return f"${self.key_env}" + (f" or {self.key_file}" if self.key_file else "")


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every request (building one costs tens of milliseconds)."""
    return ssl.create_default_context()


def _abort(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    connection.close()


def _read_key(env: str, file: str) -> str:
    if env and os.environ.get(env):
        return os.environ[env].strip()
    if file:
        try:
            lines = Path(file).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise EndpointError(f"cannot read the endpoint's key file {file}: {exc.strerror}") from exc
        return lines[0].strip() if lines else ""
    return ""


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")
