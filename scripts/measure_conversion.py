"""Time and peak memory of ``dlm-convert`` at a published shape (random weights), phase by phase.

    python scripts/measure_conversion.py --shape qwen2-0.5b --precision int8 --out /tmp/conv

Writes a random-weight checkpoint at the shape (``python -m engine.tiny --shape``),
runs ``dlm-convert`` on it as a child process, samples the child's resident
memory (``/proc/PID/status``) every 0.2 s, and reports, for each progress line
the converter prints, how long the phase took and its peak RSS; then the whole
run's peak (``ru_maxrss``) and the engine folder's size. Linux only. A JSON
report goes to ``OUT/report.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


CONVERT = "import sys; from engine.cli import convert_main; sys.exit(convert_main(sys.argv[1:]))"


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Measure one conversion; print a table and write ``report.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0.5b")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--out", type=Path, required=True, help="working folder (checkpoint, engine folder, report)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt, engine = args.out / "checkpoint", args.out / f"engine-{args.precision}"
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "engine.tiny", str(ckpt), "--shape", args.shape], check=True)
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", CONVERT, str(ckpt), str(engine), "--precision", args.precision, "--force"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    phases: list[dict[str, object]] = []
    current = {"phase": "start", "t0": started, "peak_kib": 0}
    lock = threading.Lock()

    def sample() -> None:
        while child.poll() is None:
            rss = _rss_kib(child.pid)
            with lock:
                current["peak_kib"] = max(int(current["peak_kib"]), rss)  # type: ignore[call-overload]
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stderr is not None
    for line in child.stderr:
        sys.stderr.write(line)
        if not line.startswith("dlm-convert: "):
            continue
        now = time.monotonic()
        with lock:
            phases.append(
                {"phase": current["phase"], "seconds": round(now - float(current["t0"]), 1),  # type: ignore[arg-type]
                 "peak_rss_gb": round(int(current["peak_kib"]) / 2**20, 2)}  # type: ignore[call-overload]
            )
            current.update(phase=line.removeprefix("dlm-convert: ").strip(), t0=now, peak_kib=0)
    code = child.wait()
    sampler.join()
    phases.append(
        {"phase": current["phase"], "seconds": round(time.monotonic() - float(current["t0"]), 1),  # type: ignore[arg-type]
         "peak_rss_gb": round(int(current["peak_kib"]) / 2**20, 2)}  # type: ignore[call-overload]
    )
    total = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    size = sum(p.stat().st_size for p in engine.rglob("*") if p.is_file()) if engine.is_dir() else 0
    report = {
        "shape": args.shape,
        "precision": args.precision,
        "exit_code": code,
        "seconds": round(total, 1),
        "peak_rss_gb": round(peak, 2),
        "engine_folder_gb": round(size / 1e9, 2),
        "phases": phases[1:],
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
