"""llama.cpp's infill API: ``POST /infill``, as llama.vim and llama.vscode call it.

Request fields used: ``input_prefix``, ``prompt`` (what is typed on the cursor's line:
it follows ``input_prefix``), ``input_suffix``, ``input_extra`` (``[{filename, text}]``:
other files' chunks, the server's other-file context), ``n_predict`` (the longest
middle, capped at 512; ``0`` only primes the context, as llama.vim does to warm its
cache, and answers at once), ``n_indent`` (a later line indented less ends the
middle), ``stop``, ``t_max_prompt_ms`` + ``t_max_predict_ms`` (together: the latency
budget, a hard deadline, at most 60 s; ``-1`` or ``0``: the server's budget),
``language`` (ours: an LSP language id or a file name), ``response_fields`` (only these fields, nested ones
flattened to ``"a/b"`` keys, as llama.cpp does), ``model``. Sampling fields (``top_k``, ``top_p``, ``samplers``,
``temperature``), ``cache_prompt`` and ``id_slot`` are accepted and do not apply. Reply:
``content``, ``stop``, ``stop_type``, ``tokens_predicted``, ``tokens_evaluated``,
``tokens_cached`` (context tokens reused from the client's previous request), ``truncated``, ``timings``, ``model``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from dlm_lsp.context import OpenDocument
from dlm_lsp.http.service import (
    MAX_EXTRA_CHARS,
    MAX_EXTRA_CHUNKS,
    MAX_TEXT_CHARS,
    ApiError,
    Service,
    document_key,
    language_id,
    parse_body,
    reuse_key,
)
from dlm_lsp.http.text import timings, with_stops, within_indent

router = APIRouter()


class ExtraChunk(BaseModel):
    """One chunk of another file."""

    model_config = ConfigDict(extra="ignore")
    filename: str = Field("", max_length=4096)
    text: str = Field("", max_length=MAX_TEXT_CHARS)


class InfillRequest(BaseModel):
    """The body of ``POST /infill``."""

    model_config = ConfigDict(extra="ignore")
    input_prefix: str = Field("", max_length=MAX_TEXT_CHARS)
    input_suffix: str = Field("", max_length=MAX_TEXT_CHARS)
    input_extra: list[ExtraChunk] = Field(default_factory=list, max_length=MAX_EXTRA_CHUNKS)
    prompt: str = Field("", max_length=MAX_TEXT_CHARS)
    n_predict: int = Field(-1, ge=-1, le=32_768)
    n_indent: int = Field(0, ge=0, le=1000)
    stop: list[str] = Field(default_factory=list, max_length=16)
    t_max_prompt_ms: int | None = Field(None, ge=-1, le=60_000)
    t_max_predict_ms: int | None = Field(None, ge=-1, le=60_000)
    response_fields: list[str] | None = Field(None, max_length=64)
    id_slot: int = Field(-1, ge=-1, le=1_000_000)
    model: str | None = None
    cache_prompt: bool = True
    language: str | None = Field(None, max_length=256)


def pick_fields(reply: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: the named fields only, a nested one as a flat ``"a/b"`` key."""
    picked: dict[str, Any] = {}
    for path in paths:
        value: Any = reply
        for part in path.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            picked[path] = value
    return picked


@router.post("/infill")
async def infill(request: Request) -> JSONResponse:
    """Fill in the middle at the end of ``input_prefix`` + ``prompt``."""
    service: Service = request.app.state.service
    who = service.authorize(request.headers.get("authorization"))
    body = await parse_body(request, InfillRequest)
    service.check_model(body.model)
    if any(len(s) > 1000 for s in body.stop):
        raise ApiError(400, "stop: strings of at most 1,000 characters", param="stop")
    prefix = body.input_prefix + body.prompt
    if sum(len(c.text) for c in body.input_extra) > MAX_EXTRA_CHARS:
        raise ApiError(400, f"input_extra: at most {MAX_EXTRA_CHARS} characters in all", param="input_extra")
    limits = [t for t in (body.t_max_prompt_ms, body.t_max_predict_ms) if t is not None and t > 0]
    budget = float(min(60_000, sum(limits))) if limits else None  # -1 or 0: no limit of the client's
    others = [OpenDocument(c.filename or f"chunk{i}", "", c.text) for i, c in enumerate(body.input_extra) if c.text]
    language = body.language
    others = [OpenDocument(d.uri, language_id(language), d.text) for d in others]
    client = request.client.host if request.client else "-"
    service.enter(who or client)
    try:
        if body.n_predict == 0:  # priming: encode the context now, for the next request to reuse
            cached = await service.prime(reuse_key("infill", who, request), prefix, body.input_suffix,
                                         language_id(language), others)
            service.prometheus.requests.labels("infill", "primed").inc()
            return JSONResponse(_shape({"content": "", "stop": True, "stop_type": "limit", "tokens_predicted": 0,
                                        "tokens_evaluated": cached, "tokens_cached": cached, "truncated": False,
                                        "timings": {}, "model": service.model_name}, body.response_fields))
        result = await service.complete(
            "infill", document_key("infill", who, request), prefix, body.input_suffix,
            max_tokens=None if body.n_predict < 0 else body.n_predict, budget_ms=budget,
            language=language_id(language), others=others, disconnected=request.is_disconnected,
            reuse_key=reuse_key("infill", who, request),
        )
    finally:
        service.leave(who or client)
    text = within_indent(result.suggestion.text if result.suggestion else "", body.n_indent)
    text, stopped = with_stops(text, body.stop)
    stats = result.engine_stats
    full = body.n_predict > 0 and stats.get("middle_tokens", 0) >= body.n_predict
    reply = {
        "content": text,
        "stop": True,
        "stop_type": "word" if stopped else "limit" if result.cut or full else "eos",
        "tokens_predicted": int(stats.get("middle_tokens", 0)),
        "tokens_evaluated": int(stats.get("context_tokens", 0)),
        "tokens_cached": int(stats.get("context_reused", 0)),  # kept from the client's previous request
        "truncated": bool(stats.get("window_cut", False)),
        "timings": timings(result),
        "model": service.model_name,
    }
    return JSONResponse(_shape(reply, body.response_fields))


def _shape(reply: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    return pick_fields(reply, fields) if fields else reply
