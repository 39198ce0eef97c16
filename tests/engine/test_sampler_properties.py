"""Invariants of the denoising loop over arbitrary model beliefs (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

from doubles import EOS, MASK, ScriptedDenoiser
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampler import SamplingParams, denoise

slot = st.tuples(st.sampled_from([EOS, 10, 11, 12, 13]), st.floats(0.01, 1.0))
BREAK = 12  # stands for a token whose text holds a line break


@settings(max_examples=150, deadline=None)
@given(
    spans=st.lists(st.lists(slot, min_size=1, max_size=12), min_size=1, max_size=3),
    threshold=st.floats(0.05, 1.0),
    per_step=st.integers(1, 4),
    stop_after=st.one_of(st.none(), st.integers(0, 6)),
)
def test_invariants(spans, threshold, per_step, stop_after):
    script = {}
    for span in spans:
        script.setdefault(len(span), [(tok, p, p / 2, 1 - p) for tok, p in span])
    calls = iter(range(1000))
    stop = None if stop_after is None else (lambda: next(calls) >= stop_after)
    params = SamplingParams(lengths=tuple(script), threshold=threshold, tokens_per_step=per_step)
    r = denoise(ScriptedDenoiser(script), [5, 6], [7], params, stop=stop)
    assert MASK not in r.ids and EOS not in r.ids
    chosen = r.candidates[r.chosen]
    assert len(r.ids) <= chosen.length
    assert r.ids == chosen.tokens[: len(r.ids)].tolist()  # a committed prefix of the span
    assert all(chosen.committed[: len(r.ids)])
    for cand in r.candidates:
        assert cand.steps <= cand.length  # at least one commit per step
    if stop_after is None:
        assert not r.cut and all(c.done or c.abandoned for c in r.candidates)


@settings(max_examples=150, deadline=None)
@given(span=st.lists(slot, min_size=1, max_size=12), threshold=st.floats(0.05, 1.0), per_step=st.integers(1, 4))
def test_line_break_stop_writes_exactly_the_first_line_of_the_full_run(span, threshold, per_step):
    script = {len(span): [(tok, p, p / 2, 1 - p) for tok, p in span]}
    params = SamplingParams(lengths=(len(span),), threshold=threshold, tokens_per_step=per_step)
    full = denoise(ScriptedDenoiser(script), [5, 6], [7], params)
    stopped = denoise(
        ScriptedDenoiser(script), [5, 6], [7], replace(params, stop_at_line_break=True), line_break_ids=frozenset({BREAK})
    )
    expected = full.ids[: full.ids.index(BREAK) + 1] if BREAK in full.ids else full.ids
    assert stopped.ids == expected
    assert stopped.stats["steps"] <= full.stats["steps"]
