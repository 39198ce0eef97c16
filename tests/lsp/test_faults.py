"""Faults while the server runs: a clear message, the server stays up, and it recovers once the cause
is fixed (a settings change or ``dlm.reloadModel``), without restarting the editor.

Each test runs the real server on a copy of the shipped model and breaks that copy
the way a disk, a user or a bad install would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from raw_lsp import ROOT, StdioServer

from dlm_lsp.completion import CompletionService
from dlm_lsp.settings import Settings
from dlm_lsp.status import Metrics
from engine import Engine, default_model_path

URI = "file:///w/faults.py"
TEXT = "def add(a, b):\n    return "


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    return folder


def start(model: Path, **extra: object) -> StdioServer:
    server = StdioServer()
    assert "result" in server.initialize({"model": str(model), "backend": "cpu", "debounceMs": 0, "minConfidence": 0, **extra})
    return server


def reload(server: StdioServer) -> dict:  # type: ignore[type-arg]
    """``dlm.reloadModel``, then the status once the load ended."""
    assert "result" in server.request("reload", "workspace/executeCommand", {"command": "dlm.reloadModel"})
    return server.wait_ready()


def shown(server: StdioServer, words: str) -> str:
    """The ``window/showMessage`` text holding ``words`` (waits for it: it may follow the status)."""
    message = server.wait_for(lambda m: isinstance(m, dict) and m.get("method") == "window/showMessage"
                              and words in m["params"]["message"], timeout=15)
    return message["params"]["message"]


def completes(server: StdioServer, msg_id: str) -> bool:
    reply = server.complete(msg_id, URI, 1, 11)
    assert "result" in reply, reply
    return True


def test_the_model_folder_deleted_while_running(model: Path, tmp_path: Path):
    server = start(model)
    try:
        assert server.wait_ready()["state"] == "ready"
        server.open(URI, TEXT)
        backup = tmp_path / "backup"
        shutil.move(model, backup)
        assert completes(server, "c1")  # the loaded model keeps serving
        status = reload(server)
        assert status["state"] == "error" and "model" in status["error"].lower()
        assert shown(server, "failed to load")
        assert server.complete("c2", URI, 1, 11)["result"]["items"] == []  # no model: nothing, no error
        shutil.move(backup, model)
        assert reload(server)["state"] == "ready"
        assert completes(server, "c3")
    finally:
        server.stop()


@pytest.mark.parametrize("damage", ["truncated graph", "changed byte", "missing tokenizer"])
def test_a_damaged_folder_is_reported_and_a_settings_change_recovers(model: Path, tmp_path: Path, damage: str):
    pristine = tmp_path / "pristine"
    shutil.copytree(model, pristine)
    if damage == "truncated graph":
        graph = model / "span_step.onnx"
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif damage == "changed byte":
        data = bytearray((model / "tokenizer.json").read_bytes())
        data[100] ^= 1
        (model / "tokenizer.json").write_bytes(bytes(data))
    else:
        (model / "tokenizer.json").unlink()
    server = start(model)
    try:
        status = server.wait_ready()
        assert status["state"] == "error", status
        assert "failed verification" in status["error"], status["error"]
        assert server.alive()
        shutil.rmtree(model)
        shutil.copytree(pristine, model)
        server.notify("workspace/didChangeConfiguration",
                      {"settings": {"dlm": {"model": str(model), "backend": "cpu", "debounceMs": 0, "latencyBudgetMs": 200}}})
        assert server.wait_ready()["state"] == "ready"
        server.open(URI, TEXT)
        assert completes(server, "after-fix")
    finally:
        server.stop()


def test_a_backend_that_cannot_start_is_named_and_switching_back_recovers(model: Path):
    server = start(model, backend="tensorrt")
    try:
        status = server.wait_ready()
        assert status["state"] == "error"
        assert any(word in status["error"].lower() for word in ("tensorrt", "cuda", "gpu"))
        server.notify("workspace/didChangeConfiguration", {"settings": {"dlm": {"model": str(model), "backend": "cpu"}}})
        assert server.wait_ready()["state"] == "ready"
    finally:
        server.stop()


def test_an_exception_inside_the_engine_mid_request_is_a_clear_error_and_the_next_request_works():
    script = json.dumps({"text": "a + b\n", "p": 0.95, "failures": 1})
    server = StdioServer(script=str(ROOT / "tests" / "scripted_server.py"), env={"DLM_TEST_SCRIPT": script})
    try:
        server.initialize({"backend": "cpu", "debounceMs": 0, "minConfidence": 0, "tokenHealing": False})
        assert server.wait_ready()["state"] == "ready"
        server.open(URI, TEXT)
        failed = server.complete("boom", URI, 1, 11)
        assert failed["error"]["code"] == -32803
        assert "injected failure inside the model" in failed["error"]["message"] and "data" not in failed["error"]  # no traceback
        assert "injected failure" in shown(server, "completion failed")
        assert server.complete("fine", URI, 1, 11)["result"]["items"][0]["insertText"].startswith("a + b")
        assert server.status()["errors"] == 1
    finally:
        server.stop()


def test_the_engine_worker_pool_dying_is_replaced():
    engine = Engine.load(default_model_path(), backend="cpu")
    service = CompletionService(Metrics())
    service.executor.shutdown(wait=True)  # as if its threads were gone

    async def run():  # type: ignore[no-untyped-def]
        return await service.complete(engine, URI, TEXT, len(TEXT), "python", Settings(min_confidence=0.0),
                                      version=1, current_version=lambda: 1, automatic=False)

    result = asyncio.run(run())
    assert result.source in ("model", "empty", "gated")
    assert result.engine_stats.get("steps") or result.source != "model"


def test_the_server_works_with_no_network_at_all(model: Path):
    """Run in a network namespace with no interface up: no socket can reach anything."""
    probe = subprocess.run(["unshare", "--user", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no network namespaces here: {probe.stderr.decode().strip()}")
    server = StdioServer(prefix=["unshare", "--user", "--map-root-user", "--net"],
                         env={"HF_HUB_OFFLINE": "0", "NO_PROXY": ""})
    try:
        server.initialize({"model": str(model), "backend": "cpu", "debounceMs": 0, "minConfidence": 0})
        assert server.wait_ready()["state"] == "ready"
        server.open(URI, TEXT)
        assert completes(server, "offline")
        assert "result" in server.request("net", "dlm/status", {})
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert sys.platform.startswith("linux")
