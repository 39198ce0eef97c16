"""Inception's Mercury fill-in-the-middle API: ``POST /v1/fim/completions`` and ``GET /v1/models``.

Request: ``model`` (optional; the served model's name), ``prompt`` (the text before the
cursor), ``suffix`` (after it), ``max_tokens`` (capped at 512, the longest middle), ``stop``
(a string or a list), ``stream`` (server-sent events ending with ``data: [DONE]``), and
``language`` (ours, optional: an LSP language id or a file name, for the syntax-aware
decisions). The header ``X-DLM-Budget-Ms`` (ours) sets the latency budget, as the
language server's remote mode sends it. ``user`` (optional) groups requests that replace each other; ``temperature``,
``top_p``, ``presence_penalty`` and ``frequency_penalty`` are accepted and do not apply: the middle is unmasked greedily, most confident
positions first. Reply: ``{id, object: "text_completion", created, model, choices: [{index,
text, finish_reason: "stop"|"length"}], usage}``. A diffusion model writes the whole middle
at once, so a stream carries it in one event, then the finish reason and usage.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dlm_lsp.http.service import (
    MAX_TEXT_CHARS,
    ApiError,
    Service,
    budget_header,
    document_key,
    language_id,
    parse_body,
    reuse_key,
)
from dlm_lsp.remote import BUDGET_HEADER
from dlm_lsp.http.text import finish_reason, usage, with_stops

router = APIRouter()


class FimRequest(BaseModel):
    """The body of ``POST /v1/fim/completions``."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    suffix: str = Field("", max_length=MAX_TEXT_CHARS)
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    stop: str | list[str] | None = None
    stream: bool = False
    language: str | None = Field(None, max_length=256)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = Field(None, max_length=256)


def stops(value: str | list[str] | None) -> list[str]:
    """``stop`` as a list (at most 16, each at most 1,000 characters)."""
    items = [value] if isinstance(value, str) else list(value or [])
    if len(items) > 16 or any(len(s) > 1000 for s in items):
        raise ApiError(400, "stop: at most 16 strings of at most 1,000 characters", param="stop")
    return [s for s in items if s]


@router.post("/v1/fim/completions")
async def fim_completions(request: Request) -> Any:
    """Fill in the middle between ``prompt`` and ``suffix``."""
    service: Service = request.app.state.service
    who = service.authorize(request.headers.get("authorization"))
    body = await parse_body(request, FimRequest)
    service.check_model(body.model)
    stop = stops(body.stop)
    client = request.client.host if request.client else "-"
    service.enter(who or client)
    try:
        result = await service.complete(
            "fim", document_key("fim", who, request, body.user), body.prompt, body.suffix,
            max_tokens=body.max_tokens, budget_ms=budget_header(request.headers.get(BUDGET_HEADER)),
            language=language_id(body.language),
            disconnected=request.is_disconnected, reuse_key=reuse_key("fim", who, request, body.user),
        )
    finally:
        service.leave(who or client)
    text, stopped = with_stops(result.suggestion.text if result.suggestion else "", stop)
    reply = {
        "id": service.next_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": service.model_name,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(result, body.max_tokens, stopped)}],
        "usage": usage(result),
    }
    if not body.stream:
        return JSONResponse(reply)
    return StreamingResponse(_events(reply), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(reply: dict[str, Any]) -> AsyncIterator[bytes]:
    choice = reply["choices"][0]
    head = {**reply, "choices": [{**choice, "finish_reason": None}]}
    head.pop("usage")
    yield b"data: " + json.dumps(head).encode() + b"\n\n"
    tail = {**reply, "choices": [{**choice, "text": ""}]}
    yield b"data: " + json.dumps(tail).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


@router.get("/v1/models")
async def models(request: Request) -> Any:
    """The one model this server serves."""
    service: Service = request.app.state.service
    service.authorize(request.headers.get("authorization"))
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": int(service.started),
                                        "owned_by": "dlm-serve"}]}
