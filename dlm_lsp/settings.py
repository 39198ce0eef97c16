"""The ``dlm`` settings section: one typed home, documented defaults, validated at the boundary.

Settings arrive from ``initializationOptions``, ``workspace/configuration`` and
``workspace/didChangeConfiguration`` as JSON. :func:`parse_settings` turns them into
a :class:`Settings`; every invalid value is replaced by its default and reported
(the server shows the messages with ``window/showMessage``, naming the key).
Keys use VS Code's camelCase (``dlm.latencyBudgetMs``); snake_case is accepted too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

BACKENDS = ("auto", "tensorrt", "cuda", "cpu")
MULTILINE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class Settings:
    """Every user-facing setting of the server, with its default."""

    model: str = ""
    """Engine folder to load; empty = the default model that ships with dlm-lsp."""
    backend: str = "auto"
    """Runtime: auto | tensorrt | cuda | cpu."""
    latency_budget_ms: float = 150.0
    """Hard deadline of one completion; at the deadline the committed part is returned."""
    max_middle_tokens: int = 64
    """Longest middle the engine may write."""
    length_candidates: tuple[int, ...] = (8, 16, 32, 64)
    """Candidate middle lengths (tokens) of a multi-line middle, tried in one batch; capped by max_middle_tokens."""
    single_line_length_candidates: tuple[int, ...] = (10,)
    """Candidate lengths of a single-line middle. One slot of 10 tokens, measured with the shipped
    model against (8, 16): edit similarity +0.03 (HumanEval) / +0.04 (held-out), empty suggestions
    11 -> 0 of 300, p50 +8 ms (the model ends short spans too early; see docs/engine.md, "Single-line length")."""
    confidence_threshold: float = 0.9
    """Commit every masked position at least this confident in a denoising step."""
    tokens_per_step: int = 1
    """Commit at least this many positions per denoising step (the most confident). More is faster
    but, with the shipped model, much worse: single-line p50 52 -> 42 / 37 ms and HumanEval
    single-line pass@1 2.4 -> 1.7 / 0.2 % at 2 / 3 (see docs/engine.md, "Tokens per step")."""
    min_confidence: float = 0.3
    """Show only the leading part of a suggestion whose tokens the model committed with at least this
    probability, and only when inserting it keeps the indentation and the parse (see ``dlm_lsp.gate``);
    0 shows everything. Calibrated for the shipped model in docs/quality.md."""
    token_healing: bool = True
    """Back the prefix up to a token boundary and have the model write the removed text again
    (``engine.healing``): no stray spaces after indentation, whole identifiers."""
    debounce_ms: int = 75
    """Wait this long after the last keystroke before asking the model (automatic triggers only)."""
    enable: Mapping[str, bool] = field(default_factory=lambda: {"*": True, "plaintext": False, "markdown": False})
    """Per-language switch; ``"*"`` is the fallback."""
    multiline: str = "auto"
    """auto (decided from syntax) | always | never."""
    prefix_tokens: int = 192
    """Token budget of the text before the cursor."""
    suffix_tokens: int = 48
    """Token budget of the text after the cursor."""
    other_files: bool = True
    """Add snippets from other open documents of the same language."""
    other_files_tokens: int = 64
    """Token budget of those snippets (taken from the prefix budget's share of the window)."""
    metrics: bool = True
    """Count shown/accepted suggestions locally (never sent anywhere)."""

    def enabled_for(self, language_id: str) -> bool:
        """Whether completions are on for ``language_id``."""
        return bool(self.enable.get(language_id, self.enable.get("*", True)))

    def lengths(self, multiline: bool = True) -> tuple[int, ...]:
        """Candidate lengths of a multi-line or single-line middle within ``max_middle_tokens`` (at least one)."""
        candidates = self.length_candidates if multiline else self.single_line_length_candidates
        kept = tuple(n for n in candidates if n <= self.max_middle_tokens)
        return kept or (self.max_middle_tokens,)


SECTION = "dlm"
CLIENT_ONLY = frozenset({"server"})
"""Keys of the section that belong to the editor client (``dlm.server.path``/``args``): ignored silently."""

_ALIASES = {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), f.name): f.name for f in fields(Settings)}
_ALIASES.update({"latencyBudget": "latency_budget_ms", "multiLine": "multiline", "enabled": "enable"})


def _check(name: str, value: Any, default: Any) -> Any:
    """Validated value for field ``name`` or raise ValueError with the reason."""
    if name in ("model",):
        if not isinstance(value, str):
            raise ValueError("expected a folder path (string)")
        return value
    if name == "backend":
        if value not in BACKENDS:
            raise ValueError(f"expected one of {', '.join(BACKENDS)}")
        return value
    if name == "multiline":
        if value not in MULTILINE_MODES:
            raise ValueError(f"expected one of {', '.join(MULTILINE_MODES)}")
        return value
    if name in ("other_files", "metrics", "token_healing"):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if name == "enable":
        if isinstance(value, bool):
            return {"*": value}
        if not isinstance(value, Mapping) or not all(isinstance(v, bool) for v in value.values()):
            raise ValueError('expected a map of language ids to true/false, like {"*": true, "markdown": false}')
        return {**default, **dict(value)} if "*" not in value else dict(value)
    if name in ("length_candidates", "single_line_length_candidates"):
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 512 for v in value):
            raise ValueError("expected a non-empty list of token counts between 1 and 512")
        return tuple(sorted(set(value)))
    if name == "min_confidence":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError("expected a number in [0, 1] (0 shows every suggestion)")
        return float(value)
    if name == "confidence_threshold":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError("expected a number in (0, 1]")
        return float(value)
    if name == "tokens_per_step":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 512:
            raise ValueError("expected a whole number between 1 and 512")
        return value
    limits = {
        "latency_budget_ms": (1, 60_000),
        "max_middle_tokens": (1, 512),
        "debounce_ms": (0, 5_000),
        "prefix_tokens": (0, 32_768),
        "suffix_tokens": (0, 32_768),
        "other_files_tokens": (0, 8_192),
    }
    low, high = limits[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"expected a number between {low} and {high}")
    return type(default)(value)


def parse_settings(raw: Any, base: Settings | None = None) -> tuple[Settings, list[str]]:
    """Settings from a JSON object (the ``dlm`` section, or an object holding it).

    Returns the settings and one message per rejected or unknown key; rejected
    values fall back to their default.
    """
    base = base or Settings()
    if raw is None:
        return base, []
    if isinstance(raw, Mapping) and isinstance(raw.get(SECTION), Mapping):
        raw = raw[SECTION]
    if not isinstance(raw, Mapping):
        return base, [f"{SECTION}: expected an object of settings, got {type(raw).__name__}; using defaults"]
    defaults = Settings()
    changes: dict[str, Any] = {}
    problems = []
    for key, value in raw.items():
        if key in CLIENT_ONLY:
            continue
        name = _ALIASES.get(key, key if key in Settings.__dataclass_fields__ else None)
        if name is None:
            problems.append(f"{SECTION}.{key}: unknown setting (ignored)")
            continue
        if value is None:
            changes[name] = getattr(defaults, name)
            continue
        try:
            changes[name] = _check(name, value, getattr(defaults, name))
        except ValueError as exc:
            changes[name] = getattr(defaults, name)
            problems.append(f"{SECTION}.{key}: {value!r} is invalid ({exc}); using the default {getattr(defaults, name)!r}")
    return replace(base, **changes), problems
