"""The parallel fill-in-the-middle denoising loop.

Given prefix and suffix token ids, the middle starts as ``m`` mask tokens. Each
step runs one forward pass of the span and *commits* every masked position whose
confidence (top-1 probability) is at least ``threshold``, and at least
``tokens_per_step`` positions (the best by the chosen :class:`UnmaskOrder`). It
stops as soon as nothing is masked. This is the confidence-threshold parallel
decoding of Fast-dLLM (Wu et al., 2025, Alg. 1), with its DualCache: the context
is encoded once (:meth:`Denoiser.encode_context`) and each step runs only the span.
That context pass already sees the longest candidate's span fully masked, so its
outputs there *are* that candidate's first step: the first step costs no forward
pass of its own (for a single candidate; shorter ones still run theirs).
``exact=True`` instead recomputes the whole window every step (the reference).

Cached span (``cached_span``): a span step recomputes every row of the span, committed
or not, although a committed token no longer changes. In this mode a candidate's step
computes only the rows still masked, plus the tokens committed since its last step,
whose keys and values then join the candidate's cache (its context's and the earlier
commits'): the delayed caching of dKV-Cache (Ma et al., 2025), carried out with the
context graph (:meth:`Denoiser.encode_context` against a prior). A shifted model keeps a
committed token's row as long as the slot after it is masked (that row predicts it).
Like the context cache it is an approximation: a cached token does not see what is
committed after it. Each candidate runs its own pass, so it pays for long middles of one
request (the engine's default there), not for merged batches.

The middle's true length is unknown, so several candidate lengths run as one
batch against one shared context encoding. Inside a span, an end token (EOS/pad)
may only be committed at the leftmost masked slot, and the first committed end
token ends the middle: every later position becomes EOS too.
The candidate returned is the one with the best :func:`length_score`.
Length-adaptive early exit: once a candidate is finished *and* ended naturally
(an end token before its last slot, so the middle fits), every longer unfinished
candidate is abandoned; the loop does not wait for the longest span to fill up.

Budget pruning: under a budget, before each step, a candidate that cannot finish
in the time left at its own pace so far (masked slots / tokens per step x the last
step's duration) is abandoned, longest first, keeping at least the shortest. The
longest rows set the width of the batch, so each step gets cheaper, and the time
goes to a middle that can be finished instead of to several that are cut.

Line-break stop (``stop_at_line_break``, for single-line middles whose text is cut
at the first line break anyway): once every slot up to and including the first
one holding a line-break token is committed, the middle ends there and later
slots become EOS, like after an end token. Committed slots never change, so this
is exactly the first line the full run would write, in fewer steps: no step is
spent on the closing end token or on text after the break.

Token healing (``healing``, see :mod:`engine.healing`): the prefix's last token was
removed and the first slots must write its text again. Those slots are committed
first, one per step, left to right, each with the most probable compatible token
of the model's top-k (or the removed text's own token); the line-break stop looks
only at the slots after them.

Deadlines and cancellation are cooperative: between steps the loop checks the
stop callback and whether the next step would overrun the budget; if so it
returns only what was committed, up to the first still-masked position, marked
``cut``. The sampler sees token ids and a :class:`~engine.backends.base.Denoiser`,
never text or a concrete backend. Greedy (argmax) throughout, so results are
deterministic; ``seed`` drives the ``random`` order.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from engine.backends.base import Denoiser, Prior, SpanBatch, StepOutput, step_batches
from engine.errors import InputError
from engine.healing import Healing

if TYPE_CHECKING:
    from engine.scheduler import StepScheduler


MULTI_LINE_LENGTHS = (8, 16, 32, 64)
"""Default candidate lengths (tokens) of a middle of unknown length (the server's ``lengthCandidates``)."""
SPAN_CACHE_MODES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
"""The span cache's choices (the server's ``spanCache``, ``dlm-complete --span-cache``) as ``SamplingParams.cached_span``."""
SINGLE_LINE_LENGTHS = (10,)
"""Default candidate lengths of a single-line middle (the server's ``singleLineLengthCandidates``)."""
ContextEncoder = Callable[[], "tuple[Any, StepOutput, dict[str, Any]]"]
"""Runs a request's context pass its own way (:mod:`engine.reuse`): the cache of every context token in
layout order, the longest span's first step, and stats."""


def single_line(text: str) -> str:
    """What a single-line middle keeps of its text: the first line (the server shows only that, and
    ``stop_at_line_break`` ends denoising once it is written)."""
    return text.split("\n", 1)[0]


class UnmaskOrder(str, enum.Enum):
    """Which masked positions to commit first when fewer than all pass the threshold."""

    CONFIDENCE = "confidence"
    """Highest top-1 probability first (MaskGIT / Fast-dLLM)."""
    MARGIN = "margin"
    """Largest gap between the top-1 and top-2 probabilities first."""
    ENTROPY = "entropy"
    """Lowest entropy of the predictive distribution first."""
    RANDOM = "random"
    """Uniformly random (seeded), as in masked diffusion's reverse process."""
    LEFT_TO_RIGHT = "left-to-right"
    """Leftmost masked position first: with one token per step, what an autoregressive decoder does."""


@dataclass(frozen=True)
class SamplingParams:
    """Parameters of one fill-in-the-middle run."""

    lengths: tuple[int, ...] = MULTI_LINE_LENGTHS
    """Candidate middle lengths in tokens, run as one batch; a single value fixes the length."""
    threshold: float = 0.9
    """Commit every masked position with top-1 probability >= threshold. 1.0 disables parallel commits."""
    tokens_per_step: int = 1
    """Commit at least this many positions per step (the best by ``order``)."""
    order: UnmaskOrder = UnmaskOrder.CONFIDENCE
    """Ranking of masked positions for the minimum commit."""
    exact: bool = False
    """Recompute the whole window every step instead of reusing the context cache (reference mode)."""
    cached_span: bool | None = None
    """Compute only the masked rows and the new commits at each step (see :func:`denoise`); None: the
    engine chooses (on for long middles of one request at a time, :meth:`engine.Engine.resolved`)."""
    budget_ms: float | None = None
    """Hard latency budget for the denoising loop; at the deadline the committed part is returned."""
    seed: int = 0
    """Seed of the ``random`` order (everything else is deterministic)."""
    defer_end: bool = True
    """Commit an end token only at the leftmost masked slot (False: plain textbook order)."""
    budget_pruning: bool = True
    """Under a budget, drop candidate lengths that cannot finish in the time left (see :func:`denoise`)."""
    stop_at_line_break: bool = False
    """For a middle of which only the first line is used: end it as soon as every slot up to the
    first line-break token is written (see :func:`denoise`; needs the line-break ids). The text
    then ends with that token, which may carry indentation after the break: keep what precedes it."""

    def __post_init__(self) -> None:
        if not self.lengths or any(int(n) < 1 for n in self.lengths):
            raise InputError(f"lengths must be positive token counts, got {self.lengths!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise InputError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.tokens_per_step < 1:
            raise InputError(f"tokens_per_step must be at least 1, got {self.tokens_per_step}")
        if self.budget_ms is not None and self.budget_ms <= 0:
            raise InputError(f"budget_ms must be positive, got {self.budget_ms}")
        try:
            object.__setattr__(self, "order", UnmaskOrder(self.order))
        except ValueError:
            raise InputError(f"order must be one of {', '.join(o.value for o in UnmaskOrder)}, got {self.order!r}") from None
        object.__setattr__(self, "lengths", tuple(sorted({int(n) for n in self.lengths})))


@dataclass
class Candidate:
    """One candidate middle length after denoising."""

    length: int
    tokens: np.ndarray
    """(length,) ids; the mask id where still masked."""
    committed: np.ndarray
    """(length,) bool."""
    confidence: np.ndarray
    """(length,) top-1 probability at commit time (0 where not committed)."""
    by_model: np.ndarray
    """(length,) bool: committed by the model (not filled in after an end token)."""
    steps: int = 0
    """Denoising steps this candidate took part in."""
    lead: int = 0
    """Leading slots committed by token healing (see :func:`denoise`)."""
    abandoned: bool = False
    """Dropped early: a shorter candidate already ended naturally, or it could not finish within the budget (see :func:`denoise`)."""

    def result_len(self, end_ids: frozenset[int]) -> int:
        """Length of the usable middle: up to the first end token or still-masked position."""
        for i in range(self.length):
            if not self.committed[i] or int(self.tokens[i]) in end_ids:
                return i
        return self.length

    @property
    def done(self) -> bool:
        """Whether every slot is committed."""
        return bool(self.committed.all())


@dataclass
class SamplerResult:
    """What the loop produced: the chosen middle's ids and confidences, all candidates, stats."""

    ids: list[int]
    confidence: list[float]
    cut: bool
    chosen: int
    candidates: list[Candidate]
    stats: dict[str, Any] = field(default_factory=dict)


def length_score(candidate: Candidate, end_ids: frozenset[int]) -> float:
    """Score of a candidate length: mean log-probability of what the model committed.

    Averaged over the tokens the model chose itself, the end token that closed the
    middle included (it says "the middle ends here") and positions filled in after
    it excluded. A too-short span forces unlikely tokens; a long one pays only for
    the end token, so the mean compares lengths fairly. A candidate that was cut
    is scored on its committed part; one with nothing committed scores -inf.
    """
    chosen = candidate.by_model & candidate.committed
    if not chosen.any():
        return -math.inf
    return float(np.log(np.maximum(candidate.confidence[chosen], 1e-12)).mean())


def _scores(order: UnmaskOrder, out: StepOutput, row: int, positions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    probs = out.probs[row, positions]
    if order is UnmaskOrder.CONFIDENCE:
        return probs[:, 0]
    if order is UnmaskOrder.MARGIN:
        return probs[:, 0] - probs[:, 1]
    if order is UnmaskOrder.ENTROPY:
        return -out.entropy[row, positions]
    if order is UnmaskOrder.LEFT_TO_RIGHT:
        return -positions.astype(np.float64)
    return rng.random(len(positions))


class _Layout:
    """Where prefix, span and suffix sit for each candidate length, and how to feed them."""

    def __init__(self, prefix: Sequence[int], suffix: Sequence[int], lengths: Sequence[int], shifted: bool) -> None:
        self.prefix = np.asarray(prefix, np.int64)
        self.suffix = np.asarray(suffix, np.int64)
        self.anchor = 1 if shifted else 0
        if len(self.prefix) < self.anchor:
            raise InputError("a shifted model needs at least one token before the middle (the engine adds BOS)")
        self.lengths = list(lengths)
        self.longest = max(lengths)

    def context(self, mask_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """ids, positions, cache index and span rows of the shared context pass (longest span, masked).

        The span rows are those a span step of the longest candidate feeds (the
        anchor and the slots), so the pass's outputs there are that step's.
        """
        p, m = len(self.prefix), self.longest
        ids = np.concatenate([self.prefix, np.full(m, mask_id, np.int64), self.suffix])
        cache_index = np.concatenate([np.arange(p - self.anchor), p + m + np.arange(len(self.suffix))])
        return ids, np.arange(len(ids)), cache_index, np.arange(p - self.anchor, p + m)

    def cache_positions(self, m: int) -> np.ndarray:
        """Positions of the cached keys when the span has length ``m``."""
        p = len(self.prefix)
        return np.concatenate([np.arange(p - self.anchor), p + m + np.arange(len(self.suffix))])

    def span_batch(self, rows: list[Candidate]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """span ids, positions, validity (B, S) and cache positions (B, Tc) for ``rows``."""
        p, a = len(self.prefix), self.anchor
        width = max(c.length for c in rows) + a
        ids = np.zeros((len(rows), width), np.int64)
        pos = np.zeros((len(rows), width), np.int64)
        valid = np.zeros((len(rows), width), bool)
        for r, cand in enumerate(rows):
            n = cand.length + a
            ids[r, :n] = np.concatenate([self.prefix[p - a :], cand.tokens])
            pos[r, :n] = np.arange(p - a, p + cand.length)
            valid[r, :n] = True
        cache_pos = np.stack([self.cache_positions(c.length) for c in rows])
        return ids, pos, valid, cache_pos

    def window_batch(self, rows: list[Candidate]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Whole windows (B, T) for the exact mode, and the output row of span slot 0."""
        windows = [np.concatenate([self.prefix, c.tokens, self.suffix]) for c in rows]
        width = max(len(w) for w in windows)
        ids = np.zeros((len(rows), width), np.int64)
        valid = np.zeros((len(rows), width), bool)
        for r, w in enumerate(windows):
            ids[r, : len(w)] = w
            valid[r, : len(w)] = True
        pos = np.broadcast_to(np.arange(width), ids.shape).copy()
        return ids, pos, valid, len(self.prefix) - self.anchor


def denoise(
    denoiser: Denoiser,
    prefix: Sequence[int],
    suffix: Sequence[int],
    params: SamplingParams,
    stop: Callable[[], bool] | None = None,
    line_break_ids: frozenset[int] = frozenset(),
    healing: Healing | None = None,
    scheduler: StepScheduler | None = None,
    encoder: ContextEncoder | None = None,
) -> SamplerResult:
    """Fill the middle between ``prefix`` and ``suffix`` (token ids). See the module docstring.

    ``line_break_ids`` are the ids whose text holds a line break (used with
    ``params.stop_at_line_break``); ``healing`` constrains the first slots to
    write the text removed from the end of the prefix; ``scheduler`` runs the
    loop's steps together with other requests' (:mod:`engine.scheduler`); ``encoder``
    runs the context pass instead of a plain one (:mod:`engine.reuse`).
    """
    run = DenoisingRun(denoiser, prefix, suffix, params, stop, line_break_ids, healing, encoder)
    if scheduler is not None:
        return scheduler.run(run)
    run.encode_context()
    while (active := run.active()) and not run.out_of_time(active):
        run.step(active)
    return run.result()


class DenoisingRun:
    """The state of one :func:`denoise` call, one method per phase of the loop."""

    def __init__(
        self,
        denoiser: Denoiser,
        prefix: Sequence[int],
        suffix: Sequence[int],
        params: SamplingParams,
        stop: Callable[[], bool] | None,
        line_break_ids: frozenset[int],
        healing: Healing | None,
        encoder: ContextEncoder | None = None,
    ) -> None:
        self.denoiser, self.params, self.stop, self.healing = denoiser, params, stop, healing
        self.encoder = encoder
        self.tok = denoiser.info.token_ids
        self.end_ids = self.tok.end_ids
        self.breaks = line_break_ids if params.stop_at_line_break else frozenset()
        self.layout = _Layout(prefix, suffix, params.lengths, denoiser.info.arch.shifted)
        self.rng = np.random.default_rng(params.seed)
        self.start = time.perf_counter()
        self.deadline = None if params.budget_ms is None else self.start + params.budget_ms / 1000.0
        mask = self.tok.mask
        self.candidates = [
            Candidate(length=m, tokens=np.full(m, mask, np.int64), committed=np.zeros(m, bool),
                      confidence=np.zeros(m, np.float32), by_model=np.zeros(m, bool))
            for m in self.layout.lengths
        ]
        self.stats: dict[str, Any] = {"context_ms": 0.0, "denoise_ms": 0.0, "steps": 0, "forward_passes": 0,
                                      "span_rows": 0}
        self.cache: Any = None
        self.span_caches: dict[int, tuple[np.ndarray, Any]] = {}
        """Per candidate length (cached-span mode): the span rows in its cache, and their keys/values."""
        self.primed: tuple[Candidate, StepOutput] | None = None
        """The longest candidate's first step, answered by the context pass."""
        self.cut = False
        self.last_step_s = 0.0
        self.step_started = 0.0
        self.loop_start = self.start

    def encode_context(self) -> None:
        """The context pass (cached mode): keys/values of prefix and suffix, and the longest span's first step."""
        if not self.params.exact:
            t0 = time.perf_counter()
            if self.encoder is not None:
                self.cache, first_step, reuse_stats = self.encoder()
                self.stats.update(reuse_stats)
            else:
                self.cache, first_step = self.denoiser.encode_context(*self.layout.context(self.tok.mask))
            self.primed = (self.candidates[-1], first_step)
            self.stats["context_ms"] = (time.perf_counter() - t0) * 1000
            self.stats["forward_passes"] += 1
        self.loop_start = time.perf_counter()

    def active(self) -> list[Candidate]:
        """The candidates still worth a step: early exit once a shorter one ended naturally, budget pruning."""
        natural = [c.length for c in self.candidates if c.done and c.result_len(self.end_ids) < c.length]
        for c in self.candidates:
            if natural and not c.done and c.length > min(natural):
                c.abandoned = True
        active = [c for c in self.candidates if not c.done and not c.abandoned]
        self.step_started = time.perf_counter()
        if active and self.params.budget_pruning and self.deadline is not None and self.last_step_s > 0 and len(active) > 1:
            pruned = _prune(active, self.deadline - self.step_started, self.last_step_s)
            self.stats["pruned"] = self.stats.get("pruned", 0) + pruned
            active = [c for c in active if not c.abandoned]
        return active

    def out_of_time(self, active: list[Candidate]) -> bool:
        """Whether the stop callback fired or the next step would overrun the deadline (then the run is cut)."""
        stopped = self.stop is not None and self.stop()
        late = self.deadline is not None and self.step_started + self.last_step_s > self.deadline
        self.cut = stopped or late
        return self.cut

    def step(self, active: list[Candidate]) -> None:
        """One denoising step of every active candidate: a forward pass (unless primed), then commits."""
        part = self.span_part(active)
        self.commit_step(active, None if part is None else step_batches(self.denoiser, [part])[0])

    def span_part(self, active: list[Candidate]) -> SpanBatch | None:
        """The span rows this step needs a forward pass for: the active candidates the context pass
        did not already answer. None when it answered them all, and in the exact mode (whose
        whole-window passes :meth:`commit_step` runs itself). A scheduler may run the parts of
        several runs as one batch (:mod:`engine.scheduler`)."""
        if self.params.exact or self.params.cached_span:
            return None
        fresh = self._fresh(active)
        return SpanBatch(self.cache, *self.layout.span_batch(fresh)) if fresh else None

    def _fresh(self, active: list[Candidate]) -> list[Candidate]:
        primed = self.primed
        return [c for c in active if primed is None or c is not primed[0]]

    def commit_step(self, active: list[Candidate], out: StepOutput | None) -> None:
        """Commit this step's positions of every active candidate, ``out`` answering :meth:`span_part`'s rows."""
        outputs: list[tuple[Candidate, StepOutput, int, int]] = []  # candidate, output, its row, row of slot 0
        fresh = active  # the candidates this step runs a forward pass for
        if self.params.exact:
            ids, pos, valid, first = self.layout.window_batch(active)
            full = self.denoiser.full(ids, pos, valid)
            outputs = [(cand, full, r, first) for r, cand in enumerate(active)]
        else:
            primed = self.primed
            if primed is not None and any(c is primed[0] for c in active):
                outputs.append((primed[0], primed[1], 0, 0))
            fresh = self._fresh(active)
            if fresh and self.params.cached_span:
                outputs += [(cand, self._cached_step(cand), 0, 0) for cand in fresh]
                self.stats["forward_passes"] += len(fresh) - 1
            elif fresh:
                assert out is not None, "a span step's rows need its forward pass"
                outputs += [(cand, out, r, 0) for r, cand in enumerate(fresh)]
                self.stats["span_rows"] += out.ids.shape[0] * out.ids.shape[1]
            self.primed = None
        for cand, answer, r, first in outputs:
            healing = self.healing
            if healing is not None and cand.lead < cand.length and healing.pending(cand.tokens[: cand.lead].tolist()):
                _heal(cand, answer, r, first, healing)
            else:
                _commit(cand, answer, r, first, self.params, self.rng, self.end_ids, self.tok.eos, self.breaks)
            cand.steps += 1
        self.stats["steps"] += 1
        if fresh:
            self.stats["forward_passes"] += 1
            self.last_step_s = time.perf_counter() - self.step_started

    def _cached_step(self, cand: Candidate) -> StepOutput:
        """One step of ``cand`` in the cached-span mode: a pass over its rows not yet cached, against
        its context and its cached rows; the rows of tokens committed before this step (and not needed
        for an output) are cached from it. Outputs are laid out as a span step's (row = slot)."""
        layout, a, m = self.layout, self.layout.anchor, cand.length
        p = len(layout.prefix)
        tokens = np.concatenate([layout.prefix[p - a :], cand.tokens])  # row j sits at position p - a + j
        known = np.concatenate([np.ones(a, bool), cand.committed])
        needed = np.zeros(a + m, bool)
        needed[:m] = ~cand.committed  # the output of row j predicts slot j
        rows, span_cache = self.span_caches.get(m, (np.zeros(0, np.int64), None))
        uncached = np.ones(a + m, bool)
        uncached[rows] = False
        inputs = np.flatnonzero(uncached)
        to_cache = np.flatnonzero(known[inputs] & ~needed[inputs])  # indices into inputs
        answer = np.flatnonzero(needed[inputs])
        context = layout.cache_positions(m)
        prior = [Prior(self.cache, np.arange(len(context)), context)]
        if span_cache is not None:
            prior.append(Prior(span_cache, np.arange(len(rows)), p - a + rows))
        fresh, out = self.denoiser.encode_context(  # type: ignore[call-arg]
            tokens[inputs], p - a + inputs, to_cache, answer, prior=prior
        )
        self.stats["span_rows"] += len(inputs)
        if len(to_cache):
            joined = fresh if span_cache is None else self.denoiser.join(  # type: ignore[attr-defined]
                [(span_cache, np.arange(len(rows))), (fresh, np.arange(len(to_cache)))])
            self.span_caches[m] = (np.concatenate([rows, inputs[to_cache]]), joined)
        k = out.ids.shape[-1]
        ids, probs = np.zeros((1, m, k), out.ids.dtype), np.zeros((1, m, k), out.probs.dtype)
        entropy = np.zeros((1, m), out.entropy.dtype)
        slots = inputs[answer]
        ids[0, slots], probs[0, slots], entropy[0, slots] = out.ids[0], out.probs[0], out.entropy[0]
        return StepOutput(ids=ids, probs=probs, entropy=entropy)

    def result(self) -> SamplerResult:
        """The candidate with the best :func:`length_score`, its committed middle and the run's stats."""
        stats = self.stats
        stats["denoise_ms"] = (time.perf_counter() - self.loop_start) * 1000
        scores = [-math.inf if c.abandoned else length_score(c, self.end_ids) for c in self.candidates]
        chosen = int(np.argmax(scores)) if any(math.isfinite(s) for s in scores) else len(self.candidates) - 1
        best = self.candidates[chosen]
        n = best.result_len(self.end_ids)
        model_tokens = int((best.by_model & best.committed).sum())
        stats.update(
            {
                "chosen_length": best.length,
                "chosen_steps": best.steps,
                "tokens_per_step": model_tokens / best.steps if best.steps else 0.0,
                "tokens_per_forward": model_tokens / stats["forward_passes"] if stats["forward_passes"] else 0.0,
                "total_ms": (time.perf_counter() - self.start) * 1000,
                "scores": [s if math.isfinite(s) else None for s in scores],
            }
        )
        return SamplerResult(
            ids=[int(t) for t in best.tokens[:n]],
            confidence=[float(c) for c in best.confidence[:n]],
            cut=self.cut and not best.done,
            chosen=chosen,
            candidates=self.candidates,
            stats=stats,
        )


def _prune(active: list[Candidate], remaining_s: float, step_s: float) -> int:
    """Abandon the candidates (longest first, never the last one) that cannot finish in ``remaining_s``."""
    pruned = 0
    for cand in sorted(active, key=lambda c: -c.length)[:-1]:
        pace = max(1.0, int((cand.by_model & cand.committed).sum()) / cand.steps) if cand.steps else 1.0
        if int((~cand.committed).sum()) / pace * step_s > remaining_s:
            cand.abandoned = True
            pruned += 1
    return pruned


def _heal(cand: Candidate, out: StepOutput, row: int, first: int, healing: Healing) -> None:
    """Commit the next healing slot: the best compatible top-k token, else the removed text's own."""
    slot = cand.lead
    ranked = out.ids[row, first + slot]
    token, rank = healing.choose(cand.tokens[:slot].tolist(), ranked.tolist())
    cand.tokens[slot] = token
    cand.confidence[slot] = out.probs[row, first + slot, rank] if rank is not None else 1.0
    cand.committed[slot] = True
    cand.by_model[slot] = rank is not None
    cand.lead += 1


def _commit(
    cand: Candidate,
    out: StepOutput,
    row: int,
    first: int,
    params: SamplingParams,
    rng: np.random.Generator,
    end_ids: frozenset[int],
    eos: int,
    breaks: frozenset[int] = frozenset(),
) -> None:
    """Commit this step's positions of one candidate, then apply the end-token and line-break rules."""
    masked = np.flatnonzero(~cand.committed)
    rows = first + masked  # output rows predicting these span slots
    top1 = out.probs[row, rows, 0]
    # An end token may only be committed at the leftmost masked slot: the end of the
    # middle is decided after its content. Otherwise the padding a model learned to
    # expect at a span's tail wins on confidence and EOS crawls in from the right.
    ends_here = np.isin(out.ids[row, rows, 0], list(end_ids))
    eligible = ~ends_here | (masked == masked[0]) if params.defer_end else np.ones(len(masked), bool)
    take = set(masked[(top1 >= params.threshold) & eligible].tolist()) if params.threshold < 1.0 else set()
    if len(take) < params.tokens_per_step:
        scores = np.where(eligible, _scores(params.order, out, row, rows, rng), -np.inf)
        for i in np.argsort(-scores, kind="stable"):
            if len(take) >= min(params.tokens_per_step, int(eligible.sum())):
                break
            take.add(int(masked[i]))
    for slot in sorted(take):
        cand.tokens[slot] = out.ids[row, first + slot, 0]
        cand.confidence[slot] = out.probs[row, first + slot, 0]
        cand.committed[slot] = True
        cand.by_model[slot] = True
    ends = np.flatnonzero(cand.committed & np.isin(cand.tokens, list(end_ids)))
    if breaks:  # the first slot after the healed ones that is still masked or holds a line break, if it is a written break
        stops = np.flatnonzero(~cand.committed | np.isin(cand.tokens, list(breaks)))
        stops = stops[stops >= cand.lead]
        if len(stops) and cand.committed[stops[0]]:
            ends = np.concatenate([ends, stops[:1]])
    if len(ends):
        after = slice(int(ends.min()) + 1, cand.length)  # past the end of the middle
        cand.tokens[after] = eos
        cand.committed[after] = True
        cand.by_model[after] = False
