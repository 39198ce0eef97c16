"""``GET /health`` (as llama.cpp answers it), ``GET /metrics`` (Prometheus) and ``GET /v1/status``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dlm_lsp.http.service import Service

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 ``{"status": "ok"}`` when the model is ready; 503 while it loads or after it failed."""
    service: Service = request.app.state.service
    state = service.host.state
    if state == "ready":
        return JSONResponse({"status": "ok"})
    message = "Loading model" if state in ("idle", "loading") else f"the model failed to load: {service.host.error}"
    kind = "unavailable_error"
    return JSONResponse({"status": "loading" if state != "error" else "error",
                         "error": {"code": 503, "message": message, "type": kind}}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Requests, latency, forward passes, tokens per forward pass and requests in flight."""
    service: Service = request.app.state.service
    service.authorize(request.headers.get("authorization"))
    return Response(generate_latest(service.prometheus.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/status")
async def status(request: Request) -> Any:
    """What ``dlm/status`` reports in the editor: model, state, latencies, counters."""
    service: Service = request.app.state.service
    service.authorize(request.headers.get("authorization"))
    return service.status()
