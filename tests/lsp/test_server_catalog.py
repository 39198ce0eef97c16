"""The server and a catalog model that is not downloaded: offered, never fetched silently.

A real client (pytest-lsp) starts the server with a team catalog naming a tiny
checkpoint that sits in a local Hugging Face cache (offline, real layout). The
setting names it; the server runs the shipped model, asks with
``window/showMessageRequest``, and on "Download" pulls it with ``$/progress``
and loads it; "Not now" leaves the shipped model in place.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from hub_cache import TINY_COMMIT, catalog_env, tiny_catalog
from lsp_client import init_params, wait_ready
from pytest_lsp import ClientServerConfig, LanguageClient

pytest.importorskip("torch")

ROOT = Path(tempfile.mkdtemp(prefix="dlm-catalog-test-"))
atexit.register(shutil.rmtree, ROOT, True)  # the server's environment names it before any fixture runs
COMMIT = TINY_COMMIT
ENV = {**os.environ, **catalog_env(ROOT / "hub", ROOT / "dlm-cache", ROOT / "catalog.json")}
"""What :func:`hub_cache.tiny_catalog` returns for ROOT (the server's environment is fixed before it starts)."""
CONFIG = ClientServerConfig(server_command=[sys.executable, "-m", "dlm_lsp", "--log-level", "info"], server_env=ENV)


async def _session(client: LanguageClient, answer: str) -> list[types.ShowMessageRequestParams]:
    asked: list[types.ShowMessageRequestParams] = []

    @client.feature(types.WINDOW_SHOW_MESSAGE_REQUEST)
    def on_request(params: types.ShowMessageRequestParams) -> types.MessageActionItem | None:
        asked.append(params)
        return next((a for a in params.actions or [] if a.title.startswith(answer)), None)

    client.set_configuration({"dlm": {"model": "tiny-dream", "backend": "cpu"}})
    await client.initialize_session(init_params({"model": "tiny-dream", "backend": "cpu"}))
    return asked


async def _status(client: LanguageClient) -> dict:
    status = await client.protocol.send_request_async("dlm/status", {})
    return status if isinstance(status, dict) else status._asdict()


@pytest_lsp.fixture(config=CONFIG)
async def client(lsp_client: LanguageClient):  # type: ignore[no-untyped-def]
    assert {k: ENV[k] for k in tiny_catalog(ROOT)} == tiny_catalog(ROOT)
    yield
    await lsp_client.shutdown_session()


@pytest.mark.asyncio
async def test_download_offered_accepted_pulled_and_loaded(client: LanguageClient):
    shutil.rmtree(ROOT / "dlm-cache" / "models" / "tiny-dream", ignore_errors=True)
    asked = await _session(client, "Download")
    status = await wait_ready(client)
    assert status["state"] == "ready" and status["model"].endswith(os.path.join("models", "default"))
    for _ in range(300):  # the offer, the pull and the reload
        status = await _status(client)
        if status["state"] == "ready" and "tiny-dream" in (status["model"] or ""):
            break
        await asyncio.sleep(0.1)
    assert len(asked) == 1
    assert "tiny-dream" in asked[0].message and "demo model runs meanwhile" in asked[0].message
    assert [a.title for a in asked[0].actions or []] == ["Download tiny-dream (1 MB)", "Not now"]
    assert status["model"] == str(ROOT / "dlm-cache" / "models" / "tiny-dream" / COMMIT[:12] / "int8"), status
    assert status["missing"] is None and status["pulling"] is None
    titles = [
        getattr(r, "title", None) for values in client.progress_reports.values() for r in values
        if isinstance(r, types.WorkDoneProgressBegin)
    ]
    assert "dlm: downloading tiny-dream" in titles
    # the status turns ready on the loader thread a moment before the event loop ends the progress
    for _ in range(50):
        ends = [r.message for values in client.progress_reports.values() for r in values
                if isinstance(r, types.WorkDoneProgressEnd)]
        if ends.count("ready") >= 3:
            break
        await asyncio.sleep(0.1)
    assert ends.count("ready") >= 3, ends  # the shipped model, the pull, the pulled model


@pytest.mark.asyncio
async def test_declining_keeps_the_shipped_model(client: LanguageClient):
    shutil.rmtree(ROOT / "dlm-cache" / "models" / "tiny-dream", ignore_errors=True)
    asked = await _session(client, "Not now")
    await wait_ready(client)
    for _ in range(50):
        if asked:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    status = await _status(client)
    assert len(asked) == 1
    assert status["state"] == "ready" and status["missing"] == "tiny-dream" and status["pulling"] is None
    assert status["model"].endswith(os.path.join("models", "default"))
    assert not (ROOT / "dlm-cache" / "models" / "tiny-dream" / COMMIT[:12]).exists()
