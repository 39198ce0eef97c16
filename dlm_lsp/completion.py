"""One inline completion, from document text to post-processed suggestion.

:func:`complete_text` is the synchronous core shared by the language server (run
off the event loop) and ``dlm-lsp check``: context building, the engine call with
the latency budget and a stop callback, and post-processing.
:class:`CompletionService` adds what a live editor needs around it: one engine
request in flight per document (a newer request stops the older one at its next
denoising step), debounce of automatic triggers, the type-through cache, and
dropping results for a document version that is no longer current.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

from dlm_lsp.cache import CachedSuggestion, CompletionCache
from dlm_lsp.context import CompletionContext, OpenDocument, build_context, without_surrogates
from dlm_lsp.gate import gate, parse_surroundings
from dlm_lsp.postprocess import Suggestion, postprocess
from dlm_lsp.settings import Settings
from dlm_lsp.status import Metrics

if TYPE_CHECKING:
    from dlm_lsp.remote import Endpoint
    from engine import Engine, SamplingParams

log = logging.getLogger(__name__)

Source = Literal["model", "cache", "cancelled", "stale", "empty", "gated"]
"""Where a result came from: the model or the type-through cache, or why there is no suggestion."""

BUDGET_RESERVE_MS = 4.0
BUDGET_RESERVE_SHARE = 0.05
"""Of the latency budget, this much (fixed + share) is kept for post-processing, the
JSON-RPC reply and a denoising step that takes longer than the one before it."""


@dataclass
class Result:
    """A suggestion (or None) and how it was made."""

    suggestion: Suggestion | None
    latency_ms: float
    source: Source
    """``model``, ``cache``, or why there is nothing: ``cancelled``, ``stale``, ``empty`` (post-processing
    left nothing), ``gated`` (the gate hid it)."""
    cut: bool = False
    engine_stats: dict[str, Any] = field(default_factory=dict)
    raw_text: str = ""
    ungated: Suggestion | None = None
    """The post-processed suggestion before the gate."""
    verdict: str = ""
    """The gate's reason (:data:`dlm_lsp.gate.REASONS`); empty when nothing reached it."""
    token_ends: list[int] = field(default_factory=list)
    """Where each token the model wrote ends in ``raw_text`` (healed tokens left out)."""
    confidence: list[float] = field(default_factory=list)
    """The probability of each of those tokens when it was committed."""
    context: CompletionContext | None = None
    """The context the completion was made in (None for cache hits and dropped requests)."""


MIN_CONTEXT_TOKENS = 32
"""A middle never takes more of the model's window than leaves this many positions for context."""


def longest_middle(max_positions: int) -> int:
    """The longest middle a model with ``max_positions`` positions is asked for (``MIN_CONTEXT_TOKENS`` kept)."""
    return max(1, max_positions - 1 - MIN_CONTEXT_TOKENS)


def sampling_params(
    settings: Settings, multiline: bool, budget_ms: float | None, max_positions: int | None = None
) -> SamplingParams:
    """Engine parameters for one request.

    A single-line suggestion keeps only its first line (post-processing, ``scope``),
    so its denoising stops once that line is written (``stop_at_line_break``).
    Lengths the model's window (``max_positions``) cannot hold with some context are
    capped (the settings allow 512 tokens; the shipped model has 256 positions).
    """
    from engine import SPAN_CACHE_MODES, SamplingParams

    lengths = settings.lengths(multiline)
    if max_positions is not None:
        lengths = tuple(sorted({min(n, longest_middle(max_positions)) for n in lengths}))
    return SamplingParams(
        lengths=lengths,
        threshold=settings.confidence_threshold,
        tokens_per_step=settings.tokens_per_step,
        budget_ms=budget_ms,
        stop_at_line_break=not multiline,
        cached_span=SPAN_CACHE_MODES[settings.span_cache],
    )


def complete_text(
    engine: Engine,
    text: str,
    offset: int,
    language_id: str,
    settings: Settings,
    others: Iterable[OpenDocument] = (),
    stop: Callable[[], bool] | None = None,
    started: float | None = None,
    document_start: bool = True,
    reuse: str | None = None,
) -> Result:
    """Complete ``text`` at character ``offset`` (synchronous; runs the model).

    ``document_start``: ``text`` begins where the document does (False for a window cut from a
    larger one, :func:`dlm_lsp.context.window`), so that the model is told where files start.
    ``reuse``: the document's key, when its previous request's context pass may be reused
    (the ``contextReuse`` setting).
    """
    started = started if started is not None else time.perf_counter()
    text = without_surrogates(text)  # a lone surrogate cannot be tokenized; same length, same offsets
    others = [replace(doc, text=without_surrogates(doc.text)) for doc in others]
    ctx: CompletionContext = build_context(text, offset, language_id, settings, others)
    spent_ms = (time.perf_counter() - started) * 1000
    reserve = BUDGET_RESERVE_MS + BUDGET_RESERVE_SHARE * settings.latency_budget_ms
    budget = max(1.0, settings.latency_budget_ms - spent_ms - reserve)
    completion = engine.complete(
        ctx.prefix,
        ctx.suffix,
        sampling_params(settings, ctx.multiline, budget, engine.info.window),
        stop=stop,
        max_prefix_tokens=settings.prefix_tokens + (settings.other_files_tokens if ctx.snippets else 0),
        max_suffix_tokens=settings.suffix_tokens,
        document_start=document_start and ctx.snippets == 0 and len(ctx.prefix) == offset,
        heal=settings.token_healing,
        reuse=reuse if settings.context_reuse else None,
    )
    ungated = postprocess(completion.text, ctx.post)
    written = slice(completion.healed_tokens, None)  # the healed tokens are the user's text
    token_ends, confidence = completion.token_ends[written], completion.confidence[written]
    suggestion, verdict = None, ""
    if ungated is not None:
        decision = gate(
            ungated, completion.text, token_ends, confidence, ctx.post, settings.min_confidence,
            parse_surroundings(text, offset, ctx.post),
        )
        suggestion, verdict = decision.suggestion, decision.reason
    return Result(
        suggestion=suggestion,
        latency_ms=(time.perf_counter() - started) * 1000,
        source="model" if suggestion else "gated" if ungated else "empty",
        cut=completion.cut,
        engine_stats=completion.stats,
        raw_text=completion.text,
        ungated=ungated,
        verdict=verdict,
        token_ends=token_ends,
        confidence=confidence,
        context=ctx,
    )


def complete_remote(
    remote: Endpoint,
    text: str,
    offset: int,
    language_id: str,
    settings: Settings,
    stop: Callable[[], bool],
    started: float,
    document: str | None = None,
) -> Result:
    """Complete ``text`` at ``offset`` on a remote endpoint (synchronous; :mod:`dlm_lsp.remote`).
    ``document``: its URI, sent hashed so that the server keys its requests by document.

    The prefix and suffix windows go to the endpoint; its answer is post-processed here
    as the engine's would be (the confidence gate needs per-token confidence, which a
    FIM API does not return: a ``dlm-serve`` gates on its side). Out of time or stopped:
    no suggestion, ``cut`` or ``cancelled``.
    """
    ctx = build_context(without_surrogates(text), offset, language_id, settings)
    spent_ms = (time.perf_counter() - started) * 1000
    budget = max(1.0, settings.latency_budget_ms - spent_ms - BUDGET_RESERVE_MS)
    answer = remote.complete(ctx.prefix, ctx.suffix, max(settings.lengths(ctx.multiline)), budget, stop, document)
    latency = (time.perf_counter() - started) * 1000
    if answer.abandoned:
        return Result(None, latency, "cancelled" if stop() else "empty", cut=not stop(), context=ctx)
    suggestion = postprocess(answer.text, ctx.post) if answer.text else None
    return Result(suggestion, latency, "model" if suggestion else "empty", cut=answer.finish_reason == "length",
                  raw_text=answer.text, ungated=suggestion, context=ctx)


class CompletionService:
    """Debounce, per-document cancellation, type-through cache and stale-result dropping."""

    def __init__(self, metrics: Metrics, executor: ThreadPoolExecutor | None = None, *, cache: bool = True) -> None:
        """``cache``: keep a type-through cache (one editor's; a server shared by many clients has none)."""
        self.metrics = metrics
        self.use_cache = cache
        self.cache = CompletionCache()
        self.executor = executor or ThreadPoolExecutor(max_workers=2, thread_name_prefix="dlm-engine")
        self._inflight: dict[str, threading.Event] = {}
        self._generation: dict[str, int] = {}
        self._priming: dict[str, asyncio.Future[Any]] = {}

    def close(self) -> None:
        """Stop every request in flight and the worker threads (the session ends)."""
        for uri in list(self._inflight):
            self.cancel(uri)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def cancel(self, uri: str) -> None:
        """Stop the engine request running for ``uri``, if any."""
        event = self._inflight.pop(uri, None)
        if event is not None:
            event.set()

    async def complete(
        self,
        engine: Engine | None,
        uri: str,
        text: str,
        offset: int,
        language_id: str,
        settings: Settings,
        *,
        version: int | None,
        current_version: Callable[[], int | None],
        automatic: bool,
        others: Iterable[OpenDocument] = (),
        document_start: bool = True,
        remote: Endpoint | None = None,
        reuse_key: str | None = None,
    ) -> Result:
        """Complete at ``offset`` unless superseded, cancelled or made stale on the way
        (``document_start``: as in :func:`complete_text`; ``remote``: ask that endpoint instead of
        ``engine``, :func:`complete_remote`; ``reuse_key``: whose previous context pass to reuse,
        ``uri``'s by default)."""
        started = time.perf_counter()
        self.metrics.count("requests")
        generation = self._generation.get(uri, 0) + 1
        self._generation[uri] = generation
        self.cancel(uri)  # a newer request replaces the one in flight
        try:
            return await self._complete(engine, uri, text, offset, language_id, settings, version, current_version,
                                        automatic, others, document_start, remote, started, generation,
                                        reuse_key or uri)
        finally:
            if self._generation.get(uri) == generation:  # the newest request for uri ended: forget the uri
                del self._generation[uri]

    def _prime(
        self, engine: Engine, key: str, text: str, offset: int, language_id: str, settings: Settings,
        others: Iterable[OpenDocument], document_start: bool,
    ) -> asyncio.Future[Any] | None:
        """Start this window's context pass while the debounce waits, kept for ``key``'s next request
        (as llama.vim warms its cache while the user types). One per document at a time: while one
        runs, a newer keystroke waits for it, and its request reuses what it computed."""
        running = self._priming.get(key)
        if running is not None and not running.done():
            return running
        settings = replace(settings, latency_budget_ms=60_000.0)  # a context pass is all it runs
        others = list(others)

        def work() -> None:
            try:
                stats = complete_text(engine, text, offset, language_id, settings, others, lambda: True,
                                      document_start=document_start, reuse=key).engine_stats
            except Exception as exc:  # noqa: BLE001 - the request itself runs the pass again and reports
                log.warning("priming the context of %s failed: %s", key, exc)
                return
            if "context_computed" in stats:
                self.metrics.count("context_reused", stats["context_reused"])
                self.metrics.count("context_computed", stats["context_computed"])

        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, work)
        except RuntimeError:  # the worker pool is gone: the request replaces it, unprimed
            return None
        self.metrics.count("primes")
        self._priming[key] = future
        future.add_done_callback(lambda done: self._priming.pop(key, None) if self._priming.get(key) is done else None)
        return future

    async def _complete(
        self, engine: Engine | None, uri: str, text: str, offset: int, language_id: str, settings: Settings,
        version: int | None, current_version: Callable[[], int | None], automatic: bool,
        others: Iterable[OpenDocument], document_start: bool, remote: Endpoint | None, started: float, generation: int,
        reuse_key: str,
    ) -> Result:
        prefix, suffix = text[:offset], text[offset:]
        cached = self.cache.get(prefix, suffix) if self.use_cache else None
        if cached is not None:
            self.metrics.count("cache_hits")
            latency = (time.perf_counter() - started) * 1000
            return Result(Suggestion(cached.text, cached.replace_suffix), latency, "cache")
        if automatic and settings.debounce_ms > 0:
            primed = None
            if engine is not None and remote is None and settings.context_reuse and engine.reuses_context:
                primed = self._prime(engine, reuse_key, text, offset, language_id, settings, others, document_start)
            await asyncio.sleep(settings.debounce_ms / 1000)
            if self._generation.get(uri) != generation:
                self.metrics.count("cancelled")
                return Result(None, (time.perf_counter() - started) * 1000, "cancelled")
            if primed is not None:  # the request's own context pass then reuses it whole
                await asyncio.wait([primed])
        stop = threading.Event()
        self._inflight[uri] = stop
        loop = asyncio.get_running_loop()
        work_started = time.perf_counter()

        def work() -> Result:
            if remote is not None:
                return complete_remote(remote, text, offset, language_id, settings, stop.is_set, work_started, uri)
            assert engine is not None, "a completion needs an engine or an endpoint"
            return complete_text(engine, text, offset, language_id, settings, others, stop.is_set, work_started,
                                 document_start, reuse=reuse_key)

        try:
            try:
                pending = loop.run_in_executor(self.executor, work)
            except RuntimeError:  # the worker pool is gone (shut down, or broken): a new one takes over
                log.warning("the engine worker pool was gone; starting a new one")
                self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dlm-engine")
                pending = loop.run_in_executor(self.executor, work)
            result = await pending
        except asyncio.CancelledError:  # $/cancelRequest: stop the denoising loop at its next step
            stop.set()
            self.metrics.count("cancelled")
            raise
        except Exception:  # the client gets the error response; the status counts it
            self.metrics.count("errors")
            raise
        finally:
            if self._inflight.get(uri) is stop:
                del self._inflight[uri]
        result.latency_ms = (time.perf_counter() - started) * 1000
        stats = result.engine_stats
        if "context_computed" in stats:
            self.metrics.count("context_reused", stats["context_reused"])
            self.metrics.count("context_computed", stats["context_computed"])
        if stop.is_set():
            self.metrics.count("cancelled")
            return Result(None, result.latency_ms, "cancelled")
        if version is not None and current_version() != version:
            self.metrics.count("stale")
            return Result(None, result.latency_ms, "stale")
        self.metrics.latency(result.latency_ms)
        if result.cut:
            self.metrics.count("budget_cuts")
        if result.suggestion is None:
            self.metrics.count(result.source)  # empty or gated
            return result
        self.metrics.count("completions")
        if self.use_cache:
            self.cache.put(prefix, suffix, CachedSuggestion(result.suggestion.text, result.suggestion.replace_suffix))
        return result
