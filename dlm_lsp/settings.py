"""The ``dlm`` settings section: one typed home, documented defaults, validated at the boundary.

Settings arrive from ``initializationOptions``, ``workspace/configuration`` and
``workspace/didChangeConfiguration`` as JSON. :func:`parse_settings` turns them into
a :class:`Settings`; every invalid value is replaced by its default and reported
(the server shows the messages with ``window/showMessage``, naming the key).
Keys use VS Code's camelCase (``dlm.latencyBudgetMs``); snake_case is accepted too.

Each field carries its :class:`Rule` (type, range, choices) beside its default:
validation is derived from it, and a test checks the VS Code schema
(``editors/vscode/package.json``) against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Mapping

from engine import MULTI_LINE_LENGTHS, SERVING_BACKENDS, SINGLE_LINE_LENGTHS, SPAN_CACHE_MODES

MULTILINE_MODES = ("auto", "always", "never")
MAX_TOKENS = 512
"""Longest middle, and longest candidate length, a setting may ask for."""


@dataclass(frozen=True)
class Rule:
    """What values a setting takes (the JSON schema VS Code shows is checked against this)."""

    kind: Literal["string", "choice", "boolean", "number", "integer", "lengths", "enable"]
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    """``minimum`` itself is not allowed."""
    choices: tuple[str, ...] = ()
    what: str = ""
    """How an error names the expected value, when the type alone does not say it."""

    def check(self, value: Any, default: Any) -> Any:
        """``value`` converted to the setting's type, or ValueError saying what is expected."""
        if self.kind == "string":
            if not isinstance(value, str):
                raise ValueError(f"expected {self.what or 'a string'}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"expected one of {', '.join(self.choices)}")
            return value
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if self.kind == "enable":
            if isinstance(value, bool):
                return {"*": value}
            if not isinstance(value, Mapping) or not all(isinstance(v, bool) for v in value.values()):
                raise ValueError('expected a map of language ids to true/false, like {"*": true, "markdown": false}')
            return {**default, **dict(value)} if "*" not in value else dict(value)
        if self.kind == "lengths":
            if not isinstance(value, (list, tuple)) or not value or not all(self._is_integer(v) and self._in_range(v) for v in value):
                raise ValueError(f"expected a non-empty list of token counts between {self._range()}")
            return tuple(sorted({int(v) for v in value}))
        if not (self._is_integer(value) if self.kind == "integer" else self._is_number(value)) or not self._in_range(value):
            hint = f"; {self.what}" if self.what else ""
            raise ValueError(f"expected {'a whole number' if self.kind == 'integer' else 'a number'} {self._range()}{hint}")
        return int(value) if self.kind == "integer" else float(value)

    @staticmethod
    def _is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    @staticmethod
    def _is_integer(value: Any) -> bool:
        if isinstance(value, float):
            return value.is_integer()
        return isinstance(value, int) and not isinstance(value, bool)

    def _in_range(self, value: float) -> bool:
        low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
        return low_ok and (self.maximum is None or value <= self.maximum)

    def _range(self) -> str:
        low = "" if self.minimum is None else f"{'above' if self.exclusive_minimum else 'from'} {self.minimum:g}"
        high = "" if self.maximum is None else f"to {self.maximum:g}"
        return " ".join(part for part in (low, high) if part) or "(any)"


def _setting(default: Any, rule: Rule) -> Any:
    """A dataclass field with its rule (mutable defaults become factories)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class Settings:
    """Every user-facing setting of the server, with its default and its :class:`Rule`."""

    model: str = _setting("", Rule("string", what="a catalog name or a folder path (a string)"))
    """A catalog name (``dlm-lsp models list``) or an engine folder; empty = the demo model that ships with dlm-lsp."""
    backend: str = _setting("auto", Rule("choice", choices=SERVING_BACKENDS))
    """Runtime: auto | tensorrt (native engines) | tensorrt-ep | cuda | cpu."""
    threads: int = _setting(0, Rule("integer", 0, 256))
    """Threads each model op runs on; 0 = automatic (1 for a small model, every core for a larger one).
    Fewer than the cores leaves the rest to the editor."""
    latency_budget_ms: float = _setting(150.0, Rule("number", 1, 60_000))
    """Hard deadline of one completion; at the deadline the committed part is returned."""
    max_middle_tokens: int = _setting(64, Rule("integer", 1, MAX_TOKENS))
    """Longest middle the engine may write."""
    length_candidates: tuple[int, ...] = _setting(MULTI_LINE_LENGTHS, Rule("lengths", 1, MAX_TOKENS))
    """Candidate middle lengths (tokens) of a multi-line middle, tried in one batch; capped by max_middle_tokens."""
    single_line_length_candidates: tuple[int, ...] = _setting(SINGLE_LINE_LENGTHS, Rule("lengths", 1, MAX_TOKENS))
    """Candidate lengths of a single-line middle: one slot of 10, as the shipped model ends short spans
    too early (measured in docs/engine.md, "Single-line length")."""
    confidence_threshold: float = _setting(0.9, Rule("number", 0, 1, exclusive_minimum=True))
    """Commit every masked position at least this confident in a denoising step."""
    tokens_per_step: int = _setting(1, Rule("integer", 1, MAX_TOKENS))
    """Commit at least this many positions per denoising step (the most confident): faster, but the
    shipped model is then much less often right (docs/engine.md, "Tokens per step")."""
    min_confidence: float = _setting(0.3, Rule("number", 0, 1, what="0 shows every suggestion"))
    """Show only the leading part of a suggestion whose tokens the model committed with at least this
    probability, and only when inserting it keeps the indentation and the parse (see ``dlm_lsp.gate``);
    0 shows everything. Calibrated for the shipped model in docs/quality.md."""
    token_healing: bool = _setting(True, Rule("boolean"))
    """Back the prefix up to a token boundary and have the model write the removed text again
    (``engine.healing``): no stray spaces after indentation, whole identifiers."""
    context_reuse: bool = _setting(True, Rule("boolean"))
    """Encode only what changed since the document's previous request, reusing the rest of its context
    pass (``engine.reuse``; an approximation: docs/engine.md, "Context reuse")."""
    span_cache: str = _setting("auto", Rule("choice", choices=tuple(SPAN_CACHE_MODES)))
    """Denoising steps compute only the still-masked slots and cache what is committed (``engine.sampler``,
    "cached span"; an approximation): auto (on for multi-line middles) | on | off."""
    debounce_ms: int = _setting(75, Rule("integer", 0, 5_000))
    """Wait this long after the last keystroke before asking the model (automatic triggers only)."""
    enable: Mapping[str, bool] = _setting({"*": True, "plaintext": False, "markdown": False}, Rule("enable"))
    """Per-language switch; ``"*"`` is the fallback."""
    multiline: str = _setting("auto", Rule("choice", choices=MULTILINE_MODES))
    """auto (decided from syntax) | always | never."""
    prefix_tokens: int = _setting(192, Rule("integer", 0, 32_768))
    """Token budget of the text before the cursor."""
    suffix_tokens: int = _setting(48, Rule("integer", 0, 32_768))
    """Token budget of the text after the cursor."""
    other_files: bool = _setting(True, Rule("boolean"))
    """Add snippets from other open documents of the same language."""
    other_files_tokens: int = _setting(64, Rule("integer", 0, 8_192))
    """Token budget of those snippets (taken from the prefix budget's share of the window)."""
    metrics: bool = _setting(True, Rule("boolean"))
    """Count shown/accepted suggestions locally (never sent anywhere)."""
    endpoint: str = _setting("", Rule("string", what="an http(s) URL such as http://127.0.0.1:8012, or empty"))
    """A dlm-serve (or another Mercury FIM API) to send completions to instead of loading a model here;
    empty = run the model in this server."""
    endpoint_key_env: str = _setting("DLM_API_KEY", Rule("string", what="the name of an environment variable"))
    """The environment variable holding the endpoint's API key (keys never go in settings)."""
    endpoint_key_file: str = _setting("", Rule("string", what="a file path, or empty"))
    """A file holding the endpoint's API key (its first line), used when the variable is unset."""

    def enabled_for(self, language_id: str) -> bool:
        """Whether completions are on for ``language_id``."""
        return bool(self.enable.get(language_id, self.enable.get("*", True)))

    def lengths(self, multiline: bool = True) -> tuple[int, ...]:
        """Candidate lengths of a multi-line or single-line middle within ``max_middle_tokens`` (at least one)."""
        candidates = self.length_candidates if multiline else self.single_line_length_candidates
        kept = tuple(n for n in candidates if n <= self.max_middle_tokens)
        return kept or (self.max_middle_tokens,)


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


SECTION = "dlm"
CLIENT_ONLY = frozenset({"server"})
"""Keys of the section that belong to the editor client (``dlm.server.path``/``args``): ignored silently."""

_ALIASES = {_camel(f.name): f.name for f in fields(Settings)}
_ALIASES.update({"latencyBudget": "latency_budget_ms", "multiLine": "multiline", "enabled": "enable"})


def rules() -> dict[str, Rule]:
    """Each setting's :class:`Rule`, by its camelCase key (as in VS Code's ``settings.json``)."""
    return {_camel(f.name): f.metadata["rule"] for f in fields(Settings)}


def _check(name: str, value: Any, default: Any) -> Any:
    """Validated value for field ``name`` or raise ValueError with the reason."""
    return Settings.__dataclass_fields__[name].metadata["rule"].check(value, default)


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
