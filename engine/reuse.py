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
nearest to the change, which the change moves the most. Each entry counts the partial
passes it has been reused in since it was computed, and none is reused in more than
``max_age`` in a row: each partial pass also recomputes the stalest ``1/max_age`` of the
window (nearest the cursor first among equals), so the whole window is refreshed a share
at a time and no keystroke pays for all of it. The whole window is encoded again only
when more than ``max_fresh`` tokens changed, too little is left to reuse, or the prefix
no longer aligns. How often the suggestion's first line then differs from a full pass's
is measured by ``scripts/reuse_replay.py`` (docs/engine.md, "Context reuse"), which chose
the defaults: the cheapest policy measured that keeps 98 % of first lines identical where
only the approximation can change them (fp32 graphs).
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
    max_age: int = 32
    """Partial passes in a row an entry may be reused in; each partial pass recomputes the stalest
    ``1/max_age`` of the window, so that none goes past it."""
    max_fresh: int = 256
    """More tokens to compute than this (the change and its bands): encode the whole window."""
    min_reused: int = 32
    """Fewer tokens to reuse than this: encode the whole window (the saving would be small)."""
    capacity: int = 8
    """Documents remembered (least recently used forgotten first)."""

    def keystroke_tokens(self, window: int) -> int:
        """Context tokens a partial pass computes while the user types in a ``window``-token window:
        the typed token, the bands and the refreshing share (the 0.5B replay measured a median of 151
        at 1,024 tokens, where this gives 161)."""
        return 1 + 2 * self.band + -(-window // self.max_age)

    def __post_init__(self) -> None:
        for name in ("band", "max_age", "max_fresh", "min_reused", "capacity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_age < 1:
            raise ValueError(f"max_age must be at least 1, got {self.max_age}")


@dataclass
class _State:
    prefix: np.ndarray
    """The whole prefix (the cache holds it without a shifted model's anchor, the last token)."""
    suffix: np.ndarray
    cache: Any
    """Keys and values of ``prefix`` then ``suffix``, in that order (the layout span steps use)."""
    stale: np.ndarray
    """Per entry of ``cache``: the partial passes it has been reused in since it was computed."""


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


def layout(runs: tuple[Run, Run], cached_prefix: int, suffix: int, old_cached_prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """The reused runs over the new cache's layout (``cached_prefix`` prefix entries, then ``suffix``):
    which entries are kept, and where each kept one is in the old cache (-1 elsewhere)."""
    kept = np.zeros(cached_prefix + suffix, bool)
    old_index = np.full(cached_prefix + suffix, -1, np.int64)
    for run, offset, old_offset in ((runs[0], 0, 0), (runs[1], cached_prefix, old_cached_prefix)):
        kept[offset + run.start : offset + run.end] = True
        old_index[offset + run.start : offset + run.end] = old_offset + run.old_start + np.arange(len(run))
    return kept, old_index


def refreshed(kept: np.ndarray, ages: np.ndarray, cursor: int, max_age: int) -> np.ndarray:
    """``kept`` less the entries to compute again: every entry that would be reused past ``max_age``
    partial passes, and at least ``ceil(len(kept) / max_age)`` of the stalest (``ages``: the passes each
    would have been reused in, with this one), nearest the ``cursor`` (an index of the layout) first among
    equals. At that rate every entry is refreshed within ``max_age`` passes while the window is typed in."""
    candidates = np.flatnonzero(kept)
    if len(candidates) == 0:
        return kept
    share = -(-len(kept) // max_age)
    due = int((ages[candidates] > max_age).sum())
    distance = np.abs(candidates - cursor + 0.5)
    order = candidates[np.lexsort((distance, -ages[candidates]))]
    out = kept.copy()
    out[order[: max(share, due)]] = False
    return out


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
        plan = None
        if old is not None:
            runs = banded(prefix_run(old.prefix, prefix), suffix_run(old.suffix, suffix), old, prefix, suffix, anchor,
                          self.policy.band)
            kept, old_index = layout(runs, len(prefix) - anchor, len(suffix), len(old.prefix) - anchor)
            fresh = context - int(kept.sum())
            if fresh <= self.policy.max_fresh and context - fresh >= self.policy.min_reused:
                # the passes each entry will have been reused in; the same window again (nothing
                # changed, as after a prime) makes nothing staler and refreshes nothing
                ages = np.zeros(len(kept), np.int32)
                ages[kept] = old.stale[old_index[kept]] + (fresh > 0)
                if fresh:
                    kept = refreshed(kept, ages, len(prefix) - anchor, self.policy.max_age)
                plan = kept, old_index, np.where(kept, ages, 0).astype(np.int32)
        if plan is None or old is None:
            cache, first = self._full(denoiser, prefix, suffix, span, anchor, mask_id)
            reused, stale = 0, np.zeros(context, np.int32)
        else:
            kept, old_index, stale = plan
            cache, first = self._partial(denoiser, old, kept, old_index, prefix, suffix, span, anchor, mask_id)
            reused = int(kept.sum())
        with self._lock:
            self._states[key] = _State(prefix, suffix, cache, stale)
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
        self, denoiser: Denoiser, old: _State, kept: np.ndarray, old_index: np.ndarray, prefix: np.ndarray,
        suffix: np.ndarray, span: int, anchor: int, mask_id: int,
    ) -> tuple[Any, StepOutput]:
        """Compute the context entries not ``kept`` (and the anchor and span) against the reused ones."""
        p, cp = len(prefix), len(prefix) - anchor
        where = np.concatenate([np.arange(cp), p + span + np.arange(len(suffix))])  # each context token's position
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
