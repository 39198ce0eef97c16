"""Token healing: the first middle slots write again the text cut from the end of the prefix."""

from __future__ import annotations

from doubles import MASK, ScriptedDenoiser, beliefs

from engine import Engine, SamplingParams, default_model_path
from engine.healing import Healing
from engine.sampler import denoise

PREFIX, SUFFIX = [5, 6, 7], [8, 9]
TEXT = {30: "\n   ", 31: " return", 32: "\n    ", 34: " x", 35: "\n", 40: "foo", 41: "bar", 50: " res", 51: " result"}
"""What each scripted token id "writes" (ids the tokenizer double knows)."""


def healing(removed: str) -> Healing:
    by_text = {text: i for i, text in TEXT.items()}
    return Healing(removed, lambda i: TEXT.get(i, ""), lambda text: [by_text[text]] if text in by_text else [])


def test_compatible_tokens_extend_or_start_the_removed_text():
    h = healing(" res")
    assert h.compatible(51, " res") and h.compatible(50, " res")  # " result" extends it, " res" is it
    assert not h.compatible(40, " res") and not h.compatible(99, " res")  # other text; a special token (no text)
    assert h.choose([], [40, 51]) == (51, 1)  # the best compatible candidate, with its rank
    assert h.choose([], [40, 41]) == (50, None)  # none: the removed text's own token
    assert h.remaining([51]) == "" and not h.pending([51])
    h = healing("\n    ")
    assert h.remaining([30]) == " " and h.pending([30])  # "\n   " wrote all but one space


def test_healed_slots_are_committed_first_left_to_right_then_the_rest_in_parallel():
    # slots 2 and 3 are confident at once, but the healing slots go first, one per step
    d = ScriptedDenoiser({4: beliefs((30, 0.6), (31, 0.5), (34, 0.95), (35, 0.99))})
    params = SamplingParams(lengths=(4,), threshold=0.9)
    r = denoise(d, PREFIX, SUFFIX, params, healing=healing("\n    "))
    assert r.ids == [30, 31, 34, 35]
    assert [s[0, 1:].tolist() for s in d.states[1:]] == [[30, MASK, MASK, MASK], [30, 31, MASK, MASK]]
    assert r.stats["steps"] == 3
    assert r.confidence[:2] == [0.6000000238418579, 0.5]  # the model's probabilities of the healed tokens


def test_the_line_break_stop_ignores_the_healed_text():
    # the healed token "\n   " holds a line break: the middle must not end there
    d = ScriptedDenoiser({4: beliefs((30, 0.6), (31, 0.5), (34, 0.95), (35, 0.99))})
    params = SamplingParams(lengths=(4,), threshold=0.9, stop_at_line_break=True)
    r = denoise(d, PREFIX, SUFFIX, params, line_break_ids=frozenset({30, 35}), healing=healing("\n    "))
    assert r.ids == [30, 31, 34, 35]


def test_no_compatible_candidate_falls_back_to_the_removed_token():
    d = ScriptedDenoiser({3: beliefs((40, 0.9), (34, 0.95), (35, 0.99))})
    r = denoise(d, PREFIX, SUFFIX, SamplingParams(lengths=(3,), threshold=0.9), healing=healing(" res"))
    assert r.ids == [50, 34, 35]
    assert r.confidence[0] == 1.0 and not r.candidates[0].by_model[0]  # the user's text, not the model's choice


def test_the_shipped_model_writes_no_stray_space_after_indentation():
    """Without healing the prefix ends with the token "\\n    ", after which the model writes " return"."""
    engine = Engine.load(default_model_path(), "cpu")
    prefix, suffix = "import os\n\n\ndef greet(name):\n    ", "\n\n\ndef main():\n    pass\n"
    params = SamplingParams(lengths=(10,), stop_at_line_break=True)
    plain = engine.complete(prefix, suffix, params)
    healed = engine.complete(prefix, suffix, params, heal=True)
    assert plain.text.startswith(" ") and plain.healed == ""
    assert healed.healed == "\n    " and healed.text.strip() and not healed.text.startswith(" ")
    assert healed.stats["healed"] == "\n    "
    # every token's end lies inside the text; tokens of the healed part end at 0
    assert healed.token_ends == sorted(healed.token_ends) and healed.token_ends[-1] == len(healed.text)
    assert healed.token_ends[0] == 0


def test_token_ends_give_a_character_to_the_token_that_completes_it():
    engine = Engine.load(default_model_path(), "cpu")
    ids = engine.tokenizer.encode(" resé😋 = 1")  # byte-level pieces for é and 😋
    text, ends, healed_tokens = engine._decode_middle(ids, " res")
    assert text == "é😋 = 1" and healed_tokens == 1
    assert [engine.tokenizer.decode([i]) for i in ids] == [" res", *["\ufffd"] * 5, " =", " 1"]
    # é is complete after the 2nd byte-piece, 😋 after the 5th: the pieces before end where the text did
    assert ends == [0, 0, 1, 1, 1, 2, 4, 6]
