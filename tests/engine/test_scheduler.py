"""Continuous batching: several requests' span steps as one forward pass (engine.scheduler).

The merged pass must answer each request as its own pass would (fp32: to float rounding),
the scheduler must return each request what its loop alone returns, and a request that
stops, runs out of time or fails must leave the others running.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from engine import Engine
from engine.backends.base import SpanBatch, step_batches
from engine.errors import EngineError
from engine.manifest import Manifest, read_manifest
from engine.sampler import Candidate, SamplingParams, _Layout

PROMPTS = [
    ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"),
    ("import os\n\nfor name in os.listdir('.'):\n    ", ""),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        ", "\n"),
    ("x = [i * i for i in range(10)]\nprint(", ")\n" * 20),
    ("", "return 1\n"),
    ("# a comment\n" * 12 + "def f():\n    ", "\n    return y\n"),
]


def _parts(engine: Engine, seed: int = 0) -> list[SpanBatch]:
    """Span rows of requests with different contexts, spans and row counts, some slots committed."""
    rng = np.random.default_rng(seed)
    d, mask, vocab = engine.denoiser, engine.info.token_ids.mask, engine.info.arch.vocab_size
    parts = []
    for prefix, suffix, lengths in ((20, 7, [3, 5]), (9, 30, [8]), (40, 0, [2, 4, 6]), (3, 3, [1])):
        layout = _Layout(rng.integers(3, vocab, prefix), rng.integers(3, vocab, suffix), lengths, engine.info.arch.shifted)
        cache, _ = d.encode_context(*layout.context(mask))
        rows = [
            Candidate(length=m, tokens=np.where(rng.random(m) < 0.5, mask, rng.integers(3, vocab, m)),
                      committed=np.zeros(m, bool), confidence=np.zeros(m, np.float32), by_model=np.zeros(m, bool))
            for m in lengths
        ]
        parts.append(SpanBatch(cache, *layout.span_batch(rows)))
    return parts


def _assert_same_answers(engine: Engine, parts: list[SpanBatch]) -> None:
    alone = [engine.denoiser.step(p.cache, p.span_ids, p.span_pos, p.span_valid, p.cache_pos) for p in parts]
    merged = step_batches(engine.denoiser, parts)
    assert len(merged) == len(parts)
    for a, b, p in zip(alone, merged, parts):
        assert a.ids.shape == b.ids.shape == (*p.span_ids.shape, engine.info.top_k)
        valid = p.span_valid
        assert np.array_equal(a.ids[valid][:, 0], b.ids[valid][:, 0])
        assert np.abs(a.probs[valid] - b.probs[valid]).max() < 1e-5
        assert np.abs(a.entropy[valid] - b.entropy[valid]).max() < 1e-4


def test_a_merged_onnx_pass_answers_each_request_as_its_own_pass(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    assert engine.merges_requests and read_manifest(tiny_engine).format_version == 3
    _assert_same_answers(engine, _parts(engine))


def test_a_merged_torch_pass_answers_each_request_as_its_own_pass(tiny_checkpoint: Path):
    pytest.importorskip("torch")
    engine = Engine.load(tiny_checkpoint, backend="torch")
    _assert_same_answers(engine, _parts(engine, seed=1))


def _as_format_2(src: Path, dst: Path) -> Path:
    """A format 2 folder of ``src``'s graphs: the span step computes an all-true ``cache_valid`` itself
    (what format 2's export traced) instead of taking it."""
    import onnx
    from onnx import TensorProto, helper

    dst.mkdir()
    for name in (p.name for p in src.iterdir() if p.name != "manifest.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    model = onnx.load(str(dst / "span_step.onnx"))
    graph = model.graph
    graph.input.remove(next(i for i in graph.input if i.name == "cache_valid"))
    axes = helper.make_tensor("cache_valid_axes", TensorProto.INT64, [2], [1, 3])
    graph.initializer.append(axes)
    graph.node.insert(0, helper.make_node("Shape", ["cache_keys"], ["cache_valid_shape_all"]))
    graph.node.insert(1, helper.make_node("Gather", ["cache_valid_shape_all", "cache_valid_axes"], ["cache_valid_shape"]))
    graph.node.insert(2, helper.make_node("ConstantOfShape", ["cache_valid_shape"], ["cache_valid"],
                                          value=helper.make_tensor("one", TensorProto.BOOL, [1], [True])))
    onnx.save(model, str(dst / "span_step.onnx"))
    model = onnx.load(str(dst / "context.onnx"))
    graph = model.graph
    manifest: Manifest = read_manifest(src)
    arch = manifest.arch
    empty = helper.make_tensor("prior_shape", TensorProto.INT64, [5], [arch.num_layers, 1, arch.num_kv_heads, 0, arch.head_dim])
    graph.initializer.append(empty)
    for name in ("prior_keys", "prior_values"):  # format 2 had no prior context: an empty one
        graph.input.remove(next(i for i in graph.input if i.name == name))
        graph.node.insert(0, helper.make_node("ConstantOfShape", ["prior_shape"], [name],
                                              value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])))
    onnx.save(model, str(dst / "context.onnx"))
    manifest.format_version = 2
    manifest.write(dst)
    interface = json.loads((dst / "manifest.json").read_text())["interface"]
    assert interface["span_step"]["inputs"][-1] == "cache_values" and interface["context"]["inputs"][-1] == "span_index"
    return dst


def test_a_format_2_folder_still_serves_one_request_per_pass_without_reuse(tiny_engine: Path, tmp_path: Path):
    old = Engine.load(_as_format_2(tiny_engine, tmp_path / "v2"), backend="cpu")
    new = Engine.load(tiny_engine, backend="cpu")
    assert not old.merges_requests and old.contexts is None  # nor can it reuse context
    _assert_same_answers(old, _parts(old))
    params = SamplingParams(lengths=(4, 8))
    for prefix, suffix in PROMPTS:
        got = old.complete(prefix, suffix, params, reuse="doc")  # asked for, but not possible: a full pass
        assert got.middle_ids == new.complete(prefix, suffix, params).middle_ids and "context_reused" not in got.stats


def _concurrently(engine: Engine, calls: list[dict]) -> list:
    """Run each call's ``engine.complete`` on a thread of its own, all started together."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = engine.complete(**calls[i])
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a request never returned"
    return results


@pytest.mark.parametrize("lanes", [1, 2])
def test_concurrent_requests_share_forward_passes_and_get_their_own_middles(tiny_engine: Path, lanes: int):
    """Each request gets exactly the middle it gets alone (fp32 graphs), while the passes are shared
    (by all of them, or by those of each of two lanes)."""
    engine = Engine.load(tiny_engine, backend="cpu")
    calls = [
        dict(prefix=p, suffix=s, params=SamplingParams(lengths=lengths, threshold=threshold, exact=exact),
             heal=heal, stop=None)
        for (p, s), lengths, threshold, exact, heal in zip(
            PROMPTS, [(4, 8, 16), (10,), (3, 6), (16,), (2, 5, 9), (8,)], [0.9, 0.5, 1.0, 0.9, 0.3, 0.9],
            [False, False, False, False, False, True], [False, True, False, True, False, False])
    ]
    alone = [engine.complete(**call) for call in calls]
    sizes: list[tuple[int, int]] = []
    engine.batch_requests(on_step=lambda requests, rows: sizes.append((requests, rows)), lanes=lanes)
    together = _concurrently(engine, calls)
    for a, b in zip(alone, together):
        assert not isinstance(b, Exception), b
        assert (b.middle_ids, b.text, b.healed) == (a.middle_ids, a.text, a.healed)
        assert np.allclose(b.confidence, a.confidence, atol=1e-5)
        assert b.stats["batch_requests"] >= 1.0
    assert max(requests for requests, _ in sizes) > 1, sizes  # some passes held several requests
    assert sum(b.stats["batch_requests"] > 1 for b in together) >= 2


def test_a_stopped_or_late_request_leaves_and_the_others_finish(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    # one token per step: 63 steps after the context pass; span steps as the scheduler runs them (a request
    # alone would cache its span, which decodes differently)
    long = SamplingParams(lengths=(64,), threshold=1.0, cached_span=False)
    alone = engine.complete(*PROMPTS[0], long)
    engine.batch_requests()
    stopped = threading.Event()
    stopped.set()
    results = _concurrently(engine, [
        dict(prefix=PROMPTS[0][0], suffix=PROMPTS[0][1], params=long),
        dict(prefix=PROMPTS[1][0], suffix=PROMPTS[1][1], params=long, stop=stopped.is_set),
        dict(prefix=PROMPTS[2][0], suffix=PROMPTS[2][1], params=SamplingParams(lengths=(64,), threshold=1.0, budget_ms=1)),
    ])
    assert results[0].middle_ids == alone.middle_ids and not results[0].cut
    assert results[1].cut and results[2].cut
    assert results[1].stats["steps"] <= 1 and results[2].stats["steps"] < 63


def test_rows_beyond_the_limit_wait_a_round_and_still_finish(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    calls = [dict(prefix=p, suffix=s, params=SamplingParams(lengths=(3, 6, 9))) for p, s in PROMPTS]
    alone = [engine.complete(**call).middle_ids for call in calls]
    rows: list[int] = []
    engine.batch_requests(max_rows=4, on_step=lambda _n, r: rows.append(r))
    together = _concurrently(engine, calls)
    assert [r.middle_ids for r in together] == alone
    assert rows and max(rows) <= 4


class _Failing:
    """Wraps a denoiser; its merged passes fail while ``failing`` is set (a runtime error on the device)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.info, self.failing = inner, inner.info, True

    def encode_context(self, *args):  # type: ignore[no-untyped-def]
        return self.inner.encode_context(*args)

    def step(self, *args):  # type: ignore[no-untyped-def]
        if self.failing:
            raise RuntimeError("device lost")
        return self.inner.step(*args)

    def step_many(self, parts):  # type: ignore[no-untyped-def]
        if self.failing:
            raise RuntimeError("device lost")
        return self.inner.step_many(parts)

    def full(self, *args):  # type: ignore[no-untyped-def]
        return self.inner.full(*args)


def test_a_failed_pass_fails_its_requests_and_the_scheduler_serves_the_next(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    params = SamplingParams(lengths=(4, 8))
    alone = [engine.complete(p, s, params).middle_ids for p, s in PROMPTS[:3]]
    failing = _Failing(engine.denoiser)
    engine.denoiser = failing  # type: ignore[assignment]
    engine.batch_requests()
    results = _concurrently(engine, [dict(prefix=p, suffix=s, params=params) for p, s in PROMPTS[:3]])
    assert all(isinstance(r, RuntimeError) and "device lost" in str(r) for r in results), results
    failing.failing = False
    assert [r.middle_ids for r in _concurrently(engine, [dict(prefix=p, suffix=s, params=params) for p, s in PROMPTS[:3]])] == alone


def test_a_closed_scheduler_refuses_new_requests(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    engine.batch_requests()
    assert engine.scheduler is not None
    engine.scheduler.close()
    with pytest.raises(EngineError, match="closed"):
        engine.complete("x = ", "")
