"""The FastAPI application: routes, the body limit, API keys and errors in the APIs' own shape.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
(the shape OpenAI-style clients such as Mercury's read, and close to llama.cpp's);
a request that fails validation is a 400 in that shape naming the field (the routes parse their
bodies with :func:`dlm_lsp.http.service.parse_body`), never FastAPI's default list,
and an unexpected failure is a 500 that says so without a traceback.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlm_lsp import __version__
from dlm_lsp.http import fim, health, infill
from dlm_lsp.http.service import MAX_BODY_BYTES, ApiError, Service

log = logging.getLogger(__name__)


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """The error shape of every route."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def create_app(service: Service) -> FastAPI:
    """The application serving ``service`` (its model starts loading when the app starts)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.load()
        yield
        service.completions.close()

    app = FastAPI(title="dlm-serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.include_router(fim.router)
    app.include_router(infill.router)
    app.include_router(health.router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, "invalid request", "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(500, f"the server failed on this request ({type(exc).__name__})", "server_error"),
                            status_code=500)

    return app


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413: by ``Content-Length`` before reading, and while
    reading for chunked bodies (ASGI middleware: the body is never held past the limit)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry: pass the request on with a counting ``receive``, or refuse it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"the request body is over {self.limit} bytes")
            return message

        try:
            await self.app(scope, limited, send)
        except ApiError:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(error_body(413, f"the request body is over {self.limit} bytes", "invalid_request_error"),
                                status_code=413)
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
