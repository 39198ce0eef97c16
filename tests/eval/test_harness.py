"""dlm-eval: problem files, exact match, the sandbox, and an end-to-end run on a tiny engine."""

from __future__ import annotations

import gzip
import json

import pytest

from engine.errors import InputError
from engine.eval import harness
from engine.eval.sandbox import Limits, run_program

SHARED = harness.Path(__file__).resolve().parents[2].parent / "shared" / "eval" / "humaneval-infilling"


def write(path, rows):  # type: ignore[no-untyped-def]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


PROBLEM = {
    "task_id": "t/0",
    "prompt": "def add(a, b):\n",
    "suffix": "\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(f):\n    assert f(1, 2) == 3\n",
    "entry_point": "add",
}


def test_load_problems_jsonl_and_gz(tmp_path):
    for name in ("p.jsonl", "p.jsonl.gz"):
        problems = harness.load_problems(write(tmp_path / name, [PROBLEM, PROBLEM]))
        assert len(problems) == 2 and problems[0].entry_point == "add"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({k: v for k, v in PROBLEM.items() if k != "suffix"}, r":2: missing or non-string field\(s\): suffix"),
        ({**PROBLEM, "entry_point": ""}, ":2: has a test but no entry_point"),
        ("{not json", ":2: not valid JSON"),
    ],
)
def test_bad_problem_lines_name_the_line(tmp_path, bad, message):
    with pytest.raises(InputError, match=message):
        harness.load_problems(write(tmp_path / "p.jsonl", [PROBLEM, bad]))


def test_missing_problems_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        harness.load_problems(tmp_path / "none.jsonl")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/eval not present")
def test_standard_sets_load():
    single = harness.load_problems(SHARED / "HumanEval-SingleLineInfilling.jsonl.gz")
    spans = harness.load_problems(SHARED / "HumanEval-RandomSpanInfillingLight.jsonl.gz")
    assert len(single) == 1033 and len(spans) == 164


@pytest.mark.usefixtures("sandbox_available")
def test_canonical_solution_passes_and_wrong_one_fails():
    problem = harness.Problem(**PROBLEM)
    assert run_program(harness.program(problem, problem.canonical_solution)).passed
    assert not run_program(harness.program(problem, "    return a - b\n")).passed


@pytest.mark.parametrize(
    "source, status",
    [
        ("while True:\n    pass\n", "timeout"),
        ("import os\nwhile True:\n    os.fork()\n", "failed"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", "failed"),
        ("x = bytearray(8 << 30)\n", "failed"),
        ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", "failed"),
    ],
    ids=["hang", "fork bomb", "network", "memory", "flood"],
)
@pytest.mark.usefixtures("sandbox_available")
def test_sandbox_contains_bad_programs(source, status):
    result = run_program(source, Limits(timeout_s=2))
    assert not result.passed and result.status in (status, "killed")


def test_exact_match_ignores_trailing_whitespace():
    assert harness.exact_match("    return a + b", "    return a + b\n")
    assert not harness.exact_match("return a + b\n", "    return a + b\n")


@pytest.mark.usefixtures("sandbox_available")
def test_evaluate_end_to_end(tiny_engine, tmp_path):
    from engine import Engine, SamplingParams

    engine = Engine.load(tiny_engine, backend="cpu")
    problems = harness.load_problems(write(tmp_path / "p.jsonl", [PROBLEM, {**PROBLEM, "task_id": "t/1", "test": ""}]))
    report = harness.evaluate(engine, problems, SamplingParams(lengths=(4, 8)), progress=False, timeout_s=5)
    summary = report["summary"]
    assert summary["problems"] == 2
    assert summary["oracle"]["tested"] == 1 and summary["unknown"]["tested"] == 1
    oracle = [r for r in report["results"] if r["mode"] == "oracle"]
    assert all(r["chosen_length"] == len(engine.tokenizer.encode(PROBLEM["canonical_solution"])) for r in oracle)
    assert {r["mode"] for r in report["results"]} == {"oracle", "unknown"}
    for mode in ("oracle", "unknown"):
        rows = [r for r in report["results"] if r["mode"] == mode]
        assert all(0.0 <= r["edit_sim"] <= 1.0 for r in rows)
        assert summary[mode]["edit_sim"] == pytest.approx(sum(r["edit_sim"] for r in rows) / len(rows), abs=1e-4)


def test_cli_decoding_flags_reach_the_sampler(tiny_engine, tmp_path, capsys):
    problems = write(tmp_path / "p.jsonl", [PROBLEM])
    args = ["--model", str(tiny_engine), "--problems", str(problems), "--backend", "cpu", "--no-tests", "--mode", "oracle"]
    assert harness.main([*args, "--threshold", "1.0"]) == 0
    one = json.loads(capsys.readouterr().out)["oracle"]
    assert harness.main([*args, "--threshold", "1.0", "--tokens-per-step", "3", "--order", "left-to-right"]) == 0
    three = json.loads(capsys.readouterr().out)["oracle"]
    assert one["median_tokens_per_step"] == 1.0 and three["median_tokens_per_step"] > 1.0


@pytest.mark.usefixtures("sandbox_available")
def test_a_middle_too_long_for_the_window_is_a_failure_not_a_crash(tiny_engine, tmp_path):
    from engine import Engine, SamplingParams

    engine = Engine.load(tiny_engine, backend="cpu")
    window = engine.info.arch.max_positions
    long_body = "".join(f"    x{i} = {i} * {i}\n" for i in range(window))
    too_long = {**PROBLEM, "task_id": "t/long", "canonical_solution": long_body}
    problems = harness.load_problems(write(tmp_path / "p.jsonl", [too_long, PROBLEM]))
    report = harness.evaluate(engine, problems, SamplingParams(lengths=(4, 8)), progress=False, timeout_s=5)
    oracle = {r["task_id"]: r for r in report["results"] if r["mode"] == "oracle"}
    assert "does not fit" in oracle["t/long"]["error"]
    assert oracle["t/long"]["passed"] is False and oracle["t/long"]["status"] == "not run"
    assert "error" not in oracle["t/0"] and "passed" in oracle["t/0"]  # the run carried on
    unknown = {r["task_id"]: r for r in report["results"] if r["mode"] == "unknown"}
    assert "error" not in unknown["t/long"]  # the engine's own length choice fits
    summary = report["summary"]
    assert summary["oracle"]["unanswerable"] == 1 and summary["unknown"]["unanswerable"] == 0
    assert summary["oracle"]["tested"] == 2 and summary["oracle"]["pass@1"] <= 0.5
