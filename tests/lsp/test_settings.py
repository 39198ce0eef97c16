"""The dlm settings section: defaults, aliases, validation and fallbacks."""

from __future__ import annotations

import pytest

from dlm_lsp.settings import Settings, parse_settings


def test_defaults():
    s, problems = parse_settings(None)
    assert s == Settings() and problems == []
    assert s.enabled_for("python") and not s.enabled_for("markdown") and not s.enabled_for("plaintext")
    assert s.lengths() == (8, 16, 32, 64)


def test_camel_case_and_section_wrapper():
    s, problems = parse_settings({"dlm": {"latencyBudgetMs": 80, "lengthCandidates": [32, 8, 8], "multiline": "never",
                                          "enable": {"*": False, "python": True}, "otherFiles": False}})
    assert problems == []
    assert s.latency_budget_ms == 80.0 and s.length_candidates == (8, 32) and s.multiline == "never"
    assert s.enabled_for("python") and not s.enabled_for("go") and s.other_files is False


def test_snake_case_accepted():
    s, problems = parse_settings({"latency_budget_ms": 40, "max_middle_tokens": 16})
    assert problems == [] and s.latency_budget_ms == 40 and s.lengths() == (8, 16)


@pytest.mark.parametrize(
    "key, value",
    [("latencyBudgetMs", -5), ("latencyBudgetMs", "fast"), ("backend", "metal"), ("confidenceThreshold", 1.5),
     ("lengthCandidates", []), ("lengthCandidates", [0]), ("multiline", "sometimes"), ("enable", {"python": "yes"}),
     ("debounceMs", True), ("model", 3), ("metrics", "on")],
)
def test_invalid_values_fall_back_and_are_named(key, value):
    s, problems = parse_settings({key: value, "suffixTokens": 10})
    assert len(problems) == 1 and problems[0].startswith(f"dlm.{key}:") and "using the default" in problems[0]
    field = {"latencyBudgetMs": "latency_budget_ms", "backend": "backend", "confidenceThreshold": "confidence_threshold",
             "lengthCandidates": "length_candidates", "multiline": "multiline", "enable": "enable",
             "debounceMs": "debounce_ms", "model": "model", "metrics": "metrics"}[key]
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
