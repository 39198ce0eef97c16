"""Transports: stdio (what editors launch) and authenticated TCP, one session per connection.

Both read with :class:`~dlm_lsp.framing.FrameDecoder` and check messages with
:func:`~dlm_lsp.protocol.dispatch` instead of pygls' reader (see those modules for
what that fixes). Over TCP (pygls: one server object shared by every connection,
stopped by the first one that closes, each new client re-initialising it and
receiving the previous client's responses) every connection gets its own server
(documents, settings, model, responses), closing a connection ends only its
session, and a client must present a token from a file only the user can read:
``initializationOptions.authToken``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, BinaryIO, Callable, Iterator

from dlm_lsp.framing import MAX_BODY_BYTES, Broken, FrameDecoder, Frame
from dlm_lsp.protocol import PARSE_ERROR, DlmProtocol, dispatch, recover_id

if TYPE_CHECKING:
    from dlm_lsp.server import DlmLanguageServer

log = logging.getLogger(__name__)

STALL_S = 1.0
"""With part of a message read, this long without bytes makes the decoder look for a wrong length."""
AUTH_TIMEOUT_S = 10.0
"""A TCP client must have sent an authorised ``initialize`` within this time."""
TOKEN_BYTES = 32


class Connection:
    """Bytes in, messages to the protocol: frames decoded, broken ones answered, the rest dispatched."""

    def __init__(self, protocol: DlmProtocol, max_body: int = MAX_BODY_BYTES) -> None:
        self.protocol = protocol
        self.decoder = FrameDecoder(max_body)
        self._warned_wait = False

    async def feed(self, data: bytes) -> None:
        """Handle the next bytes of the stream."""
        await self._handle(self.decoder.feed(data))

    async def stalled(self) -> None:
        """No bytes came for :data:`STALL_S` with a message half read."""
        events = list(self.decoder.stall())
        if not events and not self._warned_wait:
            self._warned_wait = True
            log.warning("waiting for %d more bytes of a message (a wrong Content-Length?); "
                        "it is cut at the next message that arrives", self.decoder.waiting_for)
        await self._handle(iter(events))

    async def _handle(self, events: Iterator[Frame | Broken]) -> None:
        for index, event in enumerate(events):
            if index:  # what the last message started runs before the next one, as when they come one by one
                await asyncio.sleep(0)
            if isinstance(event, Frame):
                self._warned_wait = False
                await self._message(event.body)
            else:
                log.warning("broken message: %s", event.reason)
                self.protocol.send_error(recover_id(event.data), PARSE_ERROR, f"broken message: {event.reason}")

    async def _message(self, body: bytes) -> None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.protocol.send_error(recover_id(body), PARSE_ERROR, f"not UTF-8 (byte {exc.start})")
            return
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self.protocol.send_error(recover_id(body), PARSE_ERROR, f"not JSON: {str(exc)[:120]}")
            self.decoder.recover(body)  # if the length swallowed the next message, it is read next
            return
        dispatch(self.protocol, message)


async def pump(read: Callable[[], Awaitable[bytes]], connection: Connection) -> None:
    """Read chunks until the stream ends, telling the connection when a half-read message stalls."""
    pending: asyncio.Future[bytes] | None = None
    while True:
        if pending is None:
            pending = asyncio.ensure_future(read())
        done, _ = await asyncio.wait({pending}, timeout=STALL_S if connection.decoder.mid_frame else None)
        if not done:
            await connection.stalled()
            continue
        data = pending.result()
        pending = None
        if not data:
            return
        await connection.feed(data)


class _StdoutWriter:
    """pygls' writer interface over a binary stdout."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.close()


def serve_stdio(server: DlmLanguageServer, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Serve one client over stdin/stdout until it exits or closes the stream; the exit status."""
    source = stdin or sys.stdin.buffer
    protocol: DlmProtocol = server.protocol  # type: ignore[assignment]
    protocol.set_writer(_StdoutWriter(stdout or sys.stdout.buffer))
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlm-stdin")
    read1 = getattr(source, "read1", None) or source.read

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await pump(lambda: loop.run_in_executor(reader, read1, 1 << 16), Connection(protocol))

    code = 0
    try:
        asyncio.run(main())
    except SystemExit as exc:  # the exit notification
        code = exc.code if isinstance(exc.code, int) else 0
    except (BrokenPipeError, KeyboardInterrupt):
        log.info("the client went away")
    finally:
        server.close()
        reader.shutdown(wait=False, cancel_futures=True)
    return code


def default_token_file() -> Path:
    """Where ``dlm-lsp --tcp`` keeps its token: the user's runtime (else state) folder."""
    import platformdirs

    base = Path(platformdirs.user_runtime_dir("dlm-lsp", appauthor=False, ensure_exists=False))
    if not _can_make(base):
        base = Path(platformdirs.user_state_dir("dlm-lsp", appauthor=False))
    return base / "tcp-token"


def _can_make(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def load_token(path: Path) -> str:
    """The token in ``path``, created (random, mode 0600, in a 0700 folder) when missing.

    Refuses a file that others may read or that is not the user's own: anyone who
    can read the token can drive the server, which reads the files the user opens.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        token = secrets.token_urlsafe(TOKEN_BYTES)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as out:
            out.write(token + "\n")
        return token
    info = path.stat()
    if info.st_mode & 0o077:
        raise PermissionError(f"{path} may be read by other users (mode {info.st_mode & 0o777:o}): chmod 600 {path}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user")
    token = path.read_text(encoding="ascii").strip()
    if len(token) < 16:
        raise ValueError(f"{path} holds no token of at least 16 characters")
    return token


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _SocketWriter:
    """pygls' writer interface over an asyncio stream (writes are buffered, never block the loop)."""

    def __init__(self, stream: asyncio.StreamWriter) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        if not self._stream.is_closing():
            self._stream.write(data)

    def close(self) -> None:
        self._stream.close()


async def serve_tcp(
    make_server: Callable[[], DlmLanguageServer],
    host: str,
    port: int,
    token: str,
    ready: Callable[[list[Any]], None] | None = None,
) -> None:
    """Accept connections until cancelled; each one is a session with its own server.

    ``ready`` gets the listening sockets' addresses (a test binds port 0 and reads the port).
    """
    sessions: set[asyncio.Task[None]] = set()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        log.info("session from %s", peer)
        server = make_server()
        protocol: DlmProtocol = server.protocol  # type: ignore[assignment]
        protocol.auth_token = token
        protocol.set_writer(_SocketWriter(writer))
        ended = asyncio.Event()
        protocol.on_exit = lambda code: ended.set()
        protocol.on_unauthorized = ended.set
        connection = Connection(protocol)
        reading = asyncio.ensure_future(pump(lambda: reader.read(1 << 16), connection))
        ending = asyncio.ensure_future(ended.wait())
        try:
            done, _ = await asyncio.wait({reading, ending}, timeout=AUTH_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not done and not protocol.initialize_seen:
                log.warning("closed a connection from %s: no authorised initialize within %g s", peer, AUTH_TIMEOUT_S)
            elif not done:
                await asyncio.wait({reading, ending}, return_when=asyncio.FIRST_COMPLETED)
            if reading.done() and not reading.cancelled() and reading.exception() is not None:
                log.warning("session from %s ended: %s", peer, reading.exception())
        finally:
            reading.cancel()
            ending.cancel()
            server.close()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
            log.info("session from %s closed", peer)

    def start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(session(reader, writer))
        sessions.add(task)
        task.add_done_callback(sessions.discard)

    if not is_loopback(host):
        log.warning("listening on %s, beyond this machine: every client still needs the token, but the "
                    "traffic (your code) is not encrypted; prefer 127.0.0.1 and an SSH tunnel", host)
    listener = await asyncio.start_server(start, host, port)
    addresses = [sock.getsockname() for sock in listener.sockets]
    log.warning("dlm-lsp listening on %s", ", ".join(f"{a[0]}:{a[1]}" for a in addresses))
    if ready is not None:
        ready(addresses)
    try:
        async with listener:
            await listener.serve_forever()
    finally:
        for task in list(sessions):
            task.cancel()
