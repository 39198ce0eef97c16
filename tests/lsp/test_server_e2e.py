"""The language server end to end: a real LSP client (pytest-lsp) over stdio.

The server runs as a subprocess (``python -m dlm_lsp``) on a tiny random-weight
engine folder, so these tests check the protocol and the plumbing; completion
quality is the evaluation harness's job.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import pytest_lsp
from lsprotocol import types
from lsp_client import init_params, wait_ready
from pytest_lsp import ClientServerConfig, LanguageClient

URI = "file:///work/example.py"
SOURCE = "import os\n\n\ndef greet(name):\n    message = \n    return message\n"


def open_doc(client: LanguageClient, text: str = SOURCE, uri: str = URI, language: str = "python", version: int = 1) -> None:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(uri=uri, language_id=language, version=version, text=text))
    )


async def inline(client: LanguageClient, line: int, character: int, uri: str = URI, automatic: bool = False):  # type: ignore[no-untyped-def]
    kind = types.InlineCompletionTriggerKind.Automatic if automatic else types.InlineCompletionTriggerKind.Invoked
    return await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=character),
            context=types.InlineCompletionContext(trigger_kind=kind),
        )
    )


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "dlm_lsp", "--log-level", "debug"]))
async def client(lsp_client: LanguageClient, tiny_engine):  # type: ignore[no-untyped-def]
    lsp_client.set_configuration({"dlm": {"model": str(tiny_engine), "backend": "cpu", "debounceMs": 0, "minConfidence": 0}})
    result = await lsp_client.initialize_session(init_params({"model": str(tiny_engine), "backend": "cpu"}))
    lsp_client.initialize_result = result  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


@pytest.mark.asyncio
async def test_capabilities_and_background_load(client: LanguageClient):
    caps = client.initialize_result.capabilities  # type: ignore[attr-defined]
    assert caps.inline_completion_provider is not None
    assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
    assert caps.position_encoding == types.PositionEncodingKind.Utf16
    status = await wait_ready(client)
    assert status["state"] == "ready", status
    assert status["family"] == "dream" and status["backend"] == "cpu"
    # the load was reported with $/progress, begun and ended
    reports = [r for values in client.progress_reports.values() for r in values]
    assert any(isinstance(r, types.WorkDoneProgressBegin) for r in reports)
    assert any(isinstance(r, types.WorkDoneProgressEnd) and r.message == "ready" for r in reports)


@pytest.mark.asyncio
async def test_completion_at_many_positions(client: LanguageClient):
    """Every position of a document is answered (the random model's items vary: whole responses are
    asserted with a scripted model in test_server_scripted.py)."""
    await wait_ready(client)
    open_doc(client)
    lines = SOURCE.split("\n")
    for line in range(len(lines)):
        for character in sorted({0, len(lines[line]) // 2, len(lines[line])}):
            result = await inline(client, line, character)
            assert isinstance(result, types.InlineCompletionList)
            for item in result.items:
                assert item.insert_text.strip()
                assert item.range.start == types.Position(line=line, character=character)
                assert item.range.end.line == line and item.range.end.character >= character
    status = await wait_ready(client)
    assert status["requests"] >= 10
    assert status["completions"] + status["empty"] + status["cache_hits"] == status["requests"]


@pytest.mark.asyncio
async def test_disabled_language_gets_nothing(client: LanguageClient):
    await wait_ready(client)
    open_doc(client, "Some notes\n", uri="file:///work/notes.md", language="markdown")
    result = await inline(client, 0, 10, uri="file:///work/notes.md")
    assert not result.items


@pytest.mark.asyncio
async def test_invalid_setting_is_reported_and_defaulted(client: LanguageClient, tiny_engine):
    await wait_ready(client)
    client.set_configuration({"dlm": {"model": str(tiny_engine), "latencyBudgetMs": -5, "multiline": "sometimes"}})
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
    for _ in range(50):
        if len(client.messages) >= 2:
            break
        await asyncio.sleep(0.1)
    texts = [m.message for m in client.messages]
    assert any("dlm.latencyBudgetMs" in t and "using the default 150.0" in t for t in texts), texts
    assert any("dlm.multiline" in t for t in texts), texts


@pytest.mark.asyncio
async def test_stale_version_is_dropped(client: LanguageClient, tiny_engine):
    """The document changes while the engine works (a 512-step middle, 2 s budget): its answer is dropped."""
    await wait_ready(client)
    await apply(client, slow_settings(tiny_engine, latencyBudgetMs=2000))
    open_doc(client)
    task = asyncio.ensure_future(inline(client, 4, 14))
    while (await wait_ready(client))["requests"] == 0:  # the request is with the engine now
        await asyncio.sleep(0.01)
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=2),
            content_changes=[types.TextDocumentContentChangeWholeDocument(text=SOURCE + "# edited\n")],
        )
    )
    result = await task
    status = await wait_ready(client)
    assert list(result.items) == []
    assert status["stale"] == 1 and status["completions"] == 0 and status["requests"] == 1


@pytest.mark.asyncio
async def test_metrics_notifications(client: LanguageClient):
    await wait_ready(client)
    client.protocol.notify("dlm/didShowCompletion", {})
    client.protocol.notify("dlm/didShowCompletion", {})
    client.protocol.notify("dlm/didAcceptCompletion", {"acceptedLength": 12})
    client.protocol.notify("dlm/didPartiallyAcceptCompletion", {"acceptedLength": 4})
    await asyncio.sleep(0.2)
    status = await wait_ready(client)
    assert status["shown"] == 2 and status["accepted"] == 1 and status["partially_accepted"] == 1
    assert status["accepted_chars"] == 16 and status["acceptance_rate"] == 1.0


def slow_settings(tiny_engine, **extra):  # type: ignore[no-untyped-def]
    """One token per step over a 512-token middle: hundreds of denoising steps per request."""
    return {"dlm": {"model": str(tiny_engine), "backend": "cpu", "debounceMs": 0, "confidenceThreshold": 1.0,
                    "multiline": "always", "maxMiddleTokens": 512, "lengthCandidates": [512], **extra}}


async def apply(client: LanguageClient, settings: dict) -> None:  # type: ignore[type-arg]
    client.set_configuration(settings)
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
    await asyncio.sleep(0.3)
    await wait_ready(client)


@pytest.mark.asyncio
async def test_newer_request_cancels_the_running_one(client: LanguageClient, tiny_engine):
    await wait_ready(client)
    await apply(client, slow_settings(tiny_engine, latencyBudgetMs=30000))
    open_doc(client)
    first = asyncio.ensure_future(inline(client, 4, 14))
    while (await wait_ready(client))["requests"] == 0:
        await asyncio.sleep(0.01)
    second = await inline(client, 4, 14)
    first_result = await first
    status = await wait_ready(client)
    assert not first_result.items
    assert status["cancelled"] >= 1
    assert isinstance(second, types.InlineCompletionList)


@pytest.mark.asyncio
async def test_budget_expiry_returns_committed_part(client: LanguageClient, tiny_engine):
    await wait_ready(client)
    await apply(client, slow_settings(tiny_engine, latencyBudgetMs=15))
    open_doc(client)
    result = await inline(client, 4, 14)
    status = await wait_ready(client)
    assert status["budget_cuts"] == 1
    assert status["last_latency_ms"] < 15 + 100  # the deadline holds (plus IPC and scheduling slack)
    assert isinstance(result, types.InlineCompletionList)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "dlm_lsp"]))
async def utf8_client(lsp_client: LanguageClient, tiny_engine):  # type: ignore[no-untyped-def]
    result = await lsp_client.initialize_session(
        init_params({"model": str(tiny_engine), "backend": "cpu", "debounceMs": 0},
                    encodings=[types.PositionEncodingKind.Utf8, types.PositionEncodingKind.Utf16], configuration=False)
    )
    lsp_client.initialize_result = result  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


@pytest.mark.asyncio
async def test_utf8_positions_on_non_ascii_text(utf8_client: LanguageClient):
    client = utf8_client
    assert client.initialize_result.capabilities.position_encoding == types.PositionEncodingKind.Utf8  # type: ignore[attr-defined]
    await wait_ready(client)
    line = 'greeting = "héllo wörld 🙂" + '
    open_doc(client, line + "\n")
    utf8_col = len(line.encode("utf-8"))
    result = await inline(client, 0, utf8_col)
    for item in result.items:
        assert item.range.start == types.Position(line=0, character=utf8_col)
    status = await wait_ready(client)
    assert status["requests"] == 1 and status["errors"] == 0


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "dlm_lsp"]))
async def broken_client(lsp_client: LanguageClient, tmp_path_factory):  # type: ignore[no-untyped-def]
    missing = tmp_path_factory.mktemp("nomodel") / "does-not-exist"
    await lsp_client.initialize_session(init_params({"model": str(missing)}, configuration=False))
    yield
    await lsp_client.shutdown_session()


@pytest.mark.asyncio
async def test_missing_model_is_reported_and_completions_are_empty(broken_client: LanguageClient):
    client = broken_client
    status = await wait_ready(client)
    assert status["state"] == "error" and "does not exist" in status["error"]
    for _ in range(50):
        if client.messages:
            break
        await asyncio.sleep(0.05)
    assert any("model failed to load" in m.message and m.type == types.MessageType.Error for m in client.messages)
    open_doc(client)
    result = await inline(client, 4, 14)
    assert not result.items


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "dlm_lsp"]))
async def shipped(lsp_client: LanguageClient):  # type: ignore[no-untyped-def]
    """The server on the shipped model, every suggestion shown (the positions are under test, not the gate)."""
    settings = {"backend": "cpu", "debounceMs": 0, "minConfidence": 0, "latencyBudgetMs": 5000}
    lsp_client.set_configuration({"dlm": settings})
    await lsp_client.initialize_session(init_params(settings))
    yield
    await lsp_client.shutdown_session()


@pytest.mark.asyncio
@pytest.mark.parametrize("text", ["def add(a, b):\n    return ", "def add(a, b):\r\n    return ", "x = 1\n\ny = "])
async def test_the_range_starts_at_the_cursor_at_the_very_end_of_a_document(shipped: LanguageClient, text: str):
    """No final newline: the cursor is at the end of the document (pygls' own helper put it on the next line)."""
    assert (await wait_ready(shipped))["state"] == "ready"
    open_doc(shipped, text=text, uri="file:///work/new.py")
    line = text.count("\n")
    character = len(text.rsplit("\n", 1)[-1])
    result = await inline(shipped, line, character, uri="file:///work/new.py")
    assert result.items, "the shipped model writes something here"
    assert result.items[0].range.start == types.Position(line=line, character=character)


@pytest.mark.asyncio
async def test_a_failed_prefetch_is_counted_never_shown(client: LanguageClient):
    await wait_ready(client)
    open_doc(client)
    client.protocol.notify("dlm/didAcceptCompletion", {"acceptedLength": 3, "uri": URI, "position": {"line": "x", "character": 0}})
    for _ in range(100):
        status = await wait_ready(client)
        if status["prefetch_errors"]:
            break
        await asyncio.sleep(0.05)
    assert status["prefetch_errors"] == 1 and status["errors"] == 0
    assert not client.messages  # no window/showMessage popup (pytest-lsp keeps them in a tuple)


@pytest.mark.asyncio
async def test_documents_the_client_did_not_open_are_never_read(client: LanguageClient, tmp_path):
    """A FIFO named by a request would block a server that reads it: nothing is read from disk."""
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    await wait_ready(client)
    client.protocol.notify("dlm/didAcceptCompletion", {"acceptedLength": 1, "uri": fifo.as_uri(), "position": {"line": 0, "character": 0}})
    result = await asyncio.wait_for(inline(client, 0, 0, uri=fifo.as_uri()), timeout=10)
    assert list(result.items) == []
    status = await asyncio.wait_for(wait_ready(client), timeout=10)  # still answering
    assert status["errors"] == 0 and status["prefetches"] == 0


@pytest.mark.asyncio
async def test_the_next_keystroke_reuses_the_documents_context(client: LanguageClient, tiny_engine):
    """Typing on: the second request encodes only what changed around the cursor (dlm/status counts
    reused and computed context tokens); with contextReuse off everything is computed again."""
    await wait_ready(client)
    body = "".join(f"def helper_{i}(value):\n    return value * {i}\n\n" for i in range(20))
    text = body + "def greet(name):\n    message = \n    return message\n"
    line = text[: text.index("message = ")].count("\n")
    open_doc(client, text)
    first = await inline(client, line, 14)
    before = await wait_ready(client)
    assert before["context_reused"] == 0 and before["context_computed"] > 100
    shown = first.items[0].insert_text if first.items else ""
    typed = "Q" if not str(shown).startswith("Q") else "Z"  # not what was suggested: no type-through cache hit
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=2),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(line=line, character=14), end=types.Position(line=line, character=14)),
            text=typed)],
    ))
    await inline(client, line, 15)
    after = await wait_ready(client)
    assert after["cache_hits"] == 0
    assert after["context_reused"] > 100 and after["context_computed"] - before["context_computed"] < 160
    await apply(client, {"dlm": {"model": str(tiny_engine), "backend": "cpu", "debounceMs": 0, "minConfidence": 0,
                                 "contextReuse": False}})
    await inline(client, line, 15)
    off = await wait_ready(client)
    assert off["context_reused"] == after["context_reused"]
