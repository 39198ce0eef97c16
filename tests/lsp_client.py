"""Helpers of the tests that drive the server through a real LSP client (pytest-lsp)."""

from __future__ import annotations

import asyncio

from lsprotocol import types
from pytest_lsp import LanguageClient


def init_params(options: dict, encodings=None, configuration: bool = True) -> types.InitializeParams:  # type: ignore[no-untyped-def]
    """``initialize`` parameters of a client with ``$/progress`` and (optionally) ``workspace/configuration``."""
    return types.InitializeParams(
        capabilities=types.ClientCapabilities(
            general=types.GeneralClientCapabilities(position_encodings=encodings) if encodings else None,
            workspace=types.WorkspaceClientCapabilities(configuration=configuration),
            window=types.WindowClientCapabilities(work_done_progress=True),
        ),
        initialization_options=options,
    )


async def wait_ready(client: LanguageClient, timeout: float = 60.0) -> dict:
    """Poll ``dlm/status`` until the model is ready or failed (or ``timeout``); the last status."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = await client.protocol.send_request_async("dlm/status", {})
        status = status if isinstance(status, dict) else status._asdict()  # pygls returns a namedtuple
        if status["state"] in ("ready", "error") or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.1)
