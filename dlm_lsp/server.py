"""The dlm-lsp language server (pygls 2): inline completions from a masked diffusion model.

Capabilities: ``textDocument/inlineCompletion`` (LSP 3.18) with incremental text
sync; position encodings negotiated by pygls (UTF-16 by default, UTF-8 when the
client offers it). ``initialize`` is answered at once and the model loads in the
background, reported with ``$/progress``. Custom messages:

* ``dlm/status`` (request): model, family, backend, device, state, latencies, counters, and
  whether completions are on (``enabled``, the ``"*"`` switch of the ``enable`` setting).
* ``dlm/didChangeStatus`` (notification to the client, when it sets ``statusNotifications:
  true`` in ``initializationOptions``): the same payload, pushed when the model's state or the
  settings change and after completions (at most once a second), so a status bar needs no polling.
* ``dlm/documentState`` (request, ``{"uri": ...}``): the version, length and sha256 of
  the document as the server holds it, so a client (or a test) can check that both
  sides hold the same text; null for a document that is not open.
* ``dlm/didShowCompletion``, ``dlm/didAcceptCompletion``,
  ``dlm/didPartiallyAcceptCompletion`` (notifications with ``{"acceptedLength": N}``):
  counted locally, never sent anywhere. ``dlm/didAcceptCompletion`` may also carry
  ``uri`` and ``position`` (the cursor after the insertion): the server then
  prefetches the next suggestion into the type-through cache.

Settings (section ``dlm``, :mod:`dlm_lsp.settings`) come from
``initializationOptions``, ``workspace/configuration`` and
``workspace/didChangeConfiguration``; invalid values are reported with
``window/showMessage`` and replaced by their defaults.

The ``model`` setting may name a catalog model (``dlm-lsp models list``). One
that is not downloaded is never fetched silently: the shipped model runs, and
the server asks with ``window/showMessageRequest`` ("Download NAME (size)" /
"Not now"); accepting downloads and converts it on a worker thread with
``$/progress``, then loads it. Declining keeps the shipped model and is not
asked again until the setting names another model or the server restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.server import LanguageServer

from dlm_lsp import __version__
from dlm_lsp.completion import CompletionService, longest_middle
from dlm_lsp.context import OpenDocument, window
from dlm_lsp.documents import Documents
from dlm_lsp.model_host import ModelHost
from dlm_lsp.protocol import AUTH_OPTION, DlmProtocol
from dlm_lsp.settings import SECTION, Settings, parse_settings
from dlm_lsp.status import Metrics

if TYPE_CHECKING:
    from engine.catalog import CatalogEntry

log = logging.getLogger(__name__)

STATUS = "dlm/status"
DID_SHOW = "dlm/didShowCompletion"
DID_ACCEPT = "dlm/didAcceptCompletion"
DID_PARTIALLY_ACCEPT = "dlm/didPartiallyAcceptCompletion"
DID_CHANGE_STATUS = "dlm/didChangeStatus"
DOCUMENT_STATE = "dlm/documentState"
PULL_PREFIX = "dlm-lsp models: "
"""How ``dlm-lsp models pull`` starts each progress and error line on stderr."""
STATUS_PUSH_INTERVAL_S = 1.0
"""Completions push the status at most this often (model and settings changes push at once)."""
MAX_OTHER_DOCUMENTS = 20
MAX_OTHER_DOCUMENT_CHARS = 1_000_000
"""Other open documents larger than this are not searched for snippets (a minified bundle, a log)."""
REQUEST_FAILED = types.LSPErrorCodes.RequestFailed.value
RELOAD_COMMAND = "dlm.reloadModel"
"""``workspace/executeCommand``: load the model again (after fixing its folder, say)."""


class DlmLanguageServer(LanguageServer):
    """pygls server holding the settings, the model and the completion service."""

    def __init__(self) -> None:
        super().__init__(
            "dlm-lsp", __version__, protocol_cls=DlmProtocol, text_document_sync_kind=types.TextDocumentSyncKind.Incremental
        )
        self.documents = Documents()
        """The open documents (pygls' workspace documents are not used: :mod:`dlm_lsp.documents`)."""
        self.settings = Settings()
        self.model = ModelHost()
        self.metrics = Metrics()
        self.completions = CompletionService(self.metrics)
        self.push_status = False
        """Whether the client asked for ``dlm/didChangeStatus`` (``initializationOptions.statusNotifications``)."""
        self._status_pushed_at = 0.0
        self._status_timer: asyncio.TimerHandle | None = None
        self._offered: set[str] = set()
        """Catalog models whose download was offered (asked once; again after a failed pull)."""
        self._tasks: set[asyncio.Future[None]] = set()
        self.pulling: str | None = None
        """The catalog model being downloaded and converted, if any."""
        self._warned_fit: tuple[int, int] | None = None
        self._failures_shown: set[str] = set()
        """Kinds of completion failure the user was told about (once each)."""

    # -- settings ---------------------------------------------------------------------
    def apply_settings(self, raw: Any) -> None:
        """Parse a whole ``dlm`` section, report problems, reload the model if it changed."""
        settings, problems = parse_settings(raw)
        for problem in problems:
            log.warning(problem)
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning, message=problem))
        self.settings = settings
        if self.model.state == "error" or (
            self.model.state != "idle" and self.model.wants_reload(
                settings.model, settings.backend, settings.endpoint, settings.endpoint_key_env, settings.endpoint_key_file,
                settings.threads,
            )
        ):
            self.start_model_load()  # a failed load is retried on any settings change: the cause may be fixed
        self.warn_if_too_long()
        self.send_status()

    def warn_if_too_long(self) -> None:
        """Say so once when the length settings ask for middles the loaded model's window cannot hold
        (they are capped: :func:`dlm_lsp.completion.longest_middle`)."""
        engine = self.model.engine if self.model.state == "ready" else None
        if engine is None:
            return
        positions = engine.info.window
        longest = max(*self.settings.lengths(True), *self.settings.lengths(False))
        if longest <= longest_middle(positions) or self._warned_fit == (longest, positions):
            return
        self._warned_fit = (longest, positions)
        message = (f"dlm: middles of up to {longest} tokens do not fit this model's {positions}-position window "
                   f"with context; they are capped at {longest_middle(positions)} tokens "
                   "(maxMiddleTokens / lengthCandidates)")
        log.warning(message)
        self.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning, message=message))

    async def pull_settings(self) -> None:
        """Ask the client for the ``dlm`` section, if it supports ``workspace/configuration``."""
        caps = self.client_capabilities.workspace
        if not (caps and caps.configuration):
            return
        try:
            result = await self.workspace_configuration_async(
                types.ConfigurationParams(items=[types.ConfigurationItem(section=SECTION)])
            )
        except Exception as exc:  # noqa: BLE001 - a client error must not take the server down
            log.warning("workspace/configuration failed: %s", exc)
            return
        if result and result[0] is not None:
            self.apply_settings(result[0])

    # -- model ------------------------------------------------------------------------
    def begin_progress(self, title: str, message: str) -> str | None:
        """Start a ``$/progress`` report when the client supports it; its token, or None."""
        window = self.client_capabilities.window
        if not (window and window.work_done_progress):
            return None
        token = f"dlm-{uuid.uuid4().hex[:8]}"
        try:
            self.work_done_progress.create(token)
            self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title, message=message))
        except Exception as exc:  # noqa: BLE001 - progress is never worth an error
            log.warning("cannot report progress: %s", exc)
            return None
        return token

    def end_progress(self, token: str, message: str) -> None:
        """End a ``$/progress`` report and forget its token (pygls keeps every token it created)."""
        self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
        self.work_done_progress.tokens.pop(token, None)

    def start_model_load(self) -> None:
        """Load the configured model in the background, with ``$/progress`` when the client supports it."""
        token = self.begin_progress("dlm: loading model", self.settings.endpoint or self.settings.model or "default model")

        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not called from the server's event loop
            loop = None

        def report(host: ModelHost, superseded: bool) -> None:  # on the event loop
            if superseded:  # the settings changed meanwhile: the newer load reports for itself
                if token is not None:
                    self.end_progress(token, "replaced by a newer load")
                return
            self.send_status()
            self.warn_if_too_long()
            if token is not None:
                message = "ready" if host.state == "ready" else f"failed: {host.error}"
                self.end_progress(token, message)
            if host.state == "error":
                self.window_show_message(
                    types.ShowMessageParams(type=types.MessageType.Error, message=f"dlm: model failed to load: {host.error}")
                )
            if host.missing is not None and host.missing.name not in self._offered:
                self._offered.add(host.missing.name)
                task = asyncio.ensure_future(self.offer_download(host.missing))
                self._tasks.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._tasks.discard)

        def done(host: ModelHost, superseded: bool) -> None:  # on the loader thread: sends go through the loop
            if loop is not None:
                loop.call_soon_threadsafe(report, host, superseded)
            else:
                report(host, superseded)

        if self.settings.endpoint:  # a remote engine: nothing loads here
            self.model.connect(self.settings.endpoint, self.settings.endpoint_key_env, self.settings.endpoint_key_file,
                               on_done=done)
        else:
            self.model.load(self.settings.model, self.settings.backend, on_done=done, threads=self.settings.threads,
                            progress=self._load_progress(token, loop))
        self.send_status()

    def _load_progress(self, token: str | None, loop: asyncio.AbstractEventLoop | None) -> Callable[[str], None]:
        """What a long load says as it goes (a TensorRT engine build): the log, and the editor's progress report."""
        def say(message: str) -> None:  # on the loader thread
            log.warning("loading model: %s", message)
            if token is not None and loop is not None:
                loop.call_soon_threadsafe(self.work_done_progress.report, token,
                                          types.WorkDoneProgressReport(message=message))
        return say

    async def offer_download(self, entry: CatalogEntry) -> None:
        """Ask the user whether to download a catalog model the settings name (``window/showMessageRequest``).

        Converting needs the ``export`` extra (PyTorch): without it the user is told
        how to install it instead of being offered a download that would fail.
        """
        import importlib.util

        from engine.catalog import size_text

        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx") is None:
            self._offered.discard(entry.name)
            self.window_show_message(
                types.ShowMessageParams(
                    type=types.MessageType.Warning,
                    message=(
                        f"dlm: the model {entry.name} is not downloaded, and converting it needs the export extra "
                        "in the server's environment: pip install -e '.[export]' in your dlm-lsp clone, then "
                        f"dlm-lsp models pull {entry.name}. The small demo model runs meanwhile."
                    ),
                )
            )
            return
        download = f"Download {entry.name} ({size_text(entry.download_bytes)})"
        try:
            choice = await self.window_show_message_request_async(
                types.ShowMessageRequestParams(
                    type=types.MessageType.Info,
                    message=(
                        f"dlm: the model {entry.name} ({entry.repo}, {entry.licence}) is not downloaded yet; "
                        "the small demo model runs meanwhile."
                    ),
                    actions=[types.MessageActionItem(title=download), types.MessageActionItem(title="Not now")],
                )
            )
        except Exception as exc:  # noqa: BLE001 - a client without the request: the status says what is missing
            log.warning("could not offer the download of %s: %s", entry.name, exc)
            return
        if choice is None or choice.title != download:
            log.info("download of %s declined; the shipped model stays", entry.name)
            return
        await self.pull_model(entry)

    async def pull_model(self, entry: CatalogEntry) -> None:
        """Download and convert a catalog model in a child process (``$/progress``), then load it.

        A child process (``dlm-lsp models pull``), not a thread: conversion takes
        gigabytes and minutes of Python work, which must neither stall completions
        nor take the server down if the system runs out of memory.
        """
        if self.pulling is not None:
            self.window_show_message(
                types.ShowMessageParams(
                    type=types.MessageType.Info, message=f"dlm: {self.pulling} is downloading; try again when it is done"
                )
            )
            return
        self.pulling = entry.name
        self.send_status()
        token = self.begin_progress(f"dlm: downloading {entry.name}", entry.repo)
        error: str | None = None
        last = ""
        child: asyncio.subprocess.Process | None = None
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dlm_lsp", "models", "pull", entry.name,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                # terminal bars redraw one line with carriage returns for minutes: lines are what is forwarded
                env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
                limit=1 << 20,
            )
            assert child.stderr is not None
            async for raw in child.stderr:
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                last = line
                log.info("pull %s: %s", entry.name, line)
                if token is not None and line.startswith(PULL_PREFIX):
                    self.work_done_progress.report(
                        token, types.WorkDoneProgressReport(message=line.removeprefix(PULL_PREFIX))
                    )
            if await child.wait() != 0:
                error = last.removeprefix(PULL_PREFIX + "error: ") or f"exit status {child.returncode}"
        except (OSError, ValueError) as exc:  # could not start, or a line past the reader's limit
            error = f"the download failed: {exc}"
            if child is not None and child.returncode is None:
                child.kill()
        self.pulling = None
        if token is not None:
            self.end_progress(token, error or "ready")
        if error is not None:
            self._offered.discard(entry.name)  # asked again on the next load of this setting
            self.window_show_message(
                types.ShowMessageParams(type=types.MessageType.Error, message=f"dlm: {entry.name}: {error}")
            )
        elif self.settings.model == entry.name:
            self.start_model_load()
        self.send_status()

    def send_status(self) -> None:
        """Push ``dlm/didChangeStatus`` (the ``dlm/status`` payload) to a client that asked for it."""
        if not self.push_status:
            return
        self._status_pushed_at = time.monotonic()
        if self._status_timer is not None:
            self._status_timer.cancel()
            self._status_timer = None
        try:
            self.protocol.notify(DID_CHANGE_STATUS, self.status())
        except Exception as exc:  # noqa: BLE001 - a status update is never worth an error
            log.debug("status push failed: %s", exc)

    def send_status_soon(self) -> None:
        """Push the status after a completion, at most every ``STATUS_PUSH_INTERVAL_S`` (the last one always)."""
        if not self.push_status or self._status_timer is not None:
            return
        wait = self._status_pushed_at + STATUS_PUSH_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.send_status()
            return
        self._status_timer = asyncio.get_running_loop().call_later(wait, self.send_status)

    def other_documents(self, uri: str, language_id: str) -> list[OpenDocument]:
        """Other open documents of the same language, for snippets (none when the setting is off)."""
        if not self.settings.other_files:
            return []
        same = [
            d for d in self.documents.values()
            if d.uri != uri and d.language_id == language_id and len(d) <= MAX_OTHER_DOCUMENT_CHARS
        ]
        return [OpenDocument(d.uri, language_id, d.text) for d in same[:MAX_OTHER_DOCUMENTS]]

    async def complete_at(self, uri: str, position: types.Position, *, automatic: bool) -> types.InlineCompletionList:
        """The one completion path, for requests and prefetches alike: the document and the other open
        ones as they are now, the completion service (cache, debounce, cancellation, stale drop), and the
        suggestion as an LSP item (empty when disabled, not ready, superseded, stale or hidden)."""
        empty = types.InlineCompletionList(items=[])
        doc = self.documents.get(uri)
        if doc is None:  # never read from disk what the client did not open (pygls would, lazily)
            log.debug("completion for %s, which is not open: none", uri)
            return empty
        language = doc.language_id or "plaintext"
        settings = self.settings
        engine, remote = self.model.engine, self.model.remote
        if not settings.enabled_for(language) or self.model.state != "ready" or (engine is None and remote is None):
            return empty
        offset = doc.offset_at(position)
        # only the text around the cursor goes further: a 5 MB line or file costs what a small one does
        text, at, start = window(doc.text, offset, settings)
        result = await self.completions.complete(
            engine,
            uri,
            text,
            at,
            language,
            settings,
            version=doc.version,
            current_version=lambda: getattr(self.documents.get(uri), "version", None),
            automatic=automatic,
            others=self.other_documents(uri, language),
            document_start=start == 0,
            remote=remote,
        )
        log.debug("completion %s: %s in %.1f ms", uri, result.source, result.latency_ms)
        self.send_status_soon()
        if result.suggestion is None:
            return empty
        begin = doc.position_at(start + at)
        end = doc.position_at(start + at + result.suggestion.replace_suffix)
        item = types.InlineCompletionItem(insert_text=result.suggestion.text, range=types.Range(start=begin, end=end))
        return types.InlineCompletionList(items=[item])

    def completion_failed(self, exc: Exception) -> JsonRpcException:
        """The error answer of a completion the engine failed on (``RequestFailed``, no traceback);
        the user is told once per kind of failure, the log has the details."""
        log.error("completion failed", exc_info=exc)
        what = f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ not in self._failures_shown:
            self._failures_shown.add(type(exc).__name__)
            self.window_show_message(types.ShowMessageParams(
                type=types.MessageType.Error,
                message=f"dlm: a completion failed ({what[:200]}); the server carries on (details in its log)",
            ))
        return JsonRpcException(code=REQUEST_FAILED, message=f"dlm: the completion failed: {what[:500]}")

    def close(self) -> None:
        """End this session's work: requests in flight stopped, tasks cancelled, the model released."""
        if self._status_timer is not None:
            self._status_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.completions.close()
        self.model.unload()
        self.documents.clear()

    def status(self) -> dict[str, Any]:
        """The ``dlm/status`` payload."""
        return {
            "version": __version__,
            **self.model.describe(),
            "pulling": self.pulling,
            **self.metrics.snapshot(),
            "cache_entries": len(self.completions.cache),
            "documents": len(self.documents),
            "pending_messages": self.protocol.pending,  # type: ignore[attr-defined]
            "threads": threading.active_count(),
            "tasks": _task_count(),
            "enabled": self.settings.enabled_for("*"),
            "settings": {"latencyBudgetMs": self.settings.latency_budget_ms, "backend": self.settings.backend},
        }


def _task_count() -> int:
    """asyncio tasks alive on this thread's loop (0 outside one): the storm test checks none leak."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def on_initialize(ls: DlmLanguageServer, params: types.InitializeParams) -> None:
    """Take settings from ``initializationOptions`` (the whole options object or its ``dlm`` key); a
    ``statusNotifications: true`` beside the ``dlm`` key asks for ``dlm/didChangeStatus`` pushes."""
    options = params.initialization_options
    if isinstance(options, dict) and AUTH_OPTION in options:  # the TCP token is not a setting
        options = {key: value for key, value in options.items() if key != AUTH_OPTION}
    if options is not None:
        ls.apply_settings(options)
    # only now: no custom notification may precede the initialize response
    ls.push_status = isinstance(options, dict) and options.get("statusNotifications") is True


async def on_initialized(ls: DlmLanguageServer, params: types.InitializedParams) -> None:
    """Fetch workspace settings, then load the model in the background."""
    await ls.pull_settings()
    ls.start_model_load()


async def on_did_change_configuration(ls: DlmLanguageServer, params: types.DidChangeConfigurationParams) -> None:
    """Re-read settings: pull them if the client supports it, else use the pushed ones."""
    caps = ls.client_capabilities.workspace
    if caps and caps.configuration:
        await ls.pull_settings()
    elif params.settings is not None:
        ls.apply_settings(params.settings)


def on_did_open(ls: DlmLanguageServer, params: types.DidOpenTextDocumentParams) -> None:
    """Keep the document (in the position encoding agreed at ``initialize``)."""
    ls.documents.open(params.text_document, ls.workspace.position_encoding)


def on_did_change(ls: DlmLanguageServer, params: types.DidChangeTextDocumentParams) -> None:
    """Apply the edits, in order."""
    ls.documents.change(params)


def on_did_close(ls: DlmLanguageServer, params: types.DidCloseTextDocumentParams) -> None:
    """Forget the document (its text and the engine's reusable context pass) and stop work for it."""
    uri = params.text_document.uri
    ls.documents.close(uri)
    ls.completions.cancel(uri)
    engine = ls.model.engine
    if engine is not None and engine.contexts is not None:
        engine.contexts.forget(uri)


def reload_model(ls: DlmLanguageServer, *args: Any) -> None:
    """``workspace/executeCommand`` ``dlm.reloadModel``: load the model of the current settings again
    (after fixing its folder, say), without restarting the editor."""
    ls.start_model_load()


async def on_inline_completion(
    ls: DlmLanguageServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList:
    """Ghost text at the cursor; an empty list when disabled, not ready, superseded, stale or hidden."""
    automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
    try:
        return await ls.complete_at(params.text_document.uri, params.position, automatic=automatic)
    except Exception as exc:  # noqa: BLE001 - the engine failed: a clear error, the server carries on
        raise ls.completion_failed(exc) from exc


def on_status(ls: DlmLanguageServer, params: Any) -> dict[str, Any]:
    """``dlm/status``: everything a status bar or ``:DlmStatus`` shows."""
    return ls.status()


def on_document_state(ls: DlmLanguageServer, params: Any) -> dict[str, Any] | None:
    """``dlm/documentState``: what the server holds of a document (null when it is not open)."""
    doc = ls.documents.get(_field(params, "uri") or "")
    if doc is None:
        return None
    data = doc.text.encode("utf-8", "surrogatepass")
    return {"uri": doc.uri, "version": doc.version, "length": len(doc.text), "lines": len(doc.lines),
            "sha256": hashlib.sha256(data).hexdigest(), "repairs": doc.repairs}


def on_did_show(ls: DlmLanguageServer, params: Any) -> None:
    """The client displayed a suggestion."""
    if ls.settings.metrics:
        ls.metrics.count("shown")


async def on_did_accept(ls: DlmLanguageServer, params: Any) -> None:
    """The user accepted a whole suggestion; prefetch the next one when told where the cursor is now.

    Params: ``{"acceptedLength": N, "uri": ..., "position": {"line": L, "character": C}}``
    (``uri``/``position``, the cursor after the insertion, are optional).
    """
    if ls.settings.metrics:
        ls.metrics.count("accepted")
        ls.metrics.count("accepted_chars", _accepted_length(params))
    if ls.model.state == "ready":
        await _prefetch(ls, params)


async def _prefetch(ls: DlmLanguageServer, params: Any) -> None:
    """Compute the suggestion at the cursor after an accept, into the type-through cache.

    Best effort: whatever goes wrong (a stale position, an engine error) is logged and
    counted (``prefetch_errors``), never shown to the user.
    """
    try:
        uri, position = _field(params, "uri"), _field(params, "position")
        if not uri or position is None:
            return
        cursor = types.Position(line=int(_field(position, "line")), character=int(_field(position, "character")))
        if uri not in ls.documents:
            return  # not open: nothing to prefetch (and nothing is ever read from disk)
        ls.metrics.count("prefetches")
        await ls.complete_at(uri, cursor, automatic=False)
    except Exception as exc:  # noqa: BLE001 - a failed prefetch must not reach the user
        ls.metrics.count("prefetch_errors")
        log.warning("prefetch failed: %s", exc)


def on_did_partially_accept(ls: DlmLanguageServer, params: Any) -> None:
    """The user accepted part of a suggestion (a word or a line)."""
    if ls.settings.metrics:
        ls.metrics.count("partially_accepted")
        ls.metrics.count("accepted_chars", _accepted_length(params))


def _field(params: Any, name: str) -> Any:
    """A field of a custom message's params (a dict, or pygls' namedtuple-like object)."""
    if isinstance(params, dict):
        return params.get(name)
    return getattr(params, name, None)


def _accepted_length(params: Any) -> int:
    value = _field(params, "acceptedLength")
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


FEATURES: list[tuple[str, Any, Callable[..., Any]]] = [
    (types.INITIALIZE, None, on_initialize),
    (types.INITIALIZED, None, on_initialized),
    (types.WORKSPACE_DID_CHANGE_CONFIGURATION, None, on_did_change_configuration),
    (types.TEXT_DOCUMENT_DID_OPEN, None, on_did_open),
    (types.TEXT_DOCUMENT_DID_CHANGE, None, on_did_change),
    (types.TEXT_DOCUMENT_DID_CLOSE, None, on_did_close),
    (types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions(), on_inline_completion),
    (STATUS, None, on_status),
    (DOCUMENT_STATE, None, on_document_state),
    (DID_SHOW, None, on_did_show),
    (DID_ACCEPT, None, on_did_accept),
    (DID_PARTIALLY_ACCEPT, None, on_did_partially_accept),
]
"""Every message the server handles: (method, registration options, handler)."""
OWN_DOCUMENTS = (types.TEXT_DOCUMENT_DID_OPEN, types.TEXT_DOCUMENT_DID_CHANGE, types.TEXT_DOCUMENT_DID_CLOSE)


def create_server() -> DlmLanguageServer:
    """A server with every feature registered: one per process over stdio, one per connection over TCP."""
    ls = DlmLanguageServer()
    for method in OWN_DOCUMENTS:  # pygls' own document sync is replaced (dlm_lsp.documents)
        ls.protocol.fm.builtin_features.pop(method, None)
    for method, options, handler in FEATURES:
        ls.feature(method, options)(handler)
    ls.command(RELOAD_COMMAND)(reload_model)
    return ls
