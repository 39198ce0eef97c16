"""The dlm settings section: defaults, aliases, validation and fallbacks."""

from __future__ import annotations

import pytest

from dlm_lsp.settings import Settings, parse_settings


def test_defaults():
    s, problems = parse_settings(None)
    assert s == Settings() and problems == []
    assert s.enabled_for("python") and not s.enabled_for("markdown") and not s.enabled_for("plaintext")
    assert s.lengths() == (8, 16, 32, 64) and s.lengths(multiline=False) == (10,)


def test_camel_case_and_section_wrapper():
    s, problems = parse_settings({"dlm": {"latencyBudgetMs": 80, "lengthCandidates": [32, 8, 8], "multiline": "never",
                                          "enable": {"*": False, "python": True}, "otherFiles": False}})
    assert problems == []
    assert s.latency_budget_ms == 80.0 and s.length_candidates == (8, 32) and s.multiline == "never"
    assert s.enabled_for("python") and not s.enabled_for("go") and s.other_files is False


def test_snake_case_accepted():
    s, problems = parse_settings({"latency_budget_ms": 40, "max_middle_tokens": 16})
    assert problems == [] and s.latency_budget_ms == 40 and s.lengths() == (8, 16)


def test_single_line_candidates_are_their_own_setting_capped_like_the_others():
    s, problems = parse_settings({"singleLineLengthCandidates": [24, 6], "maxMiddleTokens": 12})
    assert problems == [] and s.single_line_length_candidates == (6, 24)
    assert s.lengths(multiline=False) == (6,) and s.lengths() == (8,)
    s, _ = parse_settings({"singleLineLengthCandidates": [40], "maxMiddleTokens": 12})
    assert s.lengths(multiline=False) == (12,)  # nothing fits: the cap itself


@pytest.mark.parametrize(
    "key, value",
    [("latencyBudgetMs", -5), ("latencyBudgetMs", "fast"), ("backend", "metal"), ("confidenceThreshold", 1.5),
     ("lengthCandidates", []), ("lengthCandidates", [0]), ("singleLineLengthCandidates", [1.5]), ("multiline", "sometimes"), ("enable", {"python": "yes"}),
     ("debounceMs", True), ("model", 3), ("metrics", "on"), ("tokensPerStep", 0), ("tokensPerStep", 2.5),
     ("tokensPerStep", True), ("tokensPerStep", 513), ("spanCache", True), ("spanCache", "yes")],
)
def test_invalid_values_fall_back_and_are_named(key, value):
    s, problems = parse_settings({key: value, "suffixTokens": 10})
    assert len(problems) == 1 and problems[0].startswith(f"dlm.{key}:") and "using the default" in problems[0]
    field = {"latencyBudgetMs": "latency_budget_ms", "backend": "backend", "confidenceThreshold": "confidence_threshold",
             "lengthCandidates": "length_candidates",
             "singleLineLengthCandidates": "single_line_length_candidates", "multiline": "multiline", "enable": "enable",
             "debounceMs": "debounce_ms", "model": "model", "metrics": "metrics", "tokensPerStep": "tokens_per_step",
             "spanCache": "span_cache"}[key]
    assert getattr(s, field) == getattr(Settings(), field)
    assert s.suffix_tokens == 10  # the valid key still applies


def test_unknown_key_and_non_object():
    s, problems = parse_settings({"turbo": True})
    assert s == Settings() and problems == ["dlm.turbo: unknown setting (ignored)"]
    s, problems = parse_settings(["nope"])
    assert s == Settings() and "expected an object" in problems[0]


def test_enable_map_keeps_default_fallback_and_bool_shortcut():
    s, _ = parse_settings({"enable": {"markdown": True}})
    assert s.enabled_for("markdown") and s.enabled_for("python") and not s.enabled_for("plaintext")
    s, _ = parse_settings({"enable": False})
    assert not s.enabled_for("python")


def test_client_only_keys_are_ignored_silently():
    settings, problems = parse_settings({"dlm": {"server": {"path": "/x/dlm-lsp", "args": []}, "latencyBudgetMs": 90}})
    assert problems == [] and settings.latency_budget_ms == 90


def test_the_request_uses_the_candidates_of_its_kind_and_the_decoding_settings():
    from dlm_lsp.completion import sampling_params

    s, _ = parse_settings({"singleLineLengthCandidates": [12], "lengthCandidates": [8, 32], "latencyBudgetMs": 90})
    single = sampling_params(s, multiline=False, budget_ms=80.0)
    assert single.lengths == (12,) and (single.threshold, single.tokens_per_step) == (0.9, 1)
    assert single.stop_at_line_break  # only the first line is shown: stop once it is written
    multi = sampling_params(s, multiline=True, budget_ms=80.0)
    assert multi.lengths == (8, 32) and multi.budget_ms == 80.0 and not multi.stop_at_line_break
    s, problems = parse_settings({"confidenceThreshold": 0.95, "tokensPerStep": 3})
    chosen = sampling_params(s, multiline=False, budget_ms=None)
    assert problems == [] and (chosen.threshold, chosen.tokens_per_step) == (0.95, 3)
    assert chosen.cached_span is None  # spanCache auto: the engine decides by model size and middle length
    for mode, cached in (("on", True), ("off", False)):
        s, problems = parse_settings({"spanCache": mode})
        assert problems == [] and sampling_params(s, multiline=True, budget_ms=None).cached_span is cached


@pytest.mark.parametrize(
    "key, value, accepted",
    [
        ("confidenceThreshold", 0, False), ("confidenceThreshold", 1, True),  # above 0, up to 1
        ("minConfidence", 0, True), ("minConfidence", 1.01, False),
        ("debounceMs", 0, True), ("debounceMs", 5000, True), ("debounceMs", 5001, False),
        ("maxMiddleTokens", 3.0, True), ("maxMiddleTokens", 2.5, False),  # whole numbers only
        ("lengthCandidates", [1, 512], True), ("lengthCandidates", [513], False), ("lengthCandidates", [2.5], False),
        ("tokenHealing", 1, False), ("model", 3, False), ("multiline", "sometimes", False),
        ("maxMiddleTokens", 10**400, False), ("lengthCandidates", [10**400], False),  # beyond float: no OverflowError
    ],
)
def test_every_rule_is_enforced_at_its_edges(key, value, accepted):
    settings, problems = parse_settings({key: value})
    assert (problems == []) is accepted, problems
    if not accepted:
        assert problems[0].startswith(f"dlm.{key}: ") and "using the default" in problems[0]


def test_range_messages_say_what_is_expected():
    _, problems = parse_settings({"debounceMs": -1, "confidenceThreshold": 0})
    assert "expected a whole number from 0 to 5000" in problems[0]
    assert "expected a number above 0 to 1" in problems[1]


def test_the_threads_setting_reaches_the_runtime_and_reloads_the_model(tiny_engine):
    """``threads``: 0 keeps the engine's default (one thread for a small model); a number is what ONNX
    Runtime runs each op on; changing it is a reason to load the model again."""
    from dlm_lsp.model_host import ModelHost

    settings, problems = parse_settings({"threads": 2})
    assert problems == [] and settings.threads == 2
    assert parse_settings({"threads": -1})[1]  # refused, with a message
    host = ModelHost()

    def intra_op(engine):  # type: ignore[no-untyped-def]
        return engine.denoiser.sessions["context"].get_session_options().intra_op_num_threads

    assert intra_op(host.load_now(str(tiny_engine), "cpu", settings.threads)) == 2
    assert not host.wants_reload(str(tiny_engine), "cpu", threads=2)
    assert host.wants_reload(str(tiny_engine), "cpu", threads=0)
    assert intra_op(host.load_now(str(tiny_engine), "cpu")) == 1
