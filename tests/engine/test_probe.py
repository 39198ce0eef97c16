"""The CPU probe behind ``models list``'s expected latency: measured once, cached, scaled by model size."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx")

from engine import probe  # noqa: E402


def test_measured_once_then_read_from_the_cache(tmp_path):
    cache = tmp_path / "probe.json"
    first = probe.probe(cache)
    assert first is not None and first["int8_ops_per_s"] > 1e9 and first["int8_weight_bytes_per_s"] > 1e8
    assert json.loads(cache.read_text()) == first
    cache.write_text(json.dumps({**first, "int8_ops_per_s": 123.0}))  # a cached value is used as it is
    assert probe.probe(cache)["int8_ops_per_s"] == 123.0
    assert probe.probe(cache, refresh=True)["int8_ops_per_s"] != 123.0
    cache.write_text(json.dumps({**first, "cpu": "another CPU"}))  # another machine's figures are not
    assert probe.probe(cache)["cpu"] == first["cpu"]


def test_expected_latency_grows_with_the_model():
    figures = {"int8_ops_per_s": 2e11, "int8_weight_bytes_per_s": 1e10}
    small = probe.expected_ms(494_032_768, 151_936, 896, True, figures)
    large = probe.expected_ms(7_615_616_512, 152_064, 3584, False, figures)
    assert 0 < small["step_ms"] < large["step_ms"] and 0 < small["context_ms"] < large["context_ms"]
    assert small["single_line_ms"] == pytest.approx(small["context_ms"] + probe.SINGLE_LINE_STEPS * small["step_ms"])
    for model in (small, large):  # a keystroke after the first request encodes a sixth of the window or so
        assert model["step_ms"] * probe.SINGLE_LINE_STEPS < model["follow_up_ms"] < model["single_line_ms"] / 2
