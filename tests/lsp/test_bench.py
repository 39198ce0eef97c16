"""``dlm-bench`` end to end: the engine level on a tiny engine, the LSP level on the real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlm_lsp.bench import _position, main

PROBLEMS = [
    {"task_id": "t/0", "prompt": "def add(a, b):\n    return ", "suffix": "\n", "canonical_solution": "a + b\n"},
    {"task_id": "t/1", "prompt": "def name(self):\n", "suffix": "\n\nx = 1\n", "canonical_solution": "    n = self.n\n    return n\n"},
    {"task_id": "t/2", "prompt": "# é ünïcode\nvalue = ", "suffix": "\n", "canonical_solution": "compute()\n"},
]


@pytest.fixture()
def problems_file(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


def test_position_counts_utf16_code_units():
    assert _position("ab\ncd") == (1, 2)
    assert _position("x = '😀'") == (0, 8)  # 7 characters; the emoji is two UTF-16 code units
    assert _position("") == (0, 0)


def test_lsp_level_drives_the_real_server(problems_file: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert main(["--problems", str(problems_file), "--level", "lsp", "--backend", "cpu", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench.json").read_text())
    lsp = report["lsp"]
    assert [r["item"] for r in lsp["rows"]] == ["t/0", "t/2", "t/1"]  # single-line items first, then multi
    assert all(r["latency_ms"] > 0 for r in lsp["rows"])
    assert lsp["cold_start_ms"] > lsp["server_load_ms"] > 0
    assert 0 < lsp["server"]["peak_rss_mb"] < 4096
    assert lsp["server_status"]["requests"] == len(PROBLEMS) + 1  # + the cold-start request
    assert {e["kind"] for e in lsp["summary"]} == {"single", "multi", "all"}
    assert "Cold start" in (out / "bench.md").read_text()


def test_several_lsp_runs_pool_the_requests_and_keep_each_runs_spread(problems_file: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ["--problems", str(problems_file), "--level", "lsp", "--backend", "cpu", "--out", str(out), "--no-progress"]
    assert main([*args, "--lsp-runs", "2"]) == 0
    lsp = json.loads((out / "bench.json").read_text())["lsp"]
    assert sorted((r["run"], r["item"]) for r in lsp["rows"]) == [(n, f"t/{i}") for n in (0, 1) for i in range(3)]
    assert len(lsp["runs"]) == 2 and all(r["p50_ms"] > 0 and r["cold_start_ms"] > 0 for r in lsp["runs"])
    pooled = next(e for e in lsp["summary"] if e["kind"] == "all")
    assert pooled["n"] == 6
    assert min(r["cold_start_ms"] for r in lsp["runs"]) <= lsp["cold_start_ms"] <= max(r["cold_start_ms"] for r in lsp["runs"])
    loads = [r["server_load_ms"] for r in lsp["runs"]]
    assert all(load > 0 for load in loads) and min(loads) <= lsp["server_load_ms"] <= max(loads)
    assert "2 runs, a fresh server each" in (out / "bench.md").read_text()
    assert main([*args, "--lsp-runs", "0"]) == 2


def test_engine_level_writes_json_and_markdown(problems_file: Path, tiny_engine: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ["--model", str(tiny_engine), "--problems", str(problems_file), "--level", "engine", "--contexts", "128,4096"]
    assert main([*args, "--backend", "cpu", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["engine"]["skipped"][0]["context"] == 4096
    assert {e["decoder"] for e in report["engine"]["summary"]} == {"dlm", "reference", "one-per-step"}
    text = (out / "bench.md").read_text()
    assert "| kind | context | decoder |" in text and "Skipped context 4096" in text
    # the decoding flags reach our decoder: three commits a step, one per step for the baselines
    assert main([*args, "--tokens-per-step", "3", "--threshold", "1.0", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "bench.json").read_text())["engine"]["rows"]
    assert any(r["model_tokens"] > r["steps"] for r in rows if r["decoder"] == "dlm")
    assert all(r["model_tokens"] <= r["steps"] for r in rows if r["decoder"] == "one-per-step")


def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--out", str(tmp_path)]) == 2
    assert "give items with --heldout" in capsys.readouterr().err
    assert main(["--problems", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--problems", str(tmp_path / "x"), "--kinds", "triple"]) == 2
