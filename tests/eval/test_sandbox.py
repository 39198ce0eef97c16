"""The dlm-eval sandbox: each escape found in issue 15, tried by a real program, and the refusal to run unsandboxed.

Every escape is tried twice where the tests run as root: from this process, and from a
process of the unprivileged ``nobody`` user (the sandbox must isolate a caller without
any privileges too; the old one gave such a caller no network isolation at all).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from engine.eval import sandbox
from engine.eval.sandbox import Limits, RunResult, run_program

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
NOBODY = 65534

# Loads engine/errors.py and engine/eval/sandbox.py by path (``nobody`` cannot use our virtual environment),
# runs each program given in argv and prints the results as JSON.
CHILD = r"""
import importlib.util, json, sys, types
root, sources, timeout = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
for name in ("engine", "engine.eval"):
    package = types.ModuleType(name)
    package.__path__ = []
    sys.modules[name] = package
def load(name, relative):
    spec = importlib.util.spec_from_file_location(name, root + "/" + relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
load("engine.errors", "engine/errors.py")
box = load("engine.eval.sandbox", "engine/eval/sandbox.py")
results = []
for source in sources:
    r = box.run_program(source, box.Limits(timeout_s=timeout))
    results.append({"passed": r.passed, "status": r.status, "detail": r.detail})
print(json.dumps(results))
"""


def _reachable_by_anyone(path: str, mode: int = 0o001) -> bool:
    """True if anyone may use ``path`` (``mode``: 0o001 to run it, 0o004 to read it) and reach it."""
    real = Path(os.path.realpath(path))
    try:
        return bool(real.stat().st_mode & mode) and all(p.stat().st_mode & 0o001 for p in real.parents)
    except OSError:
        return False


def _python_for_nobody() -> str | None:
    for candidate in (getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3"):
        if os.path.exists(candidate) and _reachable_by_anyone(candidate):
            return candidate
    return None


def _shared_dir(owner: int | None = None, mode: int = 0o755) -> Path:
    """A fresh folder under /tmp that the ``nobody`` user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dlm-eval-test-", dir="/tmp"))
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


class Caller:
    """Who calls ``run_program``: this process, or (when the tests run as root) a process of ``nobody``."""

    def __init__(self, kind: str, home: Path) -> None:
        self.kind = kind
        self.home = home
        """A folder that plays the caller's $HOME."""
        self.python = _python_for_nobody() if kind == "unprivileged" else None

    def run(self, source: str, timeout: float = 5.0) -> RunResult:
        if self.kind == "this process":
            return run_program(source, Limits(timeout_s=timeout))
        proc = subprocess.run(
            [str(self.python), "-I", "-S", "-c", CHILD, str(ROOT), json.dumps([source]), str(timeout)],
            user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", capture_output=True, text=True, timeout=60,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)},
        )
        assert proc.returncode == 0, f"the unprivileged caller died ({proc.returncode}): {proc.stderr[-2000:]}"
        return RunResult(**json.loads(proc.stdout.splitlines()[-1])[0])


@pytest.fixture(params=["this process", "unprivileged"])
def caller(request: pytest.FixtureRequest, sandbox_available: None) -> Iterator[Caller]:
    if request.param == "this process":
        yield Caller("this process", Path.home())
        return
    if not IS_ROOT:
        pytest.skip("the tests already run as an unprivileged user")
    if _python_for_nobody() is None or not _reachable_by_anyone(str(ROOT / "engine" / "eval" / "sandbox.py"), 0o004):
        pytest.skip("no Python (or no checkout) the nobody user can reach")
    home = _shared_dir(owner=NOBODY, mode=0o700)
    yield Caller("unprivileged", home)
    shutil.rmtree(home, ignore_errors=True)


def _processes_with(token: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def token() -> Iterator[str]:
    """A unique word; processes an escape leaves behind carry it in their command line (and are killed after)."""
    value = f"dlm-eval-escape-{uuid.uuid4().hex}"
    yield value
    for pid in _processes_with(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- network ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", ["_socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)", "socket.socket()"])
def test_a_listener_on_loopback_is_unreachable(caller: Caller, make: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        source = (
            "import _socket, socket, sys\n"
            "try:\n"
            f"    s = {make}\n"
            "    s.settimeout(2)\n"
            f"    s.connect(('127.0.0.1', {port}))\n"
            "except OSError as exc:\n"
            "    sys.exit(f'no connection: {exc}')\n"
            "print('connected')\n"
        )
        result = caller.run(source)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert not result.passed and "no connection" in result.detail, result


# --- files --------------------------------------------------------------------------------------------


def test_nothing_outside_the_run_is_writable(caller: Caller) -> None:
    open_to_all = _shared_dir(mode=0o777)
    targets = [caller.home / f"dlm-eval-marker-{uuid.uuid4().hex}", open_to_all / "marker"]
    source = "import sys\nlanded = []\n"
    for target in targets:
        source += f"try:\n    open({str(target)!r}, 'w').write('escaped')\n    landed.append(1)\nexcept OSError:\n    pass\n"
    source += "sys.exit(1 if landed else 0)\n"
    try:
        result = caller.run(source)
        assert [t for t in targets if t.exists()] == []
        assert result.passed
    finally:
        for target in targets:
            target.unlink(missing_ok=True)
        open_to_all.rmdir()


@pytest.mark.usefixtures("sandbox_available")
def test_each_run_gets_a_fresh_working_folder() -> None:
    first = run_program("open('left-behind', 'w').write('x')\n", Limits(timeout_s=5))
    second = run_program("import os, sys\nsys.exit(1 if os.path.exists('left-behind') else 0)\n", Limits(timeout_s=5))
    assert first.passed and second.passed, (first, second)


@pytest.mark.usefixtures("sandbox_available")
def test_the_output_file_swapped_for_a_fifo_does_not_hang() -> None:
    source = "import os\ntry:\n    os.unlink('output.txt')\nexcept OSError:\n    pass\nos.mkfifo('output.txt')\nprint('swapped')\n"
    outcome: list[RunResult] = []
    worker = threading.Thread(target=lambda: outcome.append(run_program(source, Limits(timeout_s=3))), daemon=True)
    worker.start()
    worker.join(15)
    assert not worker.is_alive(), "run_program hung on a FIFO"
    assert outcome[0].passed


# --- processes ----------------------------------------------------------------------------------------

SLEEPER = "[sys.executable, '-c', 'import time; time.sleep(30)', {token!r}]"
ESCAPES = {
    "posix.fork": (
        "import posix, sys\n"
        "pid = posix.fork()\n"
        "if pid == 0:\n"
        "    posix.setsid()\n"
        "    if posix.fork() == 0:\n"
        "        posix.execv(sys.executable, " + SLEEPER + ")\n"
        "    posix._exit(0)\n"
        "posix.waitpid(pid, 0)\n"
    ),
    "posix_spawnp": "import posix, sys\nposix.posix_spawnp(sys.executable, " + SLEEPER + ", {{}}, setsid=True)\n",
    "ctypes fork": (
        "import ctypes, posix, sys\n"
        "if ctypes.CDLL(None).fork() == 0:\n"
        "    posix.setsid()\n"
        "    posix.execv(sys.executable, " + SLEEPER + ")\n"
    ),
}


@pytest.mark.parametrize("how", list(ESCAPES))
def test_no_process_outlives_the_run(caller: Caller, token: str, how: str) -> None:
    started = time.monotonic()
    result = caller.run(ESCAPES[how].format(token=token) + "import time\ntime.sleep(0.3)\n")
    elapsed = time.monotonic() - started
    assert result.passed, result
    assert _processes_with(token) == []
    time.sleep(0.3)
    assert _processes_with(token) == [], f"a process started with {how} outlived its run"
    assert elapsed < 4, "the run waited for the process it left behind"


def test_kill_minus_one_reaches_nothing_outside(caller: Caller) -> None:
    # A process of the user the old sandbox ran programs as (nobody when root), outside the run.
    sleeper = subprocess.Popen(["sleep", "30"], **({"user": NOBODY, "group": NOBODY, "extra_groups": []} if IS_ROOT else {}))
    try:
        result = caller.run("import posix\ntry:\n    posix.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n")
        time.sleep(0.2)
        assert sleeper.poll() is None, "kill(-1) in the program killed a process outside its run"
        assert result.status in ("passed", "killed"), result
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_left_behind_killer_cannot_fail_later_runs(caller: Caller, token: str) -> None:
    killer = (
        "import posix, signal, sys, time\n"
        "if posix.fork() == 0:\n"
        "    posix.setsid()\n"
        "    if posix.fork() == 0:\n"
        "        posix.execv(sys.executable, [sys.executable, '-c', "
        "'import posix, time\\nfor _ in range(300):\\n    try:\\n        posix.kill(-1, 9)\\n    except OSError:\\n        pass\\n"
        f"    time.sleep(0.01)\\n', {token!r}])\n"
        "    posix._exit(0)\n"
        "time.sleep(0.2)\n"
    )
    caller.run(killer)
    later = [caller.run("import time\ntime.sleep(0.3)\n") for _ in range(2)]
    assert [r.status for r in later] == ["passed", "passed"]


@pytest.mark.usefixtures("sandbox_available")
def test_a_fork_bomb_is_contained() -> None:
    started = time.monotonic()
    result = run_program("import os\nwhile True:\n    os.fork()\n", Limits(timeout_s=3))
    assert not result.passed
    assert time.monotonic() - started < 6


@pytest.mark.usefixtures("sandbox_available")
def test_output_is_captured_and_capped() -> None:
    failing = run_program("print('the answer was 41')\nraise SystemExit(1)\n", Limits(timeout_s=5))
    assert failing.status == "failed" and "the answer was 41" in failing.detail
    started = time.monotonic()
    flood = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", Limits(timeout_s=5, output_bytes=1 << 16))
    assert flood.status == "killed" and "output" in flood.detail
    assert time.monotonic() - started < 4


@pytest.mark.usefixtures("sandbox_available")
@pytest.mark.parametrize("sandboxed", [True, False])
def test_many_writers_that_never_stop_are_cut_off(sandboxed: bool) -> None:
    # Several processes keep the pipe full: reading must still stop at the limit and the deadline.
    source = "import os, sys\nfor _ in range(3):\n    os.fork()\nwhile True:\n    os.write(1, b'x' * 65536)\n"
    started = time.monotonic()
    result = run_program(source, Limits(timeout_s=3, output_bytes=1 << 22), sandbox=sandboxed)
    assert result.status == "killed" and "output" in result.detail, result
    assert time.monotonic() - started < 6


# --- failing closed -----------------------------------------------------------------------------------


def _fake_bwrap(version: str, stderr: str) -> Path:
    folder = _shared_dir()
    fake = folder / "bwrap"
    fake.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then echo "bubblewrap {version}"; exit 0; fi\necho "{stderr}" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    return fake


def test_refuses_to_run_without_bubblewrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(sandbox.SandboxUnavailableError, match=r"bubblewrap.*apt install bubblewrap.*--no-sandbox"):
        run_program("pass\n", bwrap=str(tmp_path / "no-such-bwrap"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(sandbox.SandboxUnavailableError, match="not on PATH"):
        run_program("pass\n")


def test_refuses_to_run_when_namespaces_are_unavailable() -> None:
    message = "bwrap: No permissions to creating new namespace, likely because the kernel does not allow non-privileged user namespaces."
    fake = _fake_bwrap("0.8.0", message)
    try:
        with pytest.raises(sandbox.SandboxUnavailableError, match="No permissions to creating new namespace"):
            run_program("pass\n", bwrap=str(fake))
    finally:
        shutil.rmtree(fake.parent, ignore_errors=True)


def test_refuses_an_old_bubblewrap() -> None:
    fake = _fake_bwrap("0.4.1", "unused")
    try:
        with pytest.raises(sandbox.SandboxUnavailableError, match=r"0\.4\.1"):
            run_program("pass\n", bwrap=str(fake))
    finally:
        shutil.rmtree(fake.parent, ignore_errors=True)


def test_dlm_eval_stops_before_loading_a_model_without_a_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.eval import harness

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({
        "task_id": "t/0", "prompt": "def f():\n", "suffix": "\n", "canonical_solution": "    return 1\n",
        "test": "def check(f):\n    assert f() == 1\n", "entry_point": "f",
    }) + "\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert harness.main(["--model", str(tmp_path / "no-model"), "--problems", str(problems)]) == 2
    err = capsys.readouterr().err
    assert "bubblewrap" in err and "--no-sandbox" in err


def test_no_sandbox_runs_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sandbox, "_warned_unsandboxed", False)  # the warning comes once per process
    caplog.set_level("WARNING", logger="engine.eval.sandbox")
    assert run_program("print('hi')\n", Limits(timeout_s=5), sandbox=False).passed
    assert not run_program("raise SystemExit(3)\n", Limits(timeout_s=5), sandbox=False).passed
    assert "WITHOUT a sandbox" in caplog.text


@pytest.mark.usefixtures("sandbox_available")
def test_sandbox_overhead_is_small() -> None:
    run_program("pass\n")  # the one-time check
    started = time.monotonic()
    for _ in range(3):
        assert run_program("pass\n").passed
    assert (time.monotonic() - started) / 3 < 1.0

