"""Run untrusted generated code: a bubblewrap sandbox with time, memory, output and process limits.

dlm-eval executes programs a model wrote. Each runs under bubblewrap (``bwrap``),
the sandbox Flatpak uses, never by hand-made namespace calls:

* new user, PID, network, IPC, UTS and cgroup namespaces: no network (only the
  run's own loopback), no process outside the run to see or signal, no further
  user namespaces, no capabilities;
* a file system of read-only system folders (``/usr``, the interpreter's
  installation) and one fresh, size-limited tmpfs that is the working folder,
  ``$HOME`` and ``/tmp``: nothing of the host is writable, nothing of a run is
  left for the next;
* limits set inside the sandbox before the program starts, which it cannot raise:
  CPU time, address space, file size, open files, and processes (counted per run,
  since the user namespace is the run's own);
* output comes back through a pipe, capped and read against the deadline: the
  harness reads no file the program could replace;
* when the program exits or the deadline passes, bwrap is killed, which kills the
  first process of the run's PID namespace and with it every other one; the call
  returns only once they are gone.

When dlm-eval runs as root, bwrap runs as ``nobody`` (uid 65534): the kernel
does not apply process-count limits to root, even inside a user namespace. The
interpreter must then be one ``nobody`` can run (a system ``python3`` will do).

No bwrap, a bwrap older than 0.8, or a kernel that refuses the namespaces:
:class:`SandboxUnavailableError`, never an unsandboxed run. ``sandbox=False`` runs
without any isolation, only on request, with a warning. A program that cannot be
run counts as a failed test; the harness carries on.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError

log = logging.getLogger(__name__)

BWRAP_MIN_VERSION = (0, 8, 0)  # --disable-userns, --size
NOBODY = 65534
WORKDIR = "/tmp"  # inside the sandbox: the run's tmpfs
PROGRAM = f"{WORKDIR}/program.py"
SANDBOX_ENV = {"HOME": WORKDIR, "TMPDIR": WORKDIR, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
TAIL_BYTES = 2000
INSTALL_HINT = "install it (Debian/Ubuntu: apt install bubblewrap; Fedora: dnf install bubblewrap)"
OPT_OUT_HINT = "or pass --no-sandbox to run the programs without any isolation (unsafe: they get your files, processes and network)"

# Runs first inside the sandbox: lowers the limits (soft and hard, so the program cannot raise them again),
# then runs the program as __main__. argv: CPU s, address space, file size, open files, processes (-1: unchanged), path.
LAUNCHER = """\
import resource, runpy, sys
names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC")
for name, value in zip(names, map(int, sys.argv[1:6])):
    if value >= 0:
        resource.setrlimit(getattr(resource, name), (value, value))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = sys.argv[6:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Run once per bwrap before the first program: proves the sandbox starts and isolates, rather than assuming it.
PROBE = """\
import os, socket
assert os.getpid() < 10, f"not in a new PID namespace (pid {os.getpid()})"
names = [name for _, name in socket.if_nameindex()]
assert names == ["lo"], f"not in a new network namespace (interfaces {names})"
"""


class SandboxUnavailableError(EngineError):
    """Generated code cannot be run in a sandbox here (bwrap missing, too old, or namespaces refused)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 10.0
    """Wall-clock seconds from start to exit; CPU time is limited to this plus one second per process."""
    memory_bytes: int = 1 << 30
    """Address space of each process."""
    output_bytes: int = 1 << 20
    """stdout and stderr together; more ends the run (``killed``)."""
    processes: int = 16
    """Processes of the run at once, the sandbox's own first process and the program included."""
    disk_bytes: int = 64 << 20
    """Size of the run's tmpfs (working folder, ``$HOME``, ``/tmp``), and of ``/dev/shm``; also the largest file."""


@dataclass
class RunResult:
    """Outcome of one sandboxed program."""

    passed: bool
    status: str
    """``passed``, ``failed`` (non-zero exit), ``timeout``, ``killed`` (a signal, or too much output) or ``error``."""
    detail: str = ""


@dataclass(frozen=True)
class _Python:
    executable: str
    prefix: str
    """The installation folder, bound read-only into the sandbox."""


def _reachable_by_anyone(path: str) -> bool:
    """True if every folder on the way to ``path`` and ``path`` itself can be entered (run) by any user."""
    real = Path(os.path.realpath(path))
    try:
        return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])
    except OSError:
        return False


def _pythons() -> list[_Python]:
    ours = _Python(
        os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable), os.path.realpath(sys.base_prefix)
    )
    system = [_Python(os.path.realpath(p), "/usr") for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)]
    return [ours, *system]


def _interpreter() -> _Python:
    """The Python programs run with: ours, or as root the first one ``nobody`` can run (programs need only the stdlib)."""
    candidates = _pythons()
    if os.geteuid() != 0:
        return candidates[0]
    for candidate in candidates:
        if _reachable_by_anyone(candidate.executable) and _reachable_by_anyone(candidate.prefix):
            return candidate
    tried = ", ".join(c.executable for c in candidates)
    raise SandboxUnavailableError(
        f"running as root, dlm-eval runs generated programs as the unprivileged user nobody (uid {NOBODY}), "
        f"which cannot run any Python here (tried {tried}): install a system Python (apt install python3-minimal), "
        f"run dlm-eval as a normal user, {OPT_OUT_HINT}"
    )


def _find_bwrap(bwrap: str | None) -> str:
    lead = "dlm-eval runs generated code in a bubblewrap sandbox"
    if bwrap is None:
        found = shutil.which("bwrap")
        if found is None:
            raise SandboxUnavailableError(f"{lead}, and bwrap is not on PATH: {INSTALL_HINT}, {OPT_OUT_HINT}")
        return found
    if not (os.path.isfile(bwrap) and os.access(bwrap, os.X_OK)):
        raise SandboxUnavailableError(f"{lead}, and {bwrap} is not an executable bubblewrap: {INSTALL_HINT}, {OPT_OUT_HINT}")
    return bwrap


def _bwrap_version(bwrap: str) -> tuple[int, ...]:
    try:
        proc = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailableError(f"cannot run {bwrap} --version: {exc}; {OPT_OUT_HINT}") from exc
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", proc.stdout)
    if proc.returncode != 0 or found is None:
        raise SandboxUnavailableError(f"{bwrap} --version did not name a bubblewrap version ({proc.stdout.strip()!r}); {OPT_OUT_HINT}")
    version = tuple(int(v or 0) for v in found.groups())
    if version < BWRAP_MIN_VERSION:
        raise SandboxUnavailableError(
            f"dlm-eval needs bubblewrap {'.'.join(map(str, BWRAP_MIN_VERSION))} or newer (for --disable-userns and "
            f"--size); {bwrap} is {'.'.join(map(str, version))}: {INSTALL_HINT} from a newer release, {OPT_OUT_HINT}"
        )
    return version


_checked: dict[str, _Python] = {}


def check_sandbox(bwrap: str | None = None) -> str:
    """Make sure programs can run sandboxed here, or raise :class:`SandboxUnavailableError` saying what is missing.

    ``bwrap`` is the bubblewrap executable (default: ``bwrap`` on ``PATH``). The
    first call per executable runs a probe that checks the PID and network
    namespaces from inside; later calls are free. Returns the executable's path.
    """
    path = _find_bwrap(bwrap)
    if path in _checked:
        return path
    _bwrap_version(path)
    python = _interpreter()
    result = _run_sandboxed(PROBE, Limits(timeout_s=30), path, python)
    if not result.passed:
        raise SandboxUnavailableError(
            f"bubblewrap ({path}) cannot isolate programs here ({result.status}: {result.detail.strip()[-500:]}). "
            "Unprivileged user namespaces may be off (sysctl user.max_user_namespaces, "
            f"kernel.apparmor_restrict_unprivileged_userns, or a container without them); {OPT_OUT_HINT}"
        )
    _checked[path] = python
    return path


_warned_unsandboxed = False


def run_program(source: str, limits: Limits = Limits(), *, sandbox: bool = True, bwrap: str | None = None) -> RunResult:
    """Run ``source`` in the sandbox; passed means exit status 0 within the limits.

    Raises :class:`SandboxUnavailableError` when the sandbox cannot be used, rather
    than running the program without it. ``sandbox=False`` runs it without
    isolation (a plain child process with the same limits but the process count,
    in a fresh temporary folder) and logs a warning once. ``bwrap`` names the
    bubblewrap executable (default: ``bwrap`` on ``PATH``).
    """
    if not sandbox:
        global _warned_unsandboxed
        if not _warned_unsandboxed:
            log.warning("running generated programs WITHOUT a sandbox: they can use your files, processes and network")
            _warned_unsandboxed = True
        return _run_unsandboxed(source, limits)
    path = check_sandbox(bwrap)
    return _run_sandboxed(source, limits, path, _checked[path])


def _limit_args(limits: Limits, processes: int) -> list[str]:
    cpu = int(limits.timeout_s) + 1
    return [str(v) for v in (cpu, limits.memory_bytes, limits.disk_bytes, 64, processes)]


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _bwrap_args(bwrap: str, python: _Python, limits: Limits, program_fd: int, status_fd: int) -> list[str]:
    args = [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY),
        "--hostname", "dlm-eval", "--die-with-parent", "--new-session", "--json-status-fd", str(status_fd),
        "--ro-bind", "/usr", "/usr",
    ]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    extra = [python.prefix] if not _under(python.prefix, "/usr") and python.prefix != "/" else []
    home = os.path.dirname(python.executable)
    if not _under(home, "/usr") and not any(_under(home, p) for p in extra):
        extra.append(home)
    for path in extra:
        args += ["--ro-bind", path, path]
    size = str(limits.disk_bytes)
    args += [
        "--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--size", size, "--tmpfs", WORKDIR, "--file", str(program_fd), PROGRAM, "--remount-ro", "/",
        "--chdir", WORKDIR, "--clearenv",
    ]
    for key, value in SANDBOX_ENV.items():
        args += ["--setenv", key, value]
    return [*args, "--", python.executable, "-I", "-S", "-c", LAUNCHER, *_limit_args(limits, limits.processes), PROGRAM]


def _run_sandboxed(source: str, limits: Limits, bwrap: str, python: _Python) -> RunResult:
    program_fd = os.memfd_create("dlm-eval-program")
    out_r, out_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        with open(program_fd, "wb", closefd=False) as handle:
            handle.write(source.encode("utf-8"))
        os.lseek(program_fd, 0, os.SEEK_SET)
        # As root, bwrap runs as nobody: the kernel exempts root from the process-count limit.
        drop: dict = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
        try:
            proc = subprocess.Popen(
                _bwrap_args(bwrap, python, limits, program_fd, status_w),
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, pass_fds=(program_fd, status_w),
                cwd="/", env={"PATH": SANDBOX_ENV["PATH"]}, **drop,
            )
        except OSError as exc:
            return RunResult(False, "error", f"cannot start {bwrap}: {exc}")
        finally:
            for fd in (out_w, status_w, program_fd):
                os.close(fd)
            out_w = status_w = program_fd = -1
        return _supervise(proc, out_r, status_r, limits)
    finally:
        for fd in (program_fd, out_r, out_w, status_r, status_w):
            if fd >= 0:
                os.close(fd)


def _run_unsandboxed(source: str, limits: Limits) -> RunResult:
    python = _pythons()[0]
    out_r, out_w = os.pipe()
    try:
        with tempfile.TemporaryDirectory(prefix="dlm-eval-") as workdir:
            program = Path(workdir) / "program.py"
            program.write_text(source, encoding="utf-8")
            try:
                proc = subprocess.Popen(
                    # No process count: outside a user namespace it would count every process of the user.
                    [python.executable, "-I", "-S", "-c", LAUNCHER, *_limit_args(limits, -1), str(program)],
                    cwd=workdir, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, start_new_session=True,
                    env={**SANDBOX_ENV, "HOME": workdir, "TMPDIR": workdir},
                )
            except OSError as exc:
                return RunResult(False, "error", f"cannot start {python.executable}: {exc}")
            finally:
                os.close(out_w)
                out_w = -1
            return _supervise(proc, out_r, None, limits)
    finally:
        for fd in (out_r, out_w):
            if fd >= 0:
                os.close(fd)


def _supervise(proc: subprocess.Popen, out_fd: int, status_fd: int | None, limits: Limits) -> RunResult:
    """Read output (capped) and bwrap's status until exit or deadline; then make sure every process of the run is dead."""
    deadline = time.monotonic() + limits.timeout_s
    output = bytearray()
    status = b""
    init_fd = -1
    exited_fd = os.pidfd_open(proc.pid)
    selector = selectors.DefaultSelector()
    for fd in (out_fd, status_fd):
        if fd is not None:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
    selector.register(exited_fd, selectors.EVENT_READ)
    outcome = ""
    try:
        while not outcome:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome = "timeout"
                break
            for key, _ in selector.select(remaining):
                if key.fd == exited_fd:
                    outcome = "exited"
                elif key.fd == out_fd:
                    chunk = _read(out_fd)
                    if chunk is None:
                        selector.unregister(out_fd)
                    else:
                        output += chunk
                        if len(output) > limits.output_bytes:
                            outcome = "flood"
                else:
                    chunk = _read(key.fd)
                    if chunk is None:
                        selector.unregister(key.fd)
                    else:
                        status += chunk
                        if init_fd < 0:
                            init_fd = _open_init(status)
        if status_fd is not None:
            proc.kill()  # bwrap: its first process in the namespace dies with it (--die-with-parent), and every other one then
        else:
            _kill_group(proc.pid)
        proc.wait()
        if status_fd is not None:
            status += _drain(status_fd, 1 << 16)
            if init_fd < 0:
                init_fd = _open_init(status)
            if init_fd >= 0:
                _wait_readable(init_fd, 10.0)
        if len(output) <= limits.output_bytes:
            output += _drain(out_fd, limits.output_bytes + 1 - len(output))
    finally:
        selector.close()
        os.close(exited_fd)
        if init_fd >= 0:
            os.close(init_fd)
    tail = bytes(output[-TAIL_BYTES:]).decode("utf-8", "replace")
    if outcome == "timeout":
        return RunResult(False, "timeout", f"over {limits.timeout_s:g} s")
    if outcome == "flood" or len(output) > limits.output_bytes:
        return RunResult(False, "killed", f"output over {limits.output_bytes} bytes")
    if status_fd is not None and b'"child-pid"' not in status:
        return RunResult(False, "error", f"the sandbox did not start: {tail.strip()[-500:]}")
    code = proc.returncode
    if code == 0:
        return RunResult(True, "passed")
    if code < 0:
        signum = -code
    elif status_fd is not None and code > 128:  # bwrap reports a program killed by signal N as 128 + N
        signum = code - 128
    else:
        signum = 0
    if signum in signal.valid_signals():
        return RunResult(False, "killed", f"signal {signum}: {tail[-300:]}")
    return RunResult(False, "failed", tail[-300:])


def _read(fd: int) -> bytes | None:
    """One read of a non-blocking pipe: what it holds (b"" if nothing yet), or None at its end.

    One read, not a loop to the end: writers that never stop must not keep the caller from its deadline.
    """
    try:
        return os.read(fd, 1 << 16) or None
    except BlockingIOError:
        return b""


def _drain(fd: int, limit: int) -> bytes:
    """What a non-blocking pipe holds, up to ``limit`` bytes."""
    data = bytearray()
    while len(data) < limit:
        chunk = _read(fd)
        if not chunk:
            break
        data += chunk
    return bytes(data[:limit])


def _open_init(status: bytes) -> int:
    """A pidfd of the run's first process (PID 1 of its namespace) once bwrap has reported it, else -1."""
    found = re.search(rb'"child-pid"\s*:\s*(\d+)', status)
    if found is None:
        return -1
    pid = int(found.group(1))
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return -1  # already gone, and the whole namespace with it
    try:
        nspid = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
    except (OSError, IndexError):
        nspid = []
    if nspid[-1:] != ["1"]:  # the pid was reused by something else: nothing of ours to wait for
        os.close(fd)
        return -1
    return fd


def _wait_readable(fd: int, timeout_s: float) -> None:
    with selectors.DefaultSelector() as waiter:
        waiter.register(fd, selectors.EVENT_READ)
        if not waiter.select(timeout_s):
            log.warning("processes of a sandboxed run were still alive %g s after it ended", timeout_s)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
