"""scripts/gpu-check.sh, rehearsed without a GPU: the steps it can run here run, and its report is written.

GPU time is scarce: the script has one chance on a lent machine, so every part of it that does not need
the GPU (checkpoint, conversion, loads, the benchmark, the report) is run here on the CPU backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_rehearses_on_the_cpu_and_reports(tmp_path: Path):
    pytest.importorskip("torch")
    out = tmp_path / "rehearsal"
    env = {**os.environ, "INSTALL": "0", "SHAPES": "tiny", "ENGINES": "0", "SERVE_CLIENTS": "1 2", "SERVE_SECONDS": "1", "LOAD_BACKENDS": "cpu", "BACKENDS": "cpu", "GPU_TESTS": "0",
           "CONTEXTS": "256", "OUT": str(out), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["versions", "checkpoint-tiny", "convert-tiny", "load-build-cpu-tiny",
                                                    "load-cached-cpu-tiny", "bench-cpu-tiny", "serve-load-tiny"]
    assert all(s["rc"] == 0 for s in report["steps"])
    assert report["versions"]["onnxruntime"] and "CPUExecutionProvider" in report["versions"]["providers"]
    assert report["loads"]["load-build-cpu-tiny"]["backend"] == "cpu"
    assert report["bench"]["bench-cpu-tiny"]  # the benchmark's summary rows
    levels = report["serve_load"]["serve-load-tiny"]["max_batch_rows=64"]
    assert [r["clients"] for r in levels] == [1, 2] and all(r["requests"] > 0 for r in levels)
    assert "Failed steps: none." in (out / "report.md").read_text()


def test_the_report_reads_the_build_record_after_the_builds_progress(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_report
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    record = {"dtype": "fp16", "device": {"gpu": "NVIDIA H200"},
              "graphs": {"context": {"engine": "context.engine", "bytes": 2_000_000, "build_s": 41.5}}}
    log = tmp_path / "engine-x.log"
    log.write_text("dlm-convert: checking fp16 on the CPU\ndlm-convert: {not json}\n" + json.dumps(record, indent=2) + "\n")
    assert gpu_report._build_record(log) == record
    log.write_text("dlm-convert: error: the tensorrt backend needs TensorRT's Python package\n")
    assert gpu_report._build_record(log) is None
