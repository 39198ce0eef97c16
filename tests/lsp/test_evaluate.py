"""``dlm-lsp evaluate``: the metrics, and a whole run on the shipped model through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from dlm_lsp.cli import main
from dlm_lsp.evaluate import summarise, useful

MODULE = '''"""Geometry helpers."""

import math


def circle_area(radius):
    """Area of a circle."""
    return math.pi * radius * radius


def distance(a, b):
    dx = a[0] - b[0]
    dy = a[1] - b[1]
    return math.sqrt(dx * dx + dy * dy)
'''


def test_useful_means_a_non_empty_prefix_of_the_expected_text():
    assert useful("math.pi", "math.pi * radius * radius")
    assert useful("return x\n    y", "return x")  # only the first line counts
    assert not useful("", "x") and not useful("   ", "x")
    assert not useful("math.e", "math.pi")


def test_summary_counts_over_shown_and_all():
    rows = [{"shown": False}, {"shown": True, "useful": True, "exact": False, "edit_similarity": 0.5,
                               "whitespace_error": False, "chars": 4, "parse_ok": True, "parses_as_true": False}]
    summary = summarise(rows, total=2)
    assert summary["shown"] == 1 and summary["coverage"] == 0.5
    assert summary["useful"] == 1.0 and summary["useful_of_all"] == 0.5 and summary["parses_as_true"] == 0.0


def test_a_whole_run_prints_the_curve_and_keeps_every_item(tmp_path: Path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "geometry.py").write_text(MODULE)
    out = tmp_path / "report.json"
    code = main(["evaluate", str(tmp_path / "src"), "--count", "6", "--thresholds", "0,0.3,0.9", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| minConfidence |" in printed and "6 single-line middles" in printed
    report = json.loads(out.read_text())
    assert [c["threshold"] for c in report["curve"]] == [0.0, 0.3, 0.9]
    assert len(report["items"]) == 6
    ungated = sum(1 for item in report["items"] if item["suggestion"])
    assert report["curve"][0]["shown"] == ungated  # threshold 0 is the server without the gate
    assert all(c["shown"] <= report["curve"][0]["shown"] for c in report["curve"])  # the gate only hides or cuts
    for item in report["items"]:  # what a threshold shows is a leading part of the ungated suggestion
        for text in item["shown_at"].values():
            assert text is None or item["suggestion"].startswith(text)
    assert sum(report["curve"][1]["verdicts"].values()) == 6


def test_bad_arguments_are_reported(tmp_path: Path, capsys):
    assert main(["evaluate", str(tmp_path), "--count", "3"]) == 2
    assert "no usable source files" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--thresholds", "2"]) == 2
