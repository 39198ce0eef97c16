"""Clients of the HTTP APIs, written from the APIs' published descriptions (not from our server):

* Inception's Mercury FIM endpoint (``POST /v1/fim/completions``: ``model``, ``prompt``,
  ``suffix``, ``max_tokens``, ``stream``; a JSON completion, or server-sent events of
  completion chunks ending with ``data: [DONE]``);
* ``dlm-serve`` run as a subprocess on a free port, waited for on ``GET /health``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``dlm-serve`` (or the scripted model's, ``script``) on a free port; stopped by :meth:`stop`."""

    def __init__(self, *args: str, script: dict | None = None, env: dict[str, str] | None = None,  # type: ignore[type-arg]
                 wait: bool = True, timeout: float = 60) -> None:
        """``timeout``: how long to wait for ``/health`` to say ready (a real-size model loads for a while)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        entry = [str(ROOT / "tests" / "scripted_server.py"), "--serve"] if script is not None else ["-m", "dlm_lsp.http.cli"]
        extra = {"DLM_TEST_SCRIPT": json.dumps(script)} if script is not None else {}
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "--port", str(self.port), *args], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **extra, **(env or {})},
        )
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1].decode()[-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("dlm-serve did not become ready")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode("utf-8", "replace")


class MercuryClient:
    """A Mercury FIM client: ``complete`` returns (text, finish_reason, usage), streamed or not."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def complete(self, prompt: str, suffix: str, *, model: str = "", max_tokens: int = 64,
                 stream: bool = False) -> tuple[str, str, dict[str, Any]]:
        body = {"model": model, "prompt": prompt, "suffix": suffix, "max_tokens": max_tokens, "stream": stream}
        url = self.base_url + "/v1/fim/completions"
        if not stream:
            response = httpx.post(url, json=body, headers=self.headers, timeout=60)
            response.raise_for_status()
            data = response.json()
            choice = data["choices"][0]
            return choice["text"], choice["finish_reason"], data["usage"]
        text, reason, used = "", "", {}
        with httpx.stream("POST", url, json=body, headers=self.headers, timeout=60) as response:
            response.raise_for_status()
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                text += chunk["choices"][0]["text"]
                reason = chunk["choices"][0]["finish_reason"] or reason
                used = chunk.get("usage") or used
        return text, reason, used
