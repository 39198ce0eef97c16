"""Run untrusted generated code: a subprocess with time, memory, output and process limits.

The program runs with ``python -I`` in a fresh temporary directory, in its own
session (the whole process group is killed on timeout), with resource limits on
CPU time, address space, file size (so printing gigabytes ends the process) and
open files. When started as root it first moves into a new network namespace
(no network at all) and drops to the ``nobody`` user, so the process-count limit
applies and the rest of the file system is read-only to it. A prelude also
disables ``fork``/``subprocess``/sockets inside the interpreter. Any failure to
run counts as a failed test; the harness carries on.
"""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
NOBODY = 65534

PRELUDE = """\
import os as _os, socket as _socket, subprocess as _subprocess
def _blocked(*_a, **_k):
    raise PermissionError("blocked in the dlm-eval sandbox")
for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "spawnv", "spawnve", "posix_spawn", "kill", "killpg"):
    if hasattr(_os, _name):
        setattr(_os, _name, _blocked)
_subprocess.Popen = _blocked
_socket.socket = _blocked
_socket.create_connection = _blocked
del _os, _socket, _subprocess, _blocked, _name
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    processes: int = 16


@dataclass
class RunResult:
    """Outcome of one sandboxed program."""

    passed: bool
    status: str
    """``passed``, ``failed`` (non-zero exit), ``timeout``, ``killed`` (a limit) or ``error``."""
    detail: str = ""


def _world_executable(path: str) -> bool:
    """True if every folder on the way to ``path`` and the file itself are executable by anyone."""
    real = Path(os.path.realpath(path))
    try:
        return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])
    except OSError:
        return False


def interpreter() -> tuple[str, bool]:
    """A Python to run programs with, and whether the ``nobody`` user can run it.

    Programs need only the standard library, so when this interpreter lives
    somewhere ``nobody`` cannot reach (a root-owned pyenv, say), a system Python is
    used instead, so that privileges can still be dropped.
    """
    candidates = [getattr(sys, "_base_executable", sys.executable), sys.executable, "/usr/bin/python3"]
    for candidate in candidates:
        if candidate and os.path.exists(candidate) and _world_executable(candidate):
            return candidate, True
    return sys.executable, False


def _limit_child(limits: Limits, workdir: str, drop: bool) -> None:  # runs in the child before exec
    os.setsid()
    cpu = int(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.getuid() == 0 and drop:
        try:
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
        except OSError:
            pass
        os.chown(workdir, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))


def run_program(source: str, limits: Limits = Limits()) -> RunResult:
    """Run ``source`` in the sandbox; passed means exit status 0 within the limits."""
    python, drop = interpreter()
    with tempfile.TemporaryDirectory(prefix="dlm-eval-") as workdir:
        os.chmod(workdir, 0o777)
        program = Path(workdir) / "program.py"
        program.write_text(PRELUDE + source, encoding="utf-8")
        out_path = Path(workdir) / "output.txt"
        with out_path.open("wb") as out:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-S", str(program)],
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"},
                    preexec_fn=lambda: _limit_child(limits, workdir, drop),
                )
            except OSError as exc:
                return RunResult(False, "error", str(exc))
            try:
                code = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return RunResult(False, "timeout", f"over {limits.timeout_s:g} s")
            finally:
                _kill_group(proc)  # strays left by the program's process group
        tail = out_path.read_bytes()[-2000:].decode("utf-8", "replace")
        if code == 0:
            return RunResult(True, "passed")
        if code < 0:
            return RunResult(False, "killed", f"signal {-code}: {tail[-300:]}")
        return RunResult(False, "failed", tail[-300:])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
