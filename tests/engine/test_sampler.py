"""The denoising loop, driven by a scripted denoiser whose distributions the test controls.

The scripted denoiser (``tests/doubles.py``) is a test double for the *model*;
the sampler under test is the real one.
"""

from __future__ import annotations

import pytest
from doubles import EOS, MASK, ScriptedDenoiser, beliefs

from engine.errors import InputError
from engine.sampler import SamplingParams, UnmaskOrder, denoise

PREFIX, SUFFIX = [5, 6, 7], [8, 9]


def test_threshold_one_commits_one_per_step_in_confidence_order():
    d = ScriptedDenoiser({4: beliefs((10, 0.5), (11, 0.9), (12, 0.7), (13, 0.6))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(4,), threshold=1.0))
    assert r.ids == [10, 11, 12, 13]
    assert r.stats["steps"] == 4 and r.stats["tokens_per_step"] == 1.0
    steps = [ids[0, 1:] for ids in d.states]  # drop the anchor column
    # slot 1 (0.9) first, then slot 2 (0.7), slot 3 (0.6), slot 0 (0.5)
    assert steps[1].tolist() == [MASK, 11, MASK, MASK]
    assert steps[2].tolist() == [MASK, 11, 12, MASK]
    assert steps[3].tolist() == [MASK, 11, 12, 13]
    assert d.calls[0][0] == "context" and d.calls[0][1].tolist() == PREFIX + [MASK] * 4 + SUFFIX


def test_threshold_commits_many_per_step():
    d = ScriptedDenoiser({6: beliefs((10, 0.95), (11, 0.99), (12, 0.3), (13, 0.92), (14, 0.2), (15, 0.97))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(6,), threshold=0.9))
    assert r.ids == [10, 11, 12, 13, 14, 15]
    # step 1 commits the four confident slots, then one per step for the two doubtful ones
    assert r.stats["steps"] == 3 and r.stats["tokens_per_step"] == 2.0
    assert r.stats["forward_passes"] == 3  # the context pass (also step 1) + 2 span steps


def test_tokens_per_step_floor():
    d = ScriptedDenoiser({6: beliefs(*[(10 + i, 0.1) for i in range(6)])})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(6,), threshold=1.0, tokens_per_step=3))
    assert r.stats["steps"] == 2 and len(r.ids) == 6


BREAK = 20  # a token whose text holds a line break


def test_line_break_stop_ends_the_middle_once_everything_before_the_break_is_written():
    # confidence order: the break (slot 1) first, then slot 0: the line is complete after two steps
    script = {5: beliefs((10, 0.5), (BREAK, 0.9), (11, 0.4), (12, 0.3), (13, 0.2))}
    full = denoise(ScriptedDenoiser(script), PREFIX, SUFFIX, SamplingParams(lengths=(5,), threshold=1.0))
    d = ScriptedDenoiser(script)
    params = SamplingParams(lengths=(5,), threshold=1.0, stop_at_line_break=True)
    first_line = denoise(d, PREFIX, SUFFIX, params, line_break_ids=frozenset({BREAK}))
    assert full.ids == [10, BREAK, 11, 12, 13] and full.stats["steps"] == 5
    assert first_line.ids == [10, BREAK] and first_line.stats["steps"] == 2 and not first_line.cut
    # after step 1 the break was written but slot 0 was not: the loop went on
    assert d.states[1][0, 1:].tolist() == [MASK, BREAK, MASK, MASK, MASK]
    # without the ids (or without the flag) nothing changes
    assert denoise(ScriptedDenoiser(script), PREFIX, SUFFIX, params).ids == full.ids
    no_flag = SamplingParams(lengths=(5,), threshold=1.0)
    assert denoise(ScriptedDenoiser(script), PREFIX, SUFFIX, no_flag, line_break_ids=frozenset({BREAK})).ids == full.ids


@pytest.mark.parametrize(
    "order, first",
    [(UnmaskOrder.CONFIDENCE, 0), (UnmaskOrder.MARGIN, 1), (UnmaskOrder.ENTROPY, 2), (UnmaskOrder.LEFT_TO_RIGHT, 0)],
)
def test_orders_pick_the_most_certain_slot(order, first):
    # (token, top-1, top-2, entropy): each order has a different favourite:
    # top-1 0.60 (slot 0), margin 0.45 (slot 1), entropy 0.2 (slot 2)
    d = ScriptedDenoiser({3: [(10, 0.60, 0.55, 0.9), (11, 0.50, 0.05, 1.5), (12, 0.55, 0.30, 0.2)]})
    denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(3,), threshold=1.0, order=order))
    second_step = d.states[1][0, 1:]
    expected = [MASK, MASK, MASK]
    expected[first] = 10 + first
    assert second_step.tolist() == expected


def test_random_order_is_seeded():
    script = {8: beliefs(*[(10 + i, 0.5) for i in range(8)])}

    def first_pick(seed):  # type: ignore[no-untyped-def]
        d = ScriptedDenoiser(script)
        denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(8,), threshold=1.0, order="random", seed=seed))
        return d.states[1][0, 1:].tolist()

    assert first_pick(1) == first_pick(1)
    assert len({tuple(first_pick(s)) for s in range(6)}) > 1


def test_eos_ends_the_middle_and_fills_the_rest():
    d = ScriptedDenoiser({6: beliefs((10, 0.95), (11, 0.95), (EOS, 0.99), (13, 0.2), (14, 0.2), (15, 0.2))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(6,), threshold=0.9))
    assert r.ids == [10, 11]
    cand = r.candidates[0]
    assert cand.tokens.tolist() == [10, 11, EOS, EOS, EOS, EOS]
    # step 1 commits the content; EOS waits until it is the leftmost masked slot (step 2)
    assert r.stats["steps"] == 2 and not r.cut


def test_eos_is_only_committed_at_the_leftmost_masked_slot():
    # the model is surest of the tail padding: committing it first would crawl EOS in from the right
    d = ScriptedDenoiser({4: beliefs((10, 0.3), (11, 0.4), (EOS, 0.99), (EOS, 0.99))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(4,), threshold=1.0))
    steps = [ids[0, 1:].tolist() for ids in d.states]
    assert steps[1] == [MASK, 11, MASK, MASK]  # the best eligible slot, not the confident EOS
    assert r.ids == [10, 11]


def test_length_choice_prefers_confident_candidate():
    d = ScriptedDenoiser(
        {
            2: beliefs((10, 0.3), (11, 0.3)),  # too short: the model is unsure
            4: beliefs((10, 0.9), (11, 0.9), (12, 0.9), (EOS, 0.95)),
        }
    )
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(2, 4), threshold=0.85))
    assert r.stats["chosen_length"] == 4 and r.ids == [10, 11, 12]
    assert d.calls[0][1].tolist() == PREFIX + [MASK] * 4 + SUFFIX  # one context pass, longest layout
    assert sum(kind == "context" for kind, _ in d.calls) == 1



def test_the_context_pass_is_the_longest_candidates_first_step():
    d = ScriptedDenoiser({4: beliefs((10, 0.5), (11, 0.9), (12, 0.7), (13, 0.6))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(4,), threshold=1.0))
    # one candidate: its first step comes from the context pass, so no span step sees it fully masked
    assert [kind for kind, _ in d.calls] == ["context", "step", "step", "step"]
    assert all((ids[0, 1:] != MASK).any() for kind, ids in d.calls if kind == "step")
    assert r.stats["steps"] == 4 and r.stats["forward_passes"] == 4
    assert r.stats["tokens_per_forward"] == 1.0

    d = ScriptedDenoiser({2: beliefs((10, 0.3), (11, 0.3)), 4: beliefs((10, 0.5), (11, 0.9), (12, 0.7), (13, 0.6))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(2, 4), threshold=1.0))
    first_step = d.calls[1][1]
    # several candidates: the first span step runs only the shorter ones (anchor + 2 slots, all masked)
    assert first_step.tolist() == [[PREFIX[-1], MASK, MASK]]
    assert r.stats["forward_passes"] == r.stats["steps"] + 1

def test_budget_returns_only_committed_prefix():
    d = ScriptedDenoiser({8: beliefs(*[(10 + i, 0.5 - 0.05 * i) for i in range(8)])}, delay_s=0.03)
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(8,), threshold=1.0, budget_ms=100))
    assert r.cut
    assert 1 <= r.stats["steps"] < 8
    assert MASK not in r.ids
    assert r.ids == [10 + i for i in range(len(r.ids))]  # committed left to right here


def test_budget_cut_stops_at_first_masked_slot():
    # slot 0 is the least confident: after a few steps slots 1.. are committed but slot 0 is not
    d = ScriptedDenoiser({5: beliefs((10, 0.1), (11, 0.9), (12, 0.8), (13, 0.7), (14, 0.6))})
    calls = iter(range(100))
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(5,), threshold=1.0), stop=lambda: next(calls) >= 3)
    assert r.cut and r.stats["steps"] == 3
    assert r.ids == []  # slot 0 still masked: nothing usable, never uncommitted garbage


def test_stop_callback_cancels():
    d = ScriptedDenoiser({4: beliefs(*[(10 + i, 0.5) for i in range(4)])})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(4,), threshold=1.0), stop=lambda: True)
    assert r.cut and r.ids == [] and r.stats["steps"] == 0


def test_exact_mode_uses_full_windows():
    d = ScriptedDenoiser({3: beliefs((10, 0.95), (11, 0.95), (12, 0.95))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(3,), threshold=0.9, exact=True))
    assert r.ids == [10, 11, 12]
    assert [kind for kind, _ in d.calls] == ["full"]
    assert d.calls[0][1][0].tolist() == PREFIX + [MASK] * 3 + SUFFIX


@pytest.mark.parametrize(
    "kwargs",
    [dict(lengths=()), dict(lengths=(0,)), dict(threshold=0.0), dict(threshold=1.5), dict(tokens_per_step=0),
     dict(budget_ms=-1), dict(order="sideways")],
)
def test_bad_params(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)


def test_shifted_model_needs_an_anchor():
    d = ScriptedDenoiser({2: beliefs((10, 0.9), (11, 0.9))})
    with pytest.raises(InputError, match="at least one token"):
        denoise(d, [], SUFFIX, SamplingParams(lengths=(2,)))


def test_longer_candidates_are_abandoned_once_a_shorter_one_ends():
    d = ScriptedDenoiser(
        {
            4: beliefs((10, 0.95), (11, 0.95), (EOS, 0.99), (EOS, 0.99)),  # done in one step, ends at slot 2
            16: beliefs(*[(10 + i, 0.2) for i in range(16)]),  # would need 16 steps
        }
    )
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(4, 16), threshold=0.9))
    assert r.stats["steps"] == 2  # content, then the end token; the 16-slot candidate is then dropped
    assert r.ids == [10, 11] and r.stats["chosen_length"] == 4
    assert r.candidates[1].abandoned and not r.cut


def test_left_to_right_order_commits_the_leftmost_slot_first():
    d = ScriptedDenoiser({3: beliefs((10, 0.4), (11, 0.5), (12, 0.8))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(3,), threshold=1.0, order=UnmaskOrder.LEFT_TO_RIGHT))
    steps = [ids[0, 1:].tolist() for ids in d.states]
    assert steps == [[MASK, MASK, MASK], [10, MASK, MASK], [10, 11, MASK]]
    assert r.ids == [10, 11, 12] and r.stats["tokens_per_step"] == 1.0


def test_budget_pruning_drops_lengths_that_cannot_finish():
    # one token per step, 20 ms a step, 200 ms budget: the 4-slot candidate can finish, the 40-slot one cannot
    script = {4: beliefs(*[(10 + i, 0.5) for i in range(4)]), 40: beliefs(*[(20 + i, 0.5) for i in range(40)])}
    r = denoise(ScriptedDenoiser(script, delay_s=0.02), PREFIX, SUFFIX, SamplingParams(lengths=(4, 40), threshold=1.0, budget_ms=200))
    long = r.candidates[1]
    assert long.abandoned and long.steps == 1  # dropped after the first step showed the pace
    assert r.stats["pruned"] == 1
    assert not r.cut and r.ids == [10, 11, 12, 13]  # the time went to the candidate that could finish
    # without pruning both run until the deadline and the short one still wins, later
    d = ScriptedDenoiser(script, delay_s=0.02)
    r2 = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(4, 40), threshold=1.0, budget_ms=200, budget_pruning=False))
    assert not r2.candidates[1].abandoned and "pruned" not in r2.stats


def test_budget_pruning_keeps_the_shortest_candidate():
    script = {30: beliefs(*[(10 + i, 0.5) for i in range(30)]), 40: beliefs(*[(20 + i, 0.5) for i in range(40)])}
    r = denoise(ScriptedDenoiser(script, delay_s=0.02), PREFIX, SUFFIX, SamplingParams(lengths=(30, 40), threshold=1.0, budget_ms=120))
    assert r.candidates[1].abandoned and not r.candidates[0].abandoned
    assert r.cut and r.chosen == 0 and r.ids == list(range(10, 10 + len(r.ids)))
