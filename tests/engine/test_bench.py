"""The engine-level benchmark: metrics, workloads, and a real run on a tiny engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import Engine
from engine.bench import (
    Item,
    SINGLE_LINE_LENGTHS,
    edit_similarity,
    kind_of,
    load_items,
    markdown,
    percentile,
    run_engine_bench,
    shown,
    summarize,
)
from engine.errors import InputError

PROBLEMS = [
    {"task_id": "t/0", "prompt": "def f(x):\n    y = x + 1\n", "suffix": "    return y\n", "canonical_solution": "    y = y * 2\n"},
    {"task_id": "t/1", "prompt": "def g(a):\n", "suffix": "\nprint(g(1))\n", "canonical_solution": "    b = a\n    return b\n"},
    {"task_id": "t/2", "prompt": "import os\n", "suffix": "\n", "canonical_solution": "import sys\n"},
]


@pytest.fixture()
def problems_file(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def _row(decoder: str, latency: float, em: bool, model_tokens: int, forwards: int, kind: str = "single") -> dict:
    return {
        "kind": kind, "context": 256, "decoder": decoder, "latency_ms": latency, "middle_tokens": model_tokens,
        "model_tokens": model_tokens, "forward_passes": forwards, "exact_match": em, "edit_sim": 1.0 if em else 0.5,
        "empty": False, "cut": False, "within_budget": latency <= 100,
    }


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 95) == 95 and percentile(values, 100) == 100
    assert percentile([7.0], 95) == 7.0


def test_summarize_computes_metrics_and_ratios_against_both_baselines():
    rows = [
        _row("dlm", 10, True, 8, 3), _row("dlm", 30, False, 8, 5),
        _row("reference", 200, True, 8, 8), _row("reference", 400, True, 8, 8),
        _row("one-per-step", 50, True, 8, 9), _row("one-per-step", 70, False, 8, 9),
    ]
    by = {e["decoder"]: e for e in summarize(rows)}
    dlm = by["dlm"]
    assert dlm["p50_ms"] == 20 and dlm["max_ms"] == 30 and dlm["n"] == 2
    assert dlm["tokens_per_forward"] == 2.0  # 16 tokens over 8 forward passes
    assert dlm["tokens_per_s"] == pytest.approx(16 / 0.040, rel=1e-3)
    assert dlm["exact_match"] == 0.5 and dlm["within_budget"] == 1.0
    assert dlm["speedup_vs_reference"] == 15.0 and dlm["em_delta_vs_reference"] == -0.5
    assert dlm["speedup_vs_one_per_step"] == 3.0 and dlm["em_delta_vs_one_per_step"] == 0.0
    assert dlm["tokens_per_forward_vs_one_per_step"] == pytest.approx(2.0 / (16 / 18), rel=1e-2)
    assert by["reference"]["within_budget"] == 0.0 and "speedup_vs_reference" not in by["reference"]
    table = markdown(summarize(rows))
    assert table.count("\n") == 5 and "| single | 256 | dlm | 2 | 20.0 | 30.0 | 30 |" in table


def test_edit_similarity_and_kinds():
    assert edit_similarity("abc\n", "abc") == 1.0 and edit_similarity("", "") == 1.0
    assert edit_similarity("", "x") == 0.0 and 0 < edit_similarity("return x", "return y") < 1
    assert kind_of("x = 1\n") == "single" and kind_of("a\nb\n") == "multi"


def test_single_line_middles_are_scored_on_the_line_the_server_shows():
    assert shown("return x\n    y = 2\n", "single") == "return x" and shown("a\nb\n", "multi") == "a\nb\n"


def test_load_items_splits_kinds_and_rejects_nothing(problems_file: Path):
    items = load_items(None, [problems_file], kinds=("single", "multi"), count=10)
    assert sorted((i.id, i.kind) for i in items) == [("t/0", "single"), ("t/1", "multi"), ("t/2", "single")]
    assert all(i.source == "problems" for i in items)
    assert [i.id for i in load_items(None, [problems_file], kinds=("single",), count=1)] in (["t/0"], ["t/2"])
    with pytest.raises(InputError, match="no benchmark items"):
        load_items(None, [], kinds=("single",))


def test_engine_bench_runs_every_decoder_side_by_side(tiny_engine: Path, problems_file: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    items = load_items(None, [problems_file], count=10)
    report = run_engine_bench(engine, items, contexts=(64, 256, 4096), budget_ms=None, show_progress=False)
    assert report["skipped"] == [{"context": 4096, "reason": "model window is 1024 positions"}]
    rows = report["rows"]
    assert len(rows) == len(items) * 2 * 3  # items x fitting context sizes x decoders
    for row in rows:
        assert row["context_tokens"] <= row["context"]
        if row["decoder"] == "reference":  # recomputes the window every step: no context pass
            assert row["forward_passes"] == row["steps"]
        elif row["kind"] == "single":  # one candidate: the context pass is its first step
            assert row["forward_passes"] == row["steps"]
        else:  # several candidates up to 64 tokens: the cached span runs a pass per candidate and step
            assert row["steps"] + 1 <= row["forward_passes"] <= row["steps"] * 4
        if row["decoder"] != "dlm":  # one token per forward pass at most
            assert row["model_tokens"] <= row["steps"]
    summary = {(e["kind"], e["context"], e["decoder"]): e for e in report["summary"]}
    assert set(summary) == {(k, c, d) for k in ("single", "multi") for c in (64, 256) for d in ("dlm", "reference", "one-per-step")}
    assert all("speedup_vs_reference" in e for e in report["summary"] if e["decoder"] == "dlm")
    assert report["peak_rss_mb"] > 0


def test_context_size_bounds_what_the_model_sees(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    long = Item("long", "test", "single", "x = 1\n" * 400, "y = 2\n" * 400, "z = 3\n")
    report = run_engine_bench(engine, [long], contexts=(128,), budget_ms=None, warmup=0, show_progress=False)
    longest = max(SINGLE_LINE_LENGTHS)
    assert {r["context_tokens"] for r in report["rows"]} == {128 - longest - 1}  # room beside the longest span


def test_long_text_is_cut_before_tokenizing_without_changing_the_window(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    prefix = "".join(f"value_{i} = compute({i}, 'x' * {i})\n" for i in range(3000))
    suffix = "".join(f"print(value_{i})\n" for i in range(3000))
    full_p = engine.tokenizer.encode(prefix)
    full_s = engine.tokenizer.encode(suffix)
    assert len(prefix) > engine._char_limit()
    room = 200
    assert engine._encode_tail(prefix)[-room:] == full_p[-room:]
    assert engine._encode_head(suffix)[:room] == full_s[:room]
    short = "a = 1\n"
    assert engine._encode_tail(short) == engine.tokenizer.encode(short)
