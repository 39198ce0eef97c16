"""dlm-serve's HTTP API as a Ray Serve application: one model replica per GPU (or per CPU slot), many machines.

    serve run dlm_lsp/http/ray_serve.yaml          # in the foreground, on a running cluster or a local one
    serve deploy dlm_lsp/http/ray_serve.yaml       # to a running cluster (its head's dashboard, localhost:8265)

Each replica is one :class:`dlm_lsp.http.service.Service` behind the unchanged
:func:`dlm_lsp.http.app.create_app` (``@serve.ingress`` with the app built on the
replica), so the routes, keys, limits and error shapes are dlm-serve's. Ray adds
what one process cannot: replicas on every GPU of every machine, autoscaling on
queued requests, health checks that restart a replica whose model is gone, and
:class:`DocumentAffinityRouter`, which keeps one document's requests on one replica.

Settings come from the config's ``args`` (:class:`RayAppArgs`); API keys never do:
each replica reads ``DLM_SERVE_API_KEYS`` from its own environment (set it where
``ray start`` runs) or ``api_key_file`` on its own machine, and refuses to start
without keys when the HTTP proxy listens beyond loopback. docs/serve.md, "Ray Serve".

Only this module imports ray; the language server and ``dlm-serve`` never do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlm_lsp.http.app import create_app
from dlm_lsp.http.service import KEYS_ENV, Service, read_keys
from dlm_lsp.settings import Settings, parse_settings
from dlm_lsp.transport import is_loopback

log = logging.getLogger(__name__)

DEPLOYMENT = "DlmServe"
"""The deployment's name (replica actors are ``SERVE_REPLICA::<app>#DlmServe#<id>``).

A client keeps a document on one replica with :data:`dlm_lsp.remote.SESSION_HEADER` (Ray Serve's session
header, read by its proxy; a cluster started with ``RAY_SERVE_SESSION_ID_HEADER_KEY`` uses that name instead)."""
REPLICA_HEADER = "X-DLM-Replica"
"""The response header naming the replica that answered."""


class RayAppArgs(BaseModel):
    """The ``args:`` of the config's application: dlm-serve's flags, under the same names as its options."""

    model_config = ConfigDict(extra="forbid")
    model: str = ""
    """Catalog name or engine folder (the same path on every machine); empty: the shipped model."""
    backend: str | None = None
    """``auto``, ``tensorrt``, ``tensorrt-ep``, ``cuda``, ``cpu`` (default: ``auto``; on a GPU replica, its GPU)."""
    budget_ms: float | None = None
    """The latency budget of a request that sets none (default: the language server's, 150 ms)."""
    min_confidence: float | None = None
    """The confidence gate; 0 returns every middle."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The language server's settings (docs/server.md#settings), as a mapping or a JSON string; the fields above win."""
    max_batch_rows: int | None = Field(None, ge=0)
    """Concurrent requests' denoising steps run as one forward pass of at most this many rows (dlm-serve's
    ``--max-batch-rows``; default: its default); 0: each request on its own, two at a time."""
    api_key_file: str | None = None
    """A key file (one key per line) at this path on every machine; keys also come from ``DLM_SERVE_API_KEYS``."""
    load_timeout_s: float = Field(600.0, gt=0)
    """A replica whose model has not loaded after this long is unhealthy (and replaced)."""

    @field_validator("settings", mode="before")
    @classmethod
    def _settings_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError as exc:
                raise ValueError(f"settings is not JSON: {exc}") from exc
        return value

    def raw_settings(self) -> dict[str, Any]:
        """The settings object as dlm-serve builds it: ``settings`` with the named fields on top."""
        flags = {"model": self.model or None, "backend": self.backend, "latencyBudgetMs": self.budget_ms,
                 "minConfidence": self.min_confidence}
        return {**self.settings, **{key: value for key, value in flags.items() if value is not None}}


def parse_args(args: dict[str, Any] | RayAppArgs) -> tuple[Settings, str]:
    """The replicas' settings and served model name from the config's ``args``; ValueError naming every problem."""
    parsed = args if isinstance(args, RayAppArgs) else RayAppArgs.model_validate(args)
    settings, problems = parse_settings(parsed.raw_settings())
    if problems:
        raise ValueError("; ".join(problems))
    model = settings.model
    name = model if model and "/" not in model else (Path(model).name if model else "dlm-default")
    return settings, name


def proxy_host() -> str | None:
    """The address Ray Serve's HTTP proxies listen on, or None when the controller cannot say."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        return client.http_config.host if client is not None else None
    except Exception:  # noqa: BLE001 - a private API: unknown means "assume beyond loopback"
        log.warning("cannot read Ray Serve's HTTP options; API keys are required", exc_info=True)
        return None


def require_keys(keys: list[str], host: str | None) -> None:
    """Beyond loopback (or where the address is unknown) a replica needs API keys, as dlm-serve does."""
    if keys or (host is not None and is_loopback(host)):
        return
    where = f"on {host}" if host else "on an address this replica cannot read"
    raise RuntimeError(f"Ray Serve's HTTP proxy listens {where}, beyond this machine: give API keys "
                       f"({KEYS_ENV} in the environment of `ray start` on every machine, or args.api_key_file)")


class DocumentAffinityRouter(LocalityMixin, RequestRouter):
    """Keeps a document's requests on one replica; spreads the rest by the power of two choices.

    A request with a session id (the ``X-Session-Id`` header: a client's document, e.g.
    its URI) goes to the replica its id ranks first by rendezvous hashing over the
    replicas' ids (every proxy, on every machine, picks the same one; adding or losing a
    replica moves only the documents it gains or held), then to the second-ranked one, then
    to any, when the first is full (``max_ongoing_requests``). Same-document requests then
    meet on one replica, where a newer one stops the older at its next denoising step.
    Requests without the header take the usual route: two random replicas (on this
    proxy's machine first), the one with the shorter queue; or, with the router kwarg
    ``client_affinity: true``, the client's address stands for the document (a client such
    as llama.vim, whose priming requests and context reuse dlm-serve keys by address, then
    stays on the replica holding its context; wrong behind a proxy or NAT that gives every
    client one address: all of them would share one replica until it is full).
    """

    def initialize_state(self, client_affinity: bool = False, **kwargs: Any) -> None:
        """The config's ``request_router_kwargs``: ``client_affinity`` (default false)."""
        self.client_affinity = bool(client_affinity)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas to try in order (Ray probes each rank's queue lengths and takes the shortest)."""
        if not candidate_replicas:
            return []
        session = None
        if pending_request is not None:
            metadata = pending_request.metadata
            session = routing_key(metadata.session_id, getattr(metadata, "_client", ""),
                                  getattr(self, "client_affinity", False))
        if session and pending_request is not None:
            ranked = rank_by_document(session, candidate_replicas)
            pending_request.routing_context.should_backoff = True  # all full: back off before the next round
            return [[ranked[0]], *([[ranked[1]]] if len(ranked) > 1 else []), *([ranked[2:]] if len(ranked) > 2 else [])]
        ids = self.apply_locality_routing(pending_request)
        pool = [r for r in candidate_replicas if r.replica_id in ids] or candidate_replicas
        return [random.sample(pool, min(2, len(pool)))] if pool else []


def routing_key(session_id: str, client: str, client_affinity: bool) -> str:
    """What keeps requests together: the ``X-Session-Id`` value, else (with ``client_affinity``) the client's
    host without its port (Ray's ``host:port`` or ``[v6]:port``); empty: spread by queue length."""
    if session_id:
        return session_id
    if not client_affinity or not client:
        return ""
    return "client:" + (client.rsplit(":", 1)[0] if client.count(":") == 1 or client.startswith("[") else client)


def rank_by_document(document: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """``replicas`` best first for ``document``: rendezvous (highest random weight) hashing on the replicas' ids."""

    def weight(replica: RunningReplica) -> bytes:
        key = f"{document}\x00{replica.replica_id.unique_id}".encode()
        return hashlib.blake2b(key, digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


@serve.deployment(
    name=DEPLOYMENT,
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=8,
    max_queued_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=10,
    max_constructor_retry_count=3,
    request_router_config={"request_router_class": f"{__name__}.DocumentAffinityRouter"},
)
@serve.ingress()
class DlmServe:
    """One replica: a :class:`Service` (its own model, completion path, keys and metrics) behind dlm-serve's app.

    The app's lifespan starts the model loading; :meth:`check_health` holds the replica's
    first health check until the load ends, so Ray sends it requests only once the model
    is ready, and fails it (Ray then replaces the replica) when the load failed.
    """

    def __init__(self, args: dict[str, Any]) -> None:
        parsed = RayAppArgs.model_validate(args)
        settings, name = parse_args(parsed)
        keys = read_keys(Path(parsed.api_key_file) if parsed.api_key_file else None)
        require_keys(keys, proxy_host())
        self.load_timeout_s = parsed.load_timeout_s
        batching = {} if parsed.max_batch_rows is None else {"max_batch_rows": parsed.max_batch_rows}
        self.service = Service(settings, name, keys, **batching)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """dlm-serve's application on this replica's service (Ray runs its lifespan: the model starts loading),
        each answer naming its replica in ``X-DLM-Replica`` (which replica a document lands on, in logs and tests)."""
        app = create_app(self.service)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    async def check_health(self) -> None:
        """Ray Serve's health check: healthy once the model is ready; raises while it failed or never loaded."""
        host = self.service.host
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout_s
        while host.state in ("idle", "loading"):  # only during the first check: Ray waits for it at start
            if loop.time() > deadline:
                raise RuntimeError(f"the model has not loaded after {self.load_timeout_s:.0f} s")
            await asyncio.sleep(0.1)
        if host.state != "ready" or host.engine is None:
            raise RuntimeError(f"the model failed to load: {host.error}")


class ReplicaHeader:
    """ASGI middleware: ``X-DLM-Replica: <replica id>`` on every answer (Ray's replica logs use the same id)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the header to the response's start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def build_app(args: dict[str, Any]) -> Any:
    """The application builder the config's ``import_path`` names (``dlm_lsp.http.ray_app:build_app``).

    Validates ``args`` here, so a bad setting fails the deploy with its reason before any
    replica starts; each replica parses them again and reads its own keys.
    """
    parsed = RayAppArgs.model_validate(args)
    parse_args(parsed)
    return DlmServe.bind(parsed.model_dump())  # type: ignore[attr-defined]
