"""Context reuse across requests (engine.reuse): alignment, what is reused, and that a partial pass
computes what the model computes given the reused entries."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from engine import Engine, SamplingParams
from engine.reuse import ContextStore, ReusePolicy, Run, _State, banded, prefix_run, refreshed, suffix_run

TEXT = (Path(__file__).resolve().parents[2] / "engine" / "sampler.py").read_text()[:5000]
PARAMS = SamplingParams(lengths=(4, 8, 16))


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


def test_the_prefix_run_follows_a_window_that_slid_and_ends_at_the_first_change():
    old = np.arange(100, 160)
    new = np.concatenate([np.arange(105, 150), ids(7, 8)])  # the start slid by 5; edited after token 149
    assert prefix_run(old, new) == Run(0, 45, 5)
    assert prefix_run(old, old) == Run(0, 60, 0)
    assert prefix_run(old, ids(1, 2, 3, 4, 5, 6, 7, 8, 9)) == Run(0, 0, 0)  # nothing in common


def test_a_window_whose_first_tokens_came_out_differently_still_aligns():
    """Where the window is cut the text is tokenized afresh (inside a run of spaces, say): the search
    starts a few tokens in, those are computed, the rest is reused, and the bands keep that start."""
    old = np.arange(100, 160)
    new = np.concatenate([ids(7), np.arange(106, 150), ids(7, 8)])  # slid by 5, first token different
    assert prefix_run(old, new) == Run(1, 45, 6)
    state = _State(prefix=old, suffix=np.arange(300, 320), cache=None, stale=np.zeros(79, np.int32))
    pre, _ = banded(prefix_run(old, new), suffix_run(state.suffix, state.suffix), state, new, state.suffix, 1, band=4)
    assert pre == Run(1, 41, 6)
    assert prefix_run(old, np.concatenate([np.arange(1, 30), np.arange(110, 150)])) == Run(0, 0, 0)  # too far in


def test_a_retokenized_window_start_computes_what_the_reference_computes(tiny_engine: Path, tiny_checkpoint: Path):
    """A partial pass whose reused prefix run starts past the window's first token: the ONNX graphs and
    the PyTorch reference agree on the first step, and only the changed tokens and the bands are computed."""
    pytest.importorskip("torch")
    policy = ReusePolicy(band=8, max_age=6, min_reused=8)
    out = []
    for engine in (Engine.load(tiny_engine, backend="cpu"), Engine.load(tiny_checkpoint, backend="torch")):
        store, mask = ContextStore(policy), engine.info.token_ids.mask
        prefix = np.asarray(engine.tokenizer.encode(TEXT[:1500])[-120:], np.int64)
        suffix = np.asarray(engine.tokenizer.encode(TEXT[1600:2200])[:60], np.int64)
        store.encode(engine.denoiser, "doc", prefix, suffix, 8, 0, mask)
        typed = np.concatenate([[prefix[3] + 1], prefix[4:], prefix[-2:]])  # slid by 3, first token other, typed 2
        _, first, stats = store.encode(engine.denoiser, "doc", typed, suffix, 8, 0, mask)
        out.append((first, stats))
    (a, stats), (b, other) = out
    refresh = -(-(len(typed) + len(suffix)) // 6)  # the stalest sixth of the window (every entry is 1 pass old)
    assert stats == other and stats["context_reused"] > 120
    assert stats["context_computed"] < 2 + 2 * 8 + 2 + 1 + refresh
    assert np.array_equal(a.ids[..., 0], b.ids[..., 0]) and np.allclose(a.probs, b.probs, atol=1e-4)


def test_repeated_code_aligns_where_the_most_is_kept():
    block = np.arange(10, 20)
    old = np.concatenate([block, ids(1, 1, 1), block, np.arange(50, 70)])
    new = np.concatenate([block, np.arange(50, 65)])  # the second copy, then what followed it
    run = prefix_run(old, new)
    assert run.old_start == 13 and run.end == 25


def test_the_suffix_run_skips_a_change_at_its_start_and_stops_where_the_window_was_cut():
    old = np.arange(200, 260)
    assert suffix_run(old, old[:50]) == Run(0, 50, 0)
    new = np.concatenate([ids(9), np.arange(201, 262)])  # the token under the cursor changed; two more at the end
    run = suffix_run(old, new)
    assert (run.start, run.end, run.old_start) == (1, 60, 1)
    deleted = np.arange(203, 260)  # three tokens deleted forward
    assert suffix_run(old, deleted) == Run(0, 57, 3)


def test_bands_cut_both_sides_of_the_cursor_only_when_something_changed_there():
    old = _State(prefix=np.arange(0, 50), suffix=np.arange(100, 130), cache=None, stale=np.zeros(79, np.int32))
    same = banded(prefix_run(old.prefix, old.prefix), suffix_run(old.suffix, old.suffix), old, old.prefix, old.suffix,
                  1, band=4)
    assert same == (Run(0, 49, 0), Run(0, 30, 0))  # all of it (the anchor, the last prefix token, is never cached)
    typed = np.concatenate([np.arange(0, 50), ids(7)])
    pre, suf = banded(prefix_run(old.prefix, typed), suffix_run(old.suffix, old.suffix), old, typed, old.suffix, 1, band=4)
    assert pre == Run(0, 45, 0)  # the old anchor (49) is not in the old cache, then 4 more
    assert suf == Run(4, 30, 4)


def test_an_unchanged_window_reuses_everything_and_answers_as_the_full_pass(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    prefix, suffix = TEXT[:2000], TEXT[2100:2600]
    full = engine.complete(prefix, suffix, PARAMS)
    first = engine.complete(prefix, suffix, PARAMS, reuse="doc")
    again = engine.complete(prefix, suffix, PARAMS, reuse="doc")
    assert first.stats["context_reused"] == 0 and first.middle_ids == full.middle_ids
    assert again.stats["context_computed"] == 0 and again.stats["context_reused"] == full.stats["context_tokens"] - 1
    assert again.middle_ids == full.middle_ids
    assert np.allclose(again.confidence, full.confidence, atol=1e-5)


def _typing(engine: Engine, store: ContextStore, keys: int = 24) -> list:
    engine.contexts = store
    out = []
    for k in range(keys):
        out.append(engine.complete(TEXT[: 2500 + k], TEXT[2540:], PARAMS, reuse="doc"))
        out[-1].stats["stalest"] = int(store._states["doc"].stale.max())
    return out


def test_typing_reuses_most_of_the_window_and_onnx_computes_what_the_reference_computes(tiny_engine: Path,
                                                                                        tiny_checkpoint: Path):
    """The same keystrokes through the ONNX graphs and the PyTorch reference: each partial pass of the
    graphs (prior keys rotated to new positions, entries joined in layout order) agrees with the reference's.
    After the first request no keystroke encodes the whole window, yet no entry is reused in more than
    ``max_age`` passes in a row: each pass refreshes a share of it."""
    pytest.importorskip("torch")
    policy = ReusePolicy(band=8, max_age=6)
    onnx = Engine.load(tiny_engine, backend="cpu")
    torch = Engine.load(tiny_checkpoint, backend="torch")
    a, b = _typing(onnx, ContextStore(policy)), _typing(torch, ContextStore(policy))
    assert a[0].stats["context_reused"] == 0 and all(r.stats["context_reused"] for r in a[1:])
    context = a[0].stats["context_computed"]
    for r in a[1:]:  # the typed token, the bands, the anchor's neighbour and a sixth of the window
        assert r.stats["context_computed"] <= 2 + 2 * 8 + 2 + -(-context // 6)
    assert 3 <= max(r.stats["stalest"] for r in a) <= 6  # entries are reused again and again, never past 6
    assert [r.stats["context_reused"] for r in a] == [r.stats["context_reused"] for r in b]
    assert [r.middle_ids for r in a] == [r.middle_ids for r in b]
    for x, y in zip(a, b):
        assert np.allclose(x.confidence, y.confidence, atol=1e-4)


def test_each_pass_refreshes_the_stalest_share_nearest_the_cursor_first():
    kept = np.ones(12, bool)
    kept[5:7] = False  # the change and its bands
    ages = np.where(kept, np.array([3, 3, 1, 1, 1, 0, 0, 1, 1, 1, 2, 2]), 0)
    out = refreshed(kept, ages, cursor=6, max_age=4)  # a quarter of 12: 3 entries
    assert np.flatnonzero(~out).tolist() == [0, 1, 5, 6, 10]  # the two stalest (3), then the nearer of the 2s
    ages[2] = 7  # past max_age: computed again whatever the share
    assert not refreshed(kept, ages, cursor=6, max_age=4)[2]
    assert refreshed(np.zeros(4, bool), np.zeros(4, np.int32), 2, 4).tolist() == [False] * 4


def test_steady_typing_refreshes_a_steady_share_and_never_the_whole_window():
    """Entries age by one per partial pass and the band moves with the cursor: under `refreshed` the
    computed count stays flat from keystroke to keystroke (no spike) and no entry outlives max_age."""
    n, band, max_age = 400, 8, 8
    stale = np.zeros(n, np.int32)
    computed = []
    for cursor in range(100, 160):
        kept = np.ones(n, bool)
        kept[cursor - band : cursor + band] = False
        ages = np.where(kept, stale + 1, 0)
        kept = refreshed(kept, ages, cursor, max_age)
        stale = np.where(kept, ages, 0)
        computed.append(int((~kept).sum()))
        assert stale.max() <= max_age
    assert max(computed) <= 2 * band + 2 * (n // max_age)
    assert max(computed[max_age:]) - min(computed[max_age:]) <= 2 * band


def test_a_large_change_or_another_document_encodes_the_whole_window(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    engine.complete(TEXT[:2000], TEXT[2100:2600], PARAMS, reuse="doc")
    moved = engine.complete(TEXT[:3000], TEXT[3100:3600], PARAMS, reuse="doc")  # the cursor jumped
    assert moved.stats["context_reused"] == 0
    other = engine.complete(TEXT[:3000], TEXT[3100:3600], PARAMS, reuse="other")
    assert other.stats["context_reused"] == 0
    assert engine.complete(TEXT[:3001], TEXT[3100:3600], PARAMS, reuse="other").stats["context_reused"] > 0
    assert engine.contexts is not None
    engine.contexts.forget("other")
    assert engine.complete(TEXT[:3002], TEXT[3100:3600], PARAMS, reuse="other").stats["context_reused"] == 0


def test_the_store_remembers_only_its_capacity_of_documents(tiny_engine: Path):
    engine = Engine.load(tiny_engine, backend="cpu")
    engine.contexts = ContextStore(ReusePolicy(capacity=2))
    for key in ("a", "b", "c"):
        engine.complete(TEXT[:2000], TEXT[2100:2600], PARAMS, reuse=key)
    assert len(engine.contexts) == 2
    assert engine.complete(TEXT[:2000], TEXT[2100:2600], PARAMS, reuse="a").stats["context_reused"] == 0
    assert engine.complete(TEXT[:2000], TEXT[2100:2600], PARAMS, reuse="c").stats["context_reused"] > 0


def test_reuse_under_the_batching_scheduler_gives_what_it_gives_alone(tiny_engine: Path):
    """Documents typed at the same time by several threads through the scheduler: each gets the
    middles its own keystrokes get without the scheduler."""
    engine = Engine.load(tiny_engine, backend="cpu")
    cuts = {"a": 1500, "b": 2500, "c": 3500}
    alone = {d: [engine.complete(TEXT[: c + k], TEXT[c + 40 :], PARAMS, reuse=f"alone-{d}").middle_ids for k in range(8)]
             for d, c in cuts.items()}
    engine.batch_requests()
    together: dict[str, list] = {}

    def type_in(d: str) -> None:
        c = cuts[d]
        together[d] = [engine.complete(TEXT[: c + k], TEXT[c + 40 :], PARAMS, reuse=d).middle_ids for k in range(8)]

    threads = [threading.Thread(target=type_in, args=(d,)) for d in cuts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


def test_a_document_that_was_empty_then_typed_in_encodes_without_reuse(tiny_engine: Path):
    """The previous window had no context at all (an empty file): nothing to align, a full pass, whatever
    the policy's minimum."""
    engine = Engine.load(tiny_engine, backend="cpu")
    store, mask, bos = ContextStore(ReusePolicy(min_reused=0)), engine.info.token_ids.mask, engine.info.token_ids.bos
    anchor = 1 if engine.info.arch.shifted else 0
    _, _, stats = store.encode(engine.denoiser, "doc", ids(bos), ids(), 4, anchor, mask)
    assert stats == {"context_reused": 0, "context_computed": 1 - anchor}
    typed = np.asarray([bos, *engine.tokenizer.encode("def f(x):\n    return x")], np.int64)
    _, _, stats = store.encode(engine.denoiser, "doc", typed, ids(), 4, anchor, mask)
    assert stats["context_reused"] <= 1 and stats["context_computed"] >= len(typed) - anchor - 1
