"""Context reuse across keystrokes: the next request of a document encodes only what changed.

A completion's context pass runs every token of the window through the model; at a real
size and a real window that is most of a keystroke's latency, although between two
keystrokes almost all of the window is the same text. Per document (a key the caller
gives, :meth:`engine.Engine.complete`'s ``reuse``), a :class:`ContextStore` keeps the last
context pass's cache (every context token's pre-rotary keys and values) and its tokens.
The next request of that document is aligned with it:

* the **prefix** is matched after the window start moved (a long file's window slides as
  the user types: the old prefix is searched for the new one's first tokens) and up to
  the first token that differs;
* the **suffix** is matched from its start and, past a change there (the token under
  the cursor, deleted text), by searching the old suffix for the new one's next tokens;
  tokens that entered at the window's end are computed.

The tokens that changed, a **refresh band** of ``band`` tokens on each side of them, and
the masked span go through the context pass with every reused entry as prior context
(``prior_keys``/``prior_values`` of the context graph, keys rotated to their new
positions, so moved text is placed right). Since attention is bidirectional, a reused
entry is stale: it was computed next to the old text. This is the DualCache
approximation of Fast-dLLM carried across requests; the band recomputes the entries
nearest to the change, which the change moves the most, and after ``max_age`` partial
passes in a row (or when more than ``max_fresh`` tokens changed, or too little is left to
reuse) the whole window is encoded again. How often the suggestion's first line then
differs from a full pass's is measured by ``scripts/reuse_replay.py`` (docs/engine.md,
"Context reuse"), which chose the defaults: the cheapest policy measured that keeps 98 %
of first lines identical where only the approximation can change them (fp32 graphs).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.backends.base import Denoiser, Prior, StepOutput

ALIGN_TOKENS = 8
"""The new prefix's first tokens searched for in the old one (where the window now starts)."""
MAX_ALIGNMENTS = 16
"""Places in the old prefix tried when those tokens occur several times."""
ALIGN_SKIP = 16
"""New prefix tokens skipped at most (tokenized differently where the window was cut) before giving up."""


@dataclass(frozen=True)
class ReusePolicy:
    """When and how much of the previous context pass to reuse."""

    band: int = 64
    """Tokens recomputed on each side of what changed."""
    max_age: int = 4
    """Partial passes in a row before the whole window is encoded again."""
    max_fresh: int = 256
    """More tokens to compute than this (the change and its bands): encode the whole window."""
    min_reused: int = 32
    """Fewer tokens to reuse than this: encode the whole window (the saving would be small)."""
    capacity: int = 8
    """Documents remembered (least recently used forgotten first)."""

    def __post_init__(self) -> None:
        for name in ("band", "max_age", "max_fresh", "min_reused", "capacity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass
class _State:
    prefix: np.ndarray
    """The whole prefix (the cache holds it without a shifted model's anchor, the last token)."""
    suffix: np.ndarray
    cache: Any
    """Keys and values of ``prefix`` then ``suffix``, in that order (the layout span steps use)."""
    age: int
    """Partial passes since the last full one."""


@dataclass(frozen=True)
class Run:
    """Tokens ``[start, end)`` of the new prefix or suffix are the old one's from ``old_start`` on."""

    start: int
    end: int
    old_start: int

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def _common_start(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _find(old: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Where ``window`` occurs in ``old`` (start indices)."""
    if len(window) == 0 or len(old) < len(window):
        return np.zeros(0, np.int64)
    views = np.lib.stride_tricks.sliding_window_view(old, len(window))
    return np.flatnonzero((views == window).all(axis=1))


def prefix_run(old: np.ndarray, new: np.ndarray) -> Run:
    """The run the new prefix shares with the old one from (near) its start: the window's start may
    have moved on (the old prefix is searched for the new one's first tokens), and it ends at the
    first token that differs. Where the window is cut, the text is tokenized afresh and the first
    tokens can come out differently (a cut inside a run of spaces, say): the search then starts a
    few tokens in, and those first tokens are computed."""
    if len(new) == 0 or len(old) == 0:
        return Run(0, 0, 0)
    w = min(ALIGN_TOKENS, len(new))
    for v in range(0, min(ALIGN_SKIP, len(new) - w) + 1):
        hits = _find(old, new[v : v + w])
        if len(hits):
            # repeated code can match in several places: the one that keeps the most
            shift = max((int(h) for h in hits[:MAX_ALIGNMENTS]), key=lambda h: _common_start(old[h:], new[v:]))
            return Run(v, v + _common_start(old[shift:], new[v:]), shift)
    return Run(0, 0, 0)


def suffix_run(old: np.ndarray, new: np.ndarray) -> Run:
    """The run the new suffix shares with the old one: from its start when that is unchanged, else
    past the change there (the token under the cursor, deleted text), found by searching the old
    suffix for the new one's next tokens. It ends where they differ (tokens that entered at the
    window's end, where it was cut, are not in the old one)."""
    if len(new) == 0 or len(old) == 0:
        return Run(0, 0, 0)
    head = _common_start(old, new)
    if head > 0:
        return Run(0, head, 0)
    w = min(ALIGN_TOKENS, len(new))
    for v in range(0, min(ALIGN_TOKENS, len(new) - w + 1)):
        hits = _find(old, new[v : v + w])
        if len(hits):
            u = int(hits[np.argmin(np.abs(hits - v))])  # the nearest place: the text moved little
            return Run(v, v + _common_start(old[u:], new[v:]), u)
    return Run(0, 0, 0)


def banded(prefix: Run, suffix: Run, old: "_State", new_prefix: np.ndarray, new_suffix: np.ndarray, anchor: int,
           band: int) -> tuple[Run, Run]:
    """The runs to reuse: the shared runs less ``band`` tokens on each side of the cursor when the
    window changed there (the entries next to a change are the stalest), the prefix's without a
    shifted model's anchor (always computed)."""
    cached = len(new_prefix) - anchor
    prefix_same = prefix.start == 0 and prefix.end == len(new_prefix) == len(old.prefix) - prefix.old_start
    suffix_same = suffix.start == 0 and suffix.end == min(len(new_suffix), len(old.suffix))
    cut = 0 if prefix_same and suffix_same else band
    in_old_cache = len(old.prefix) - anchor - prefix.old_start + prefix.start  # the old anchor is not cached
    pre = Run(prefix.start, max(prefix.start, min(prefix.end, cached, in_old_cache) - cut), prefix.old_start)
    start = min(suffix.end, suffix.start + cut)
    return pre, Run(start, suffix.end, suffix.old_start + (start - suffix.start))


class ContextStore:
    """The last context pass of each document, and context passes that reuse it (see the module docstring).

    Thread-safe: requests of different documents may run at once (a server's scheduler, an editor's
    worker threads); a newer request of one document replaces its state.
    """

    def __init__(self, policy: ReusePolicy | None = None) -> None:
        self.policy = policy or ReusePolicy()
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._lock = threading.Lock()

    def forget(self, key: str) -> None:
        """Drop a document's state (closed, or its text replaced)."""
        with self._lock:
            self._states.pop(key, None)

    def __len__(self) -> int:
        return len(self._states)

    def encode(
        self, denoiser: Denoiser, key: str, prefix: np.ndarray, suffix: np.ndarray, span: int, anchor: int, mask_id: int
    ) -> tuple[Any, StepOutput, dict[str, Any]]:
        """The context pass of ``denoiser`` (one that ``reuses_context``) over the window ``prefix``
        + ``span`` masks + ``suffix``: what :meth:`engine.sampler.DenoisingRun.encode_context` needs
        (the cache of every context token in layout order, the span rows' first step), reusing
        ``key``'s last pass where the policy allows; and stats saying how many context tokens it
        reused and computed."""
        prefix, suffix = np.asarray(prefix, np.int64), np.asarray(suffix, np.int64)
        context = len(prefix) - anchor + len(suffix)
        with self._lock:
            old = self._states.get(key)
        runs = None
        if old is not None and old.age < self.policy.max_age:
            runs = banded(prefix_run(old.prefix, prefix), suffix_run(old.suffix, suffix), old, prefix, suffix, anchor,
                          self.policy.band)
            reused = len(runs[0]) + len(runs[1])
            if context - reused > self.policy.max_fresh or reused < self.policy.min_reused:
                runs = None
        if runs is None or old is None:
            cache, first = self._full(denoiser, prefix, suffix, span, anchor, mask_id)
            age, reused = 0, 0
        else:
            cache, first = self._partial(denoiser, old, runs, prefix, suffix, span, anchor, mask_id)
            reused = len(runs[0]) + len(runs[1])
            age = old.age + (reused < context)  # nothing recomputed (the same window again): no staler
        with self._lock:
            self._states[key] = _State(prefix, suffix, cache, age)
            self._states.move_to_end(key)
            while len(self._states) > self.policy.capacity:
                self._states.popitem(last=False)
        return cache, first, {"context_reused": reused, "context_computed": context - reused}

    def _full(
        self, denoiser: Denoiser, prefix: np.ndarray, suffix: np.ndarray, span: int, anchor: int, mask_id: int
    ) -> tuple[Any, StepOutput]:
        p = len(prefix)
        ids = np.concatenate([prefix, np.full(span, mask_id, np.int64), suffix])
        cache_index = np.concatenate([np.arange(p - anchor), p + span + np.arange(len(suffix))])
        return denoiser.encode_context(ids, np.arange(len(ids)), cache_index, np.arange(p - anchor, p + span))

    def _partial(
        self, denoiser: Denoiser, old: _State, runs: tuple[Run, Run], prefix: np.ndarray, suffix: np.ndarray,
        span: int, anchor: int, mask_id: int,
    ) -> tuple[Any, StepOutput]:
        """Compute what the runs do not cover (and the anchor and span) against the reused entries."""
        p, cp = len(prefix), len(prefix) - anchor
        n_old_prefix = len(old.prefix) - anchor  # the old cache holds its prefix without the anchor
        where = np.concatenate([np.arange(cp), p + span + np.arange(len(suffix))])  # each context token's position
        kept = np.zeros(cp + len(suffix), bool)
        old_index = np.full(cp + len(suffix), -1, np.int64)
        for run, offset, old_offset in ((runs[0], 0, 0), (runs[1], cp, n_old_prefix)):
            kept[offset + run.start : offset + run.end] = True
            old_index[offset + run.start : offset + run.end] = old_offset + run.old_start + np.arange(len(run))
        tokens = np.concatenate([prefix[:cp], suffix])
        fresh_pre = np.flatnonzero(~kept[:cp])
        fresh_suf = cp + np.flatnonzero(~kept[cp:])
        ids = np.concatenate([tokens[fresh_pre], prefix[cp:], np.full(span, mask_id, np.int64), tokens[fresh_suf]])
        positions = np.concatenate([where[fresh_pre], np.arange(cp, p + span), where[fresh_suf]])
        n_pre = len(fresh_pre)
        cache_index = np.concatenate([np.arange(n_pre), n_pre + anchor + span + np.arange(len(fresh_suf))])
        span_index = np.arange(n_pre, n_pre + anchor + span)
        prior = Prior(old.cache, old_index[kept], where[kept])
        fresh, first = denoiser.encode_context(  # type: ignore[call-arg]
            ids, positions, cache_index, span_index, prior=prior
        )
        # the cache in layout order: runs of reused entries (old cache) and computed ones (fresh cache)
        fresh_index = np.cumsum(~kept) - 1  # a computed token's index in the fresh cache
        parts: list[tuple[Any, np.ndarray]] = []
        edges = np.flatnonzero(np.diff(kept.astype(np.int8))) + 1
        for lo, hi in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(kept)]])):
            if hi > lo:
                parts.append((old.cache, old_index[lo:hi]) if kept[lo] else (fresh, fresh_index[lo:hi]))
        return denoiser.join(parts), first  # type: ignore[attr-defined]
