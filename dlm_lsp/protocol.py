"""The JSON-RPC layer between the transport and the handlers: every request gets an answer.

pygls 2.1 leaves several messages unanswered or mishandled; :class:`DlmProtocol`
(pygls' ``LanguageServerProtocol`` with these changes) and :func:`dispatch` (which
checks a decoded message before pygls sees it) make each one follow JSON-RPC 2.0
and LSP 3.17:

* malformed JSON or bytes that are not UTF-8: ``-32700`` parse error (the request id
  recovered from the bytes when it can be); a batch: each request in it answered
  ``-32600`` in an array (LSP has no batches); a non-object, an id that is not a
  number or a string, a missing ``jsonrpc: "2.0"``: ``-32600``; params that do not
  fit the method (negative or over-int32 positions, say): ``-32602``, with what
  was wrong. pygls answered none of these, only logged them.
* a request before ``initialize``: ``-32002`` (pygls: ``-32603 workspace is not
  available``); notifications before it are dropped, ``exit`` excepted. A second
  ``initialize``: ``-32600`` (pygls re-initialised and forgot every open document).
  A request after ``shutdown``: ``-32600`` (pygls dropped it unanswered).
* the futures of notifications: pygls keeps each one in ``_request_futures`` for
  good (about 2 KB per keystroke, an all-day leak; see pygls issues 607 and 608);
  here a finished handler's future is always forgotten.
* ``exit`` calls :attr:`DlmProtocol.on_exit` (the stdio transport ends the process,
  a TCP session only its connection) instead of ``sys.exit`` wherever it runs.
* with :attr:`DlmProtocol.auth_token` set (TCP), ``initialize`` must carry it in
  ``initializationOptions.authToken``; otherwise it is refused and
  :attr:`DlmProtocol.on_unauthorized` closes the connection.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

import cattrs
from lsprotocol import types
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import (
    JsonRPCNotification,
    JsonRPCRequestMessage,
    JsonRPCResponseMessage,
    MsgId,
)
from pygls.protocol.language_server import lsp_method

if TYPE_CHECKING:
    from collections.abc import Generator

log = logging.getLogger(__name__)

PARSE_ERROR = types.ErrorCodes.ParseError.value
INVALID_REQUEST = types.ErrorCodes.InvalidRequest.value
INVALID_PARAMS = types.ErrorCodes.InvalidParams.value
INTERNAL_ERROR = types.ErrorCodes.InternalError.value
SERVER_NOT_INITIALIZED = types.ErrorCodes.ServerNotInitialized.value
UNAUTHORIZED = -32001
"""``initialize`` without the right ``authToken`` on an authenticated (TCP) connection."""
AUTH_OPTION = "authToken"

_ID_IN_BYTES = re.compile(rb'"id"\s*:\s*(-?\d{1,15}|"(?:[^"\\]|\\.){0,200}")')


def valid_id(value: Any) -> bool:
    """JSON-RPC ids are numbers or strings (null only in error replies); LSP's are integers or strings."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def recover_id(data: bytes) -> MsgId | None:
    """Best effort: the id of a request whose bytes could not be decoded, so its sender gets its error.

    Only from bytes that name a ``method`` (a request, not a response) and are not a
    ``$/cancelRequest`` (whose params hold another message's id).
    """
    if b'"method"' not in data or b"$/cancelRequest" in data:
        return None
    match = _ID_IN_BYTES.search(data)
    if match is None:
        return None
    try:
        value = json.loads(match.group(1))
    except ValueError:
        return None
    return value if valid_id(value) else None


def error_message(msg_id: MsgId | None, code: int, message: str) -> dict[str, Any]:
    """A JSON-RPC error response."""
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


class DlmProtocol(LanguageServerProtocol):
    """pygls' LSP protocol with every request answered and no per-message leak (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_seen = False
        self.auth_token: str | None = None
        """When set, ``initialize`` must carry it (``initializationOptions.authToken``)."""
        self.on_exit: Callable[[int], None] = _exit_process
        """What ``exit`` does, with the LSP exit code (0 after ``shutdown``, else 1)."""
        self.on_unauthorized: Callable[[], None] = lambda: None
        """Called after an unauthorized ``initialize`` was answered (the TCP session closes)."""

    @property
    def pending(self) -> int:
        """Handlers and requests to the client still waiting (the leak's measure: stays small)."""
        return len(self._request_futures)

    # -- sending ----------------------------------------------------------------------
    def send_error(self, msg_id: MsgId | None, code: int, message: str) -> None:
        """Answer a request (or an undecodable message, ``msg_id`` None) with an error."""
        self._send_data(error_message(msg_id, code, message))

    def send_raw(self, payload: Any) -> None:
        """Send a JSON value as one message (a batch reply is an array)."""
        self._send_data(payload)

    # -- receiving --------------------------------------------------------------------
    def handle_message(self, message: Any) -> None:
        """Gate on the session's state (initialize, shutdown, authentication), then pygls' dispatch."""
        method = getattr(message, "method", None)
        msg_id = getattr(message, "id", None)
        is_request = method is not None and hasattr(message, "id")
        if method == types.INITIALIZE and is_request:
            if self.initialize_seen:
                self.send_error(msg_id, INVALID_REQUEST, "initialize was already sent: one per session")
                return
            if self.auth_token is not None and not self._authorized(message.params):
                log.warning("refused an initialize without the right %s", AUTH_OPTION)
                self.send_error(msg_id, UNAUTHORIZED, f"unauthorized: initializationOptions.{AUTH_OPTION} is missing or wrong")
                self.on_unauthorized()
                return
            self.initialize_seen = True
        elif not self.initialize_seen and method is not None:
            if is_request:
                self.send_error(msg_id, SERVER_NOT_INITIALIZED, f"{method} before initialize")
            elif method != types.EXIT:
                log.debug("dropped %s before initialize", method)
            if method != types.EXIT:
                return
        if self._shutdown and is_request:
            self.send_error(msg_id, INVALID_REQUEST, f"{method} after shutdown")
            return
        super().handle_message(message)

    def _authorized(self, params: types.InitializeParams) -> bool:
        options = params.initialization_options
        token = options.get(AUTH_OPTION) if isinstance(options, dict) else None
        if not isinstance(token, str) or self.auth_token is None:
            return False
        return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.auth_token.encode())

    def _execute_handler(
        self,
        msg_id: MsgId,
        handler: Any,
        callback: Callable[[Future[Any]], None],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        """pygls' handler execution, forgetting the handler's future once it is done (pygls forgets
        only those of requests, so every notification handler's future stayed for good)."""

        def forget(future: Future[Any]) -> None:
            if self._request_futures.get(msg_id) is future:
                del self._request_futures[msg_id]
            callback(future)

        super()._execute_handler(msg_id, handler, forget, args, kwargs)

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> Generator[Any, Any, None]:
        """End the session: :attr:`on_exit` with 0 after ``shutdown``, else 1 (LSP)."""
        if (user_handler := self.fm.features.get(types.EXIT)) is not None:
            yield user_handler, args, None
        self.on_exit(0 if self._shutdown else 1)


def _exit_process(code: int) -> None:
    raise SystemExit(code)


def structure(protocol: DlmProtocol, message: dict[str, Any]) -> Any:
    """The typed message pygls' handlers take (``cattrs`` errors pass through to the caller)."""
    converter = protocol._converter
    method = message.get("method")
    if method is not None:
        message.setdefault("params", None)  # JSON-RPC lets params be left out
        fallback = JsonRPCRequestMessage if "id" in message else JsonRPCNotification
        return converter.structure(message, protocol.get_message_type(method) or fallback)
    if "error" in message:
        return converter.structure(message, types.ResponseErrorMessage)
    result_type = protocol._result_types.pop(message["id"], None) or JsonRPCResponseMessage
    return converter.structure(message, result_type)


def describe_structure_error(exc: Exception) -> str:
    """What was wrong with a message's params, in a line (``cattrs`` gives a tree of exceptions)."""
    if isinstance(exc, cattrs.BaseValidationError):
        problems = cattrs.transform_error(exc, path="$")
        return "; ".join(problems[:3]) or str(exc)
    return str(exc) or type(exc).__name__


def dispatch(protocol: DlmProtocol, message: Any) -> None:
    """Check one decoded JSON value against JSON-RPC 2.0, answer what is invalid, hand the rest to pygls."""
    if isinstance(message, list):
        _reject_batch(protocol, message)
        return
    if not isinstance(message, dict):
        protocol.send_error(None, INVALID_REQUEST, "a message must be a JSON object")
        return
    has_id = "id" in message
    msg_id = message.get("id")
    method = message.get("method")
    if has_id and not valid_id(msg_id) and (method is not None or msg_id is not None):
        protocol.send_error(None, INVALID_REQUEST, "an id must be a number or a string")
        return
    reply_id = msg_id if has_id and valid_id(msg_id) else None
    if message.get("jsonrpc") != "2.0":
        if method is not None and has_id:
            protocol.send_error(reply_id, INVALID_REQUEST, 'jsonrpc must be "2.0"')
        else:
            log.warning("dropped a message without jsonrpc 2.0")
        return
    if method is None:
        if not has_id or ("result" not in message and "error" not in message):
            log.warning("dropped a message that is neither a request, a notification nor a response")
            return
    elif not isinstance(method, str):
        if has_id:
            protocol.send_error(reply_id, INVALID_REQUEST, "method must be a string")
        return
    elif "params" in message and not isinstance(message["params"], (dict, list)) and message["params"] is not None:
        if has_id:
            protocol.send_error(reply_id, INVALID_PARAMS, "params must be an object or an array")
        return
    try:
        typed = structure(protocol, message)
    except Exception as exc:  # noqa: BLE001 - whatever the converter says, the sender hears it
        detail = describe_structure_error(exc)
        if method is not None and has_id and method != types.INITIALIZE and not protocol.initialize_seen:
            # The session's state answers first (LSP): params are not looked at before initialize.
            protocol.send_error(reply_id, SERVER_NOT_INITIALIZED, f"{method} before initialize")
        elif method is not None and has_id:
            protocol.send_error(reply_id, INVALID_PARAMS, f"invalid params for {method}: {detail}")
        else:
            log.warning("dropped an invalid %s: %s", method or "response", detail)
        return
    try:
        protocol.handle_message(typed)
    except Exception as exc:  # noqa: BLE001 - pygls answers handler errors; anything else still gets one
        log.exception("could not handle %s", method)
        if method is not None and has_id:
            protocol.send_error(reply_id, INTERNAL_ERROR, f"{method} failed: {exc}")


def _reject_batch(protocol: DlmProtocol, batch: list[Any]) -> None:
    """LSP sends one message per frame: a batch's requests are each answered ``-32600`` (in an array,
    as JSON-RPC answers a batch); one with no request in it gets one error."""
    replies = [
        error_message(item["id"], INVALID_REQUEST, "batches are not supported (LSP sends one message per frame)")
        for item in batch
        if isinstance(item, dict) and "method" in item and valid_id(item.get("id"))
    ]
    if replies:
        protocol.send_raw(replies)
    else:
        protocol.send_error(None, INVALID_REQUEST, "batches are not supported (LSP sends one message per frame)")
