"""Time and peak memory of ``dlm-convert`` at a published shape (random weights), phase by phase.

    python scripts/measure_conversion.py --shape qwen2-0.5b --precision int8 --out /tmp/conv

Writes a random-weight checkpoint at the shape (``python -m engine.tiny --shape``),
runs ``dlm-convert`` on it as a child process, samples the child's resident
memory (``/proc/PID/status``) every 0.2 s, and reports, for each progress line
the converter prints, how long the phase took and its peak RSS (all of it, and
the anonymous part: the rest is mapped files whose pages the kernel can drop);
then the converter's own peak (``ru_maxrss``) and the engine folder's size. Linux
only. A JSON report goes to ``OUT/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from storm import rss_kb  # noqa: E402

CONVERT = "import sys; from engine.cli import convert_main; sys.exit(convert_main(sys.argv[1:]))"


def _rss_kib(pid: int) -> tuple[int, int]:
    """Resident memory of ``pid`` in KiB: all of it (VmRSS), and the anonymous part (RssAnon); zeros once it is gone.

    The rest is mapped files (the checkpoint, the engine folder's weights) whose pages
    the kernel drops under memory pressure; the anonymous part is what must fit.
    """
    try:
        return rss_kb(pid), rss_kb(pid, "RssAnon")
    except OSError:
        return 0, 0


COUNTER = re.compile(r": \d+/\d+ weights$")
"""The count ending a progress line within a phase (``quantising to int8: 29/291 weights``): its first starts the phase."""


def main(argv: list[str] | None = None) -> int:
    """Measure one conversion; print a table and write ``report.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0.5b")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="of the checkpoint written")
    parser.add_argument("--out", type=Path, required=True, help="working folder (checkpoint, engine folder, report)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt, engine = args.out / "checkpoint", args.out / f"engine-{args.precision}"
    if not (ckpt / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "engine.tiny", str(ckpt), "--shape", args.shape, "--dtype", args.dtype],
            check=True, stdout=subprocess.DEVNULL,  # stdout is the report's
        )
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", CONVERT, str(ckpt), str(engine), "--precision", args.precision, "--force"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    phases: list[dict[str, object]] = []
    current: dict[str, Any] = {"phase": "start", "t0": started, "rss": 0, "anon": 0}
    lock = threading.Lock()
    reaped = threading.Event()  # the main thread alone reaps the child (os.wait4), then stops the sampler

    def sample() -> None:
        while not reaped.wait(0.2):
            rss, anon = _rss_kib(child.pid)
            with lock:
                current["rss"], current["anon"] = max(current["rss"], rss), max(current["anon"], anon)

    def close_phase(now: float) -> None:
        phases.append({
            "phase": current["phase"], "seconds": round(now - current["t0"], 1),
            "peak_rss_gb": round(current["rss"] / 2**20, 2), "peak_anon_gb": round(current["anon"] / 2**20, 2),
        })

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stderr is not None
    for line in child.stderr:
        sys.stderr.write(line)
        if not line.startswith("dlm-convert: "):
            continue
        phase = COUNTER.sub("", line.removeprefix("dlm-convert: ").strip())
        if phase == current["phase"]:
            continue  # a count within the phase
        now = time.monotonic()
        with lock:
            close_phase(now)
            current.update(phase=phase, t0=now, rss=0, anon=0)
    _, status, usage = os.wait4(child.pid, 0)  # the converter's own peak, not the checkpoint writer's
    code = child.returncode = os.waitstatus_to_exitcode(status)
    reaped.set()
    sampler.join()
    close_phase(time.monotonic())
    total = time.monotonic() - started
    size = sum(p.stat().st_size for p in engine.rglob("*") if p.is_file()) if engine.is_dir() else 0
    report = {
        "shape": args.shape,
        "checkpoint_dtype": args.dtype,
        "precision": args.precision,
        "exit_code": code,
        "seconds": round(total, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "peak_anon_gb": max(float(p["peak_anon_gb"]) for p in phases),  # type: ignore[arg-type]
        "engine_folder_gb": round(size / 1e9, 2),
        "phases": phases[1:],
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
