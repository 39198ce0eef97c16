"""The real server end to end with a scripted model: whole responses, deterministic.

``tests/scripted_server.py`` runs the production server (``dlm_lsp.cli.main``) with
the shipped model's engine folder and tokenizer, and a model that always believes
the middle is ``SCRIPT["text"]``: the protocol, the completion service, the cache,
post-processing and the gate are the real ones, and every answer is known.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import converters, types
from pytest_lsp import ClientServerConfig, LanguageClient

SERVER = str(Path(__file__).resolve().parents[1] / "scripted_server.py")
URI = "file:///work/add.py"
TEXT = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"
SETTINGS = {"backend": "cpu", "debounceMs": 0, "tokenHealing": False, "latencyBudgetMs": 5000, "otherFiles": False}


def config(text: str, probability: float) -> ClientServerConfig:
    env = {**os.environ, "DLM_TEST_SCRIPT": json.dumps({"text": text, "p": probability})}
    return ClientServerConfig(server_command=[sys.executable, SERVER], server_env=env)


async def start(client: LanguageClient, push: bool = False, **settings: object) -> None:
    options = {**SETTINGS, **settings}
    client.set_configuration({"dlm": options})
    await client.initialize_session(types.InitializeParams(
        capabilities=types.ClientCapabilities(workspace=types.WorkspaceClientCapabilities(configuration=True)),
        initialization_options={"dlm": options, "statusNotifications": push},
    ))
    for _ in range(300):
        if (await status(client))["state"] in ("ready", "error"):
            break
        await asyncio.sleep(0.05)
    assert (await status(client))["state"] == "ready"
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=URI, language_id="python", version=1, text=TEXT)))


async def status(client: LanguageClient) -> dict:
    result = await client.protocol.send_request_async("dlm/status", {})
    return result if isinstance(result, dict) else result._asdict()


async def complete(client: LanguageClient, line: int, character: int) -> dict:
    """The whole response, as JSON."""
    result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=URI), position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)))
    return converters.get_converter().unstructure(result, types.InlineCompletionList)


def item(text: str, line: int, start: int, end: int | None = None) -> dict:
    """The JSON of a one-item list."""
    span = {"start": {"line": line, "character": start}, "end": {"line": line, "character": start if end is None else end}}
    return {"items": [{"insertText": text, "range": span}]}


def scripted(text: str, probability: float):  # type: ignore[no-untyped-def]
    """A client fixture on the server whose model believes ``text`` with ``probability``."""

    @pytest_lsp.fixture(config=config(text, probability))
    async def client(lsp_client: LanguageClient):  # type: ignore[no-untyped-def]
        yield lsp_client
        await lsp_client.shutdown_session()

    return client


sure = scripted("a + b\n", 0.9)
unsure = scripted("a + b\n", 0.2)
closing = scripted("a, b)\n", 0.9)


@pytest.mark.asyncio
async def test_the_whole_response(sure: LanguageClient):
    await start(sure)
    assert await complete(sure, 1, 11) == item("a + b", 1, 11)  # single line: the line break is not shown
    s = await status(sure)
    assert (s["requests"], s["completions"], s["backend"]) == (1, 1, "scripted")


@pytest.mark.asyncio
async def test_typing_the_suggestion_serves_the_rest_from_the_cache(sure: LanguageClient):
    await start(sure)
    assert await complete(sure, 1, 11) == item("a + b", 1, 11)
    sure.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=2),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(line=1, character=11), end=types.Position(line=1, character=11)),
            text="a")]))
    assert await complete(sure, 1, 12) == item(" + b", 1, 12)
    s = await status(sure)
    assert (s["requests"], s["completions"], s["cache_hits"]) == (2, 1, 1)


@pytest.mark.asyncio
async def test_an_accept_prefetches_the_next_suggestion_into_the_cache(sure: LanguageClient):
    await start(sure)
    sure.protocol.notify("dlm/didAcceptCompletion", {"acceptedLength": 4, "uri": URI, "position": {"line": 1, "character": 11}})
    for _ in range(100):  # the prefetch runs in the background; its suggestion lands in the cache
        if (await status(sure))["cache_entries"]:
            break
        await asyncio.sleep(0.05)
    assert (await status(sure))["cache_entries"] == 1
    assert await complete(sure, 1, 11) == item("a + b", 1, 11)
    s = await status(sure)
    assert (s["prefetches"], s["cache_hits"], s["accepted"]) == (1, 1, 1)


@pytest.mark.asyncio
async def test_an_auto_closed_paren_is_replaced_not_doubled(closing: LanguageClient):
    await start(closing)
    closing.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=2),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text="def add(a, b):\n    return max()\n")]))
    # the editor auto-closed "(": the suggestion's ")" replaces it (range end one past the cursor)
    assert await complete(closing, 1, 15) == item("a, b)", 1, 15, 16)


@pytest.mark.asyncio
async def test_unsure_suggestions_are_hidden_unless_the_gate_is_off(unsure: LanguageClient):
    await start(unsure)
    assert await complete(unsure, 1, 11) == {"items": []}
    assert (await status(unsure))["gated"] == 1
    unsure.set_configuration({"dlm": {**SETTINGS, "minConfidence": 0}})
    unsure.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
    for _ in range(100):
        if await complete(unsure, 1, 11) == item("a + b", 1, 11):
            break
        await asyncio.sleep(0.05)
    assert await complete(unsure, 1, 11) == item("a + b", 1, 11)


@pytest.mark.asyncio
async def test_the_server_pushes_its_status_to_a_client_that_asks(sure: LanguageClient):
    pushed: list[dict] = []
    sure.feature("dlm/didChangeStatus")(lambda params: pushed.append(params if isinstance(params, dict) else params._asdict()))
    await start(sure, push=True)
    for _ in range(100):
        if any(p["state"] == "ready" for p in pushed):
            break
        await asyncio.sleep(0.05)
    assert [p["state"] for p in pushed][-1] == "ready" and pushed[-1]["enabled"] is True
    assert await complete(sure, 1, 11) == item("a + b", 1, 11)
    for _ in range(60):  # at most a second after the completion
        if pushed[-1]["requests"] == 1:
            break
        await asyncio.sleep(0.05)
    assert pushed[-1]["requests"] == 1 and pushed[-1]["last_latency_ms"] is not None
    sure.set_configuration({"dlm": {**SETTINGS, "enable": {"*": False}}})
    sure.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
    for _ in range(60):
        if pushed[-1]["enabled"] is False:
            break
        await asyncio.sleep(0.05)
    assert pushed[-1]["enabled"] is False


@pytest.mark.asyncio
async def test_no_status_is_pushed_unless_asked(sure: LanguageClient):
    pushed: list[object] = []
    sure.feature("dlm/didChangeStatus")(lambda params: pushed.append(params))
    await start(sure)
    assert await complete(sure, 1, 11) == item("a + b", 1, 11)
    await asyncio.sleep(1.2)
    assert pushed == []
