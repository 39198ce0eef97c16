"""What every HTTP route shares: the model, the completion path, keys, limits and metrics.

The routes run the language server's own completion path
(:class:`dlm_lsp.completion.CompletionService`: context window, the latency budget as
a hard deadline, post-processing and the gate, one request in flight per client
document, a newer one stopping the older at its next denoising step), so nothing
about completions is written twice.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError

from dlm_lsp.completion import CompletionService, Result, complete_text
from dlm_lsp.context import OpenDocument, window
from dlm_lsp.model_host import ModelHost
from dlm_lsp.remote import SESSION_HEADER
from dlm_lsp.settings import MAX_TOKENS, Settings
from dlm_lsp.status import Metrics
from dlm_lsp.syntax import EXTENSIONS
from engine import Engine
from engine.backends.onnxruntime import default_threads
from engine.reuse import ContextStore, ReusePolicy
from engine.scheduler import MAX_ROWS

log = logging.getLogger(__name__)

KEYS_ENV = "DLM_SERVE_API_KEYS"
"""Comma-separated API keys (or ``--api-key-file``, one per line)."""
MAX_BODY_BYTES = 8 << 20
"""A request body over this is refused (413) before it is read."""
MAX_TEXT_CHARS = 1_000_000
"""prompt, suffix and each other-file chunk: at most this many characters."""
MAX_EXTRA_CHUNKS = 64
MAX_EXTRA_CHARS = 512_000
"""Other-file chunks of one request, in all (more costs CPU before the budget starts)."""
PER_KEY_CONCURRENCY = 8
"""Requests one API key (or, without keys, one client address) may have running at once."""
CLIENT_CONTEXTS = 32
"""Clients (documents) whose last context pass is kept for reuse (the least recent forgotten first)."""
BATCH_WORKERS = 64
"""Requests served at once when batching (each waits in the scheduler on a worker thread); more queue."""


class ApiError(Exception):
    """An error a route answers in its API's shape (HTTP ``status``, OpenAI-style ``kind``)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Any, model: type[Body]) -> Body:
    """The request's JSON body as ``model``, whatever its Content-Type says (curl sends a form type
    by default; llama.cpp reads JSON regardless). Malformed JSON and invalid fields are 400s that
    name what was wrong."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {str(exc)[:120]}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors()
        where = ".".join(str(p) for p in problems[0]["loc"]) if problems else ""
        message = f"{where}: {problems[0]['msg']}" if where else (problems[0]["msg"] if problems else "invalid body")
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        raise ApiError(400, message, param=where or None) from exc


def budget_header(value: str | None) -> float | None:
    """The ``X-DLM-Budget-Ms`` header: milliseconds (1-60,000), or None when absent."""
    if value is None:
        return None
    try:
        budget = float(value)
    except ValueError as exc:
        raise ApiError(400, "X-DLM-Budget-Ms must be a number of milliseconds") from exc
    if not 1 <= budget <= 60_000:
        raise ApiError(400, "X-DLM-Budget-Ms must be between 1 and 60000")
    return budget


def _session(request: Any, user: str | None) -> str | None:
    """The caller's own name for its document: the ``user`` field, else an ``X-Session-Id`` header."""
    if user:
        return user
    value = request.headers.get(SESSION_HEADER)
    return value[:200] if value else None


def document_key(route: str, who: str, request: Any, user: str | None = None) -> str:
    """Which requests replace each other (a newer one stops the older at its next step).

    By the caller's own ``user`` field (OpenAI's convention) or ``X-Session-Id`` header when
    it sends one, else by connection: never by address alone, or everyone behind one
    address (a shared host, a proxy) would cancel everyone else. llama.vim opens a
    connection per request and closes it when it moves on, which stops the old request anyway.
    """
    user = _session(request, user)
    if user:
        return f"{route}:{who}:user:{user}"
    client = request.client
    return f"{route}:{who}:{client.host}:{client.port}" if client else f"{route}:{who}:-"


def reuse_key(route: str, who: str, request: Any, user: str | None = None) -> str:
    """Whose previous context pass a request may reuse: the caller's document (its ``user`` field or
    ``X-Session-Id``), else the caller (its API key and address), not its connection: llama.vim opens a
    connection per request. A request of another file of the same caller shares too little with it
    to reuse anything, and is encoded whole."""
    client = request.client
    return f"{route}:{who}:{_session(request, user) or (client.host if client else '-')}"


def read_keys(key_file: Path | None) -> list[str]:
    """API keys from ``key_file`` (one per line, ``#`` comments) and :data:`KEYS_ENV`."""
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if key_file is not None:
        for line in key_file.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ValueError(f"{len(short)} API key(s) shorter than 16 characters: use long random keys")
    return keys


def language_id(value: str | None) -> str:
    """An LSP language id from a request's hint: a language id, or a file name (by its extension)."""
    if not value:
        return "plaintext"
    if "." in value or "/" in value:
        return EXTENSIONS.get(Path(value).suffix.lower(), "plaintext")
    return value


@dataclass
class Prometheus:
    """The ``/metrics`` series (a registry of their own: one server may hold several apps in tests)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("dlm_requests", "Completion requests by route and outcome", ["route", "outcome"], registry=r)
        self.latency = Histogram("dlm_request_seconds", "Completion latency, request to answer", ["route"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.forward_passes = Counter("dlm_forward_passes", "Model forward passes (context and span steps)", registry=r)
        self.tokens_per_forward = Histogram("dlm_tokens_per_forward_pass", "Middle tokens written per forward pass",
                                            registry=r, buckets=(0.5, 1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.in_flight = Gauge("dlm_requests_in_flight", "Completion requests being served (queue depth)", registry=r)
        self.context_tokens = Counter("dlm_context_tokens", "Context tokens of context passes: reused from the "
                                      "document's previous request, or computed", ["kind"], registry=r)
        self.batch_requests = Histogram("dlm_batch_requests", "Requests sharing one merged span-step forward pass",
                                        registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.batch_rows = Histogram("dlm_batch_rows", "Span rows of one merged span-step forward pass",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))


class Service:
    """The model, the completion path, the keys and the limits of one ``dlm-serve``."""

    def __init__(self, settings: Settings, model_name: str, keys: list[str], *, max_batch_rows: int = MAX_ROWS) -> None:
        """``max_batch_rows``: concurrent requests' span steps run as one forward pass of at most this many
        rows (:mod:`engine.scheduler`); 0 runs each request's loop on its own, two at a time."""
        self.settings = settings
        self.model_name = model_name
        """What ``/v1/models`` lists and requests may name (the catalog name, or the folder's name)."""
        self.keys = keys
        self.max_batch_rows = max_batch_rows
        self.host = ModelHost(prepare=self._prepare)
        self.metrics = Metrics()
        # batched, every request in flight waits in the scheduler on a worker thread of its own
        workers = BATCH_WORKERS if max_batch_rows > 0 else 2
        self.completions = CompletionService(
            self.metrics, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dlm-engine"), cache=False
        )
        """No type-through cache: it is one editor's, and would serve one client's middle (made with its
        settings, budget and other files) to another."""
        self.prometheus = Prometheus()
        self.started = time.time()
        self._ids = itertools.count(1)
        self._running: dict[str, int] = {}

    # -- model ------------------------------------------------------------------------
    def _prepare(self, engine: Engine) -> None:
        """Set a freshly loaded engine up for many clients: batching (its merged passes counted in
        ``/metrics``) and a context pass kept for each of :data:`CLIENT_CONTEXTS` recent clients."""
        if engine.contexts is not None:
            engine.contexts = ContextStore(ReusePolicy(capacity=CLIENT_CONTEXTS))
        if self.max_batch_rows <= 0:
            return
        # a model whose operations use every core: one scheduler thread; a small one, whose operations
        # run on one thread each: one per core, so that merged passes also run side by side
        one_thread = default_threads(engine.info.arch.hidden_size) == 1
        engine.batch_requests(self.max_batch_rows, on_step=self._observe_step,
                              lanes=default_threads() if one_thread else 1)
        if getattr(engine.denoiser, "merges_contexts", True) is False:
            log.warning("%s is an engine folder of format 2: concurrent requests take one forward pass each; "
                        "convert it again (dlm-convert, or dlm-lsp models pull NAME --force) for merged passes",
                        engine.path)

    def _observe_step(self, requests: int, rows: int) -> None:
        self.prometheus.batch_requests.observe(requests)
        self.prometheus.batch_rows.observe(rows)

    def load(self) -> None:
        """Start loading the model (``/health`` says ``loading`` until it is ready)."""
        self.host.load(self.settings.model, self.settings.backend, fallback=False, threads=self.settings.threads)

    def engine(self) -> Any:
        """The ready engine, or :class:`ApiError` 503 saying why there is none."""
        if self.host.state == "ready" and self.host.engine is not None:
            return self.host.engine
        if self.host.state == "error":
            raise ApiError(503, f"the model failed to load: {self.host.error}", "unavailable_error")
        raise ApiError(503, "the model is loading", "unavailable_error")

    def check_model(self, name: Any) -> None:
        """A request's ``model`` must be empty or the served one: never a path to load."""
        if name in (None, "", self.model_name):
            return
        if not isinstance(name, str):
            raise ApiError(400, "model must be a string", param="model")
        raise ApiError(404, f"model {name[:100]!r} is not served here; this server serves {self.model_name!r}",
                       "not_found_error", "model")

    # -- access -----------------------------------------------------------------------
    def authorize(self, header: str | None) -> str:
        """The caller's key (``Authorization: Bearer KEY``); any caller when no keys are set."""
        if not self.keys:
            return ""
        token = ""
        if header and header[:7].lower() == "bearer ":
            token = header[7:].strip()
        for key in self.keys:
            if token and hmac.compare_digest(token.encode(), key.encode()):
                return key
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", "authentication_error")

    def enter(self, who: str) -> None:
        """Count a request of ``who`` against its concurrency limit (429 past it)."""
        running = self._running.get(who, 0)
        if running >= PER_KEY_CONCURRENCY:
            raise ApiError(429, f"at most {PER_KEY_CONCURRENCY} requests at once per key", "rate_limit_error")
        self._running[who] = running + 1
        self.prometheus.in_flight.inc()

    def leave(self, who: str) -> None:
        """The request of ``who`` ended."""
        self._running[who] -= 1
        if not self._running[who]:
            del self._running[who]
        self.prometheus.in_flight.dec()

    def next_id(self, prefix: str) -> str:
        """A response id."""
        return f"{prefix}-{int(self.started)}-{next(self._ids)}"

    # -- completing -------------------------------------------------------------------
    async def complete(
        self,
        route: str,
        document: str,
        prefix: str,
        suffix: str,
        *,
        max_tokens: int | None,
        budget_ms: float | None,
        language: str = "plaintext",
        others: list[OpenDocument] | None = None,
        disconnected: Any = None,
        reuse_key: str | None = None,
    ) -> Result:
        """One completion of ``prefix`` + middle + ``suffix`` through the server's completion path.

        ``document`` keys the one-request-in-flight rule (a newer request for the same
        document stops the older one). ``disconnected`` (an async callable) is polled:
        a client that went away stops its request at the next denoising step.
        ``reuse_key``: whose previous context pass the request may reuse (:func:`reuse_key`).
        """
        engine = self.engine()
        settings = self.settings
        if max_tokens is not None:
            settings = replace(settings, max_middle_tokens=max(1, min(MAX_TOKENS, max_tokens)))
        if budget_ms is not None:
            settings = replace(settings, latency_budget_ms=budget_ms)
        text, offset, start = window(prefix + suffix, len(prefix), settings)
        started = time.perf_counter()
        task = asyncio.ensure_future(self.completions.complete(
            engine, document, text, offset, language, settings, version=None, current_version=lambda: None,
            automatic=False, others=others or [], document_start=start == 0, reuse_key=reuse_key,
        ))
        gone = False
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.05)
                if not task.done() and disconnected is not None and await disconnected():
                    log.info("%s: the client went away; its request stops", route)
                    gone = True
                    task.cancel()
            result = await task
        except asyncio.CancelledError:
            self.prometheus.requests.labels(route, "cancelled").inc()
            if gone:  # nobody reads the answer: no traceback for the server's log
                raise ApiError(499, "the client closed the request", "client_closed_request") from None
            raise
        except Exception:
            self.prometheus.requests.labels(route, "error").inc()
            raise
        finally:
            if not task.done():  # this handler itself was cancelled: stop the engine request too
                task.cancel()
        result.engine_stats["window_cut"] = len(text) < len(prefix) + len(suffix)
        self.prometheus.latency.labels(route).observe(time.perf_counter() - started)
        self.prometheus.requests.labels(route, result.source).inc()
        stats = result.engine_stats
        if "context_computed" in stats:
            self.prometheus.context_tokens.labels("reused").inc(stats["context_reused"])
            self.prometheus.context_tokens.labels("computed").inc(stats["context_computed"])
        if stats.get("forward_passes"):
            self.prometheus.forward_passes.inc(stats["forward_passes"])
            self.prometheus.tokens_per_forward.observe(stats.get("tokens_per_forward", 0.0))
        return result

    async def prime(self, key: str, prefix: str, suffix: str, language: str, others: list[OpenDocument]) -> int:
        """Run only the context pass of this window and keep it for ``key``'s next request (llama.vim's
        ``n_predict: 0`` requests, sent to warm the server's cache ahead of the user). Its number of
        context tokens, 0 when the model cannot keep context (an engine folder of format 2)."""
        engine = self.engine()
        if not engine.reuses_context or not self.settings.context_reuse:
            return 0
        text, offset, start = window(prefix + suffix, len(prefix), self.settings)
        settings = replace(self.settings, latency_budget_ms=60_000.0)  # a context pass is all it runs

        def work() -> Result:
            return complete_text(engine, text, offset, language, settings, others, lambda: True,
                                 document_start=start == 0, reuse=key)

        result = await asyncio.get_running_loop().run_in_executor(self.completions.executor, work)
        return int(result.engine_stats.get("context_tokens", 0))

    def status(self) -> dict[str, Any]:
        """``/v1/status``: what ``dlm/status`` reports in the editor."""
        return {
            **self.host.describe(),
            **self.metrics.snapshot(),
            "served_model": self.model_name,
            "cache_entries": len(self.completions.cache),
            "settings": {"latencyBudgetMs": self.settings.latency_budget_ms, "backend": self.settings.backend,
                         "minConfidence": self.settings.min_confidence},
        }
