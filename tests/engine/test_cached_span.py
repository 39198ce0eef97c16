"""The cached-span mode of the denoising loop (engine.sampler, ``cached_span``): each step computes only
the masked rows and the tokens committed since the last one, against the candidate's context and its
cached commits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import Engine, SamplingParams
from engine.sampler import denoise
from engine.tiny import write_random_checkpoint

PROMPTS = [
    ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        ", "\n"),
    ("x = [i * i for i in range(10)]\nprint(", ")\n" * 20),
    ("# a comment\n" * 12 + "def f():\n    ", "\n    return y\n"),
]
SLOW = dict(threshold=1.0, tokens_per_step=2, defer_end=False)
"""Two commits per step, whatever the confidence: many steps, so that the cache grows step by step."""


@pytest.fixture(scope="module")
def llada_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 engine folder of a model that predicts each slot at its own position (not shifted)."""
    pytest.importorskip("torch")
    from engine.export import convert

    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "llada", seed=3, family="llada", num_heads=4,
                                   num_kv_heads=2, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("eng") / "llada"
    convert(ckpt, out, precision="fp32")
    return out


class Recorder:
    """The real denoiser, with each context-graph call's inputs written down."""

    def __init__(self, denoiser: Any) -> None:
        self.denoiser, self.calls = denoiser, []
        self.info = denoiser.info

    def encode_context(self, ids, positions, cache_index, span_index, prior=None):  # noqa: ANN001, ANN201
        self.calls.append(dict(ids=np.array(ids), positions=np.array(positions), cache_index=np.array(cache_index),
                               span_index=np.array(span_index), prior=list(prior or [])))
        return self.denoiser.encode_context(ids, positions, cache_index, span_index, prior=prior)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.denoiser, name)


def _windows(engine: Engine) -> list[tuple[list[int], list[int]]]:
    return [(engine.tokenizer.encode(p), engine.tokenizer.encode(s)) for p, s in PROMPTS]


@pytest.mark.parametrize("which", ["tiny_engine", "llada_engine"])
def test_a_middle_written_in_two_steps_is_the_span_steps_own(which: str, request: pytest.FixtureRequest):
    """Nothing is cached before a candidate's second step: it computes what a span step computes."""
    engine = Engine.load(request.getfixturevalue(which), backend="cpu")
    for prefix, suffix in _windows(engine):
        params = SamplingParams(lengths=(3, 6), threshold=1.0, tokens_per_step=3, cached_span=False)
        span = denoise(engine.denoiser, prefix, suffix, params)
        cached = denoise(engine.denoiser, prefix, suffix, replace(params, cached_span=True))
        assert cached.ids == span.ids
        assert np.allclose(cached.confidence, span.confidence, atol=1e-5)


@pytest.mark.parametrize("which", ["tiny_engine", "llada_engine"])
def test_each_step_computes_the_masked_rows_and_the_new_commits_once(which: str, request: pytest.FixtureRequest):
    """Every span position is either an input of the step or in the prior, once, at its own position;
    only committed tokens are cached, and only rows still masked (or predicting a masked slot) are computed."""
    engine = Engine.load(request.getfixturevalue(which), backend="cpu")
    shifted = engine.info.arch.shifted
    a = 1 if shifted else 0
    m = 16
    for prefix, suffix in _windows(engine):
        prefix = [engine.info.token_ids.bos, *prefix]
        recorder = Recorder(engine.denoiser)
        result = denoise(recorder, prefix, suffix, SamplingParams(lengths=(m,), cached_span=True, **SLOW))
        p = len(prefix)
        context_positions = np.concatenate([np.arange(p - a), p + m + np.arange(len(suffix))])
        span_positions = set(range(p - a, p + m))
        steps = recorder.calls[1:]  # the first call is the context pass
        assert len(steps) == result.stats["steps"] - 1 >= 4
        mask = engine.info.token_ids.mask
        cached_so_far: set[int] = set()
        for call in steps:
            context, *cached = call["prior"]
            assert np.array_equal(context.positions, context_positions)
            held = set(cached[0].positions.tolist()) if cached else set()
            inputs = call["positions"].tolist()
            assert len(inputs) == len(set(inputs)) and not held & set(inputs) and held | set(inputs) == span_positions
            assert held == cached_so_far  # what earlier steps cached, and nothing else
            answers = call["positions"][call["span_index"]] - (p - a)  # the output row j predicts slot j
            masked_slots = {int(pos) - p for pos, t in zip(inputs, call["ids"]) if t == mask}
            assert set(answers.tolist()) == masked_slots
            # every known token is cached as soon as no masked slot needs its row's output
            known = {pos for pos, t in zip(inputs, call["ids"]) if t != mask}
            cache_positions = set(call["positions"][call["cache_index"]].tolist())
            assert cache_positions == known - {p - a + int(j) for j in answers}
            cached_so_far |= cache_positions
        assert result.stats["span_rows"] == sum(len(c["ids"]) for c in steps)
        regular = denoise(engine.denoiser, prefix, suffix, SamplingParams(lengths=(m,), cached_span=False, **SLOW))
        assert regular.stats["steps"] == result.stats["steps"]
        # a shifted model also computes the rows of masked tokens next to committed ones: fewer are saved
        assert result.stats["span_rows"] < (0.9 if shifted else 0.65) * regular.stats["span_rows"]


def test_onnx_and_the_reference_agree_in_the_cached_span_mode(tiny_engine: Path, tiny_checkpoint: Path):
    """Several candidates, priors of two parts (rotated by numpy and by torch), healing off and on."""
    pytest.importorskip("torch")
    onnx = Engine.load(tiny_engine, backend="cpu")
    torch = Engine.load(tiny_checkpoint, backend="torch")
    params = SamplingParams(lengths=(4, 8, 16), cached_span=True, **SLOW)
    for prefix, suffix in PROMPTS:
        for heal in (False, True):
            a = onnx.complete(prefix, suffix, params, heal=heal)
            b = torch.complete(prefix, suffix, params, heal=heal)
            assert a.middle_ids == b.middle_ids
            assert np.allclose(a.confidence, b.confidence, atol=1e-4)


def test_the_engine_caches_the_spans_of_long_middles_served_one_request_at_a_time(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    assert engine.resolved(SamplingParams()).cached_span is True  # candidates up to 64 tokens
    assert engine.resolved(SamplingParams(lengths=(10,))).cached_span is False  # a single line
    assert engine.resolved(SamplingParams(cached_span=False)).cached_span is False
    assert engine.resolved(SamplingParams(exact=True)).cached_span is False
    cached = engine.complete(*PROMPTS[0], SamplingParams(lengths=(8, 32), **SLOW))
    regular = engine.complete(*PROMPTS[0], SamplingParams(lengths=(8, 32), cached_span=False, **SLOW))
    assert 0 < cached.stats["span_rows"] < regular.stats["span_rows"]
    engine.batch_requests()
    assert engine.resolved(SamplingParams()).cached_span is False  # merged span steps instead
