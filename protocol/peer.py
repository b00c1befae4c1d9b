"""The thin trio shell around ``Connection``: one reader task drains events; requests from the
other side each run in their own task (so a handler may itself call the other side);
notices are handled in order, inline; replies wake the request that waits for them.

Every wait on the other side has a cap: a request times out (``trio.TooSlowError``, its id
forgotten so a late reply is dropped), and a send that cannot finish within
``send_timeout`` means the peer stopped reading: the connection is closed rather than
letting it block us. Writes are serialised by a lock, so frames never interleave.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import trio
from msixhub.protocol.connection import (
    NEED_DATA,
    Closing,
    Connection,
    ErrorReply,
    Notice,
    PeerHello,
    RejectedNotice,
    RejectedReply,
    RejectedRequest,
    Reply,
    Request,
    State,
)
from msixhub.protocol.errors import (
    ConnectionClosed,
    ErrorCode,
    MessageError,
    MsixhubError,
    ProtocolError,
    RemoteError,
)
from msixhub.protocol.fds import OwnedFd, close_all
from msixhub.protocol.frame import DEFAULT_MAX_FDS, DEFAULT_MAX_FRAME
from msixhub.protocol.messages import Hello, Role
from msixhub.protocol.schema import Message
from msixhub.protocol.transport import Transport

log = logging.getLogger("msixhub.peer")

DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_SEND_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 5.0
MAX_CONCURRENT_REQUESTS = 64

ReplyWithFds = tuple[Message, Sequence[OwnedFd]]
RequestHandler = Callable[["Peer", Request], Awaitable[Message | ReplyWithFds]]
NoticeHandler = Callable[["Peer", Notice], Awaitable[None]]


@dataclass(slots=True)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    result: Reply | ErrorReply | RejectedReply | None = None


async def _refuse_requests(peer: Peer, request: Request) -> Message:
    raise MessageError(ErrorCode.UNKNOWN_OP, f"{request.op} is not served by this end")


async def _ignore_notices(peer: Peer, notice: Notice) -> None:
    close_all(notice.fds)


class Peer:
    """An open, handshaken msixhub connection."""

    def __init__(
        self,
        transport: Transport,
        connection: Connection,
        *,
        on_request: RequestHandler = _refuse_requests,
        on_notice: NoticeHandler = _ignore_notices,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        self.transport = transport
        self.connection = connection
        self.on_request = on_request
        self.on_notice = on_notice
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.log = log.getChild(connection.name or f"fd{transport.socket.fileno()}")
        self.closed = trio.Event()
        self.close_reason = ""
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._request_slots = trio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._serve_scope: trio.CancelScope | None = None

    @property
    def peer_hello(self) -> Hello:
        assert self.connection.peer is not None
        return self.connection.peer

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    # --- calling the other side ------------------------------------------------------------

    async def request(
        self, body: Message, fds: Sequence[int] = (), *, timeout: float | None = None
    ) -> tuple[Message, list[OwnedFd]]:
        """Send a request and wait for its reply; the reply's fds are the caller's to close.

        Raises RemoteError (the other side refused), ConnectionClosed, trio.TooSlowError."""
        if self.closed.is_set():
            raise ConnectionClosed(self.close_reason or "connection is closed")
        request_id, data = self.connection.send_request(body, fds)
        waiter = _Waiter()
        self._waiters[request_id] = waiter
        try:
            with trio.fail_after(self.request_timeout if timeout is None else timeout):
                await self._send(data, fds)
                await waiter.done.wait()
        except BaseException:
            self._waiters.pop(request_id, None)
            self.connection.forget(request_id)
            if isinstance(waiter.result, Reply):
                close_all(waiter.result.fds)
            raise
        self._waiters.pop(request_id, None)
        result = waiter.result
        if isinstance(result, Reply):
            return result.body, result.fds
        if isinstance(result, ErrorReply):
            raise RemoteError(result.code, result.message)
        if isinstance(result, RejectedReply):
            raise result.error
        raise ConnectionClosed(self.close_reason or "connection closed before the reply")

    async def call(
        self, body: Message, fds: Sequence[int] = (), *, timeout: float | None = None
    ) -> Message:
        """A request whose reply carries no fds (any that come are closed)."""
        reply, reply_fds = await self.request(body, fds, timeout=timeout)
        close_all(reply_fds)
        return reply

    async def notify(self, body: Message, fds: Sequence[int] = ()) -> None:
        """Send a one-way notice."""
        if self.closed.is_set():
            raise ConnectionClosed(self.close_reason or "connection is closed")
        await self._send(self.connection.send_notice(body, fds), fds)

    async def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        async with self._send_lock:
            try:
                with trio.fail_after(self.send_timeout):
                    await self.transport.send(data, fds)
            except trio.TooSlowError:
                await self.aclose("peer stopped reading (send timed out)")
                raise ConnectionClosed(self.close_reason) from None
            except ConnectionClosed as exc:
                await self.aclose(str(exc))
                raise

    # --- serving the other side ------------------------------------------------------------

    async def serve(self) -> None:
        """Read and dispatch until the connection closes; returns normally then."""
        try:
            with trio.CancelScope() as self._serve_scope:
                if self.closed.is_set():
                    return
                async with trio.open_nursery() as handlers:
                    try:
                        await self._read_loop(handlers)
                    finally:
                        handlers.cancel_scope.cancel()
        finally:
            self._serve_scope = None
            await self.aclose(self.close_reason or "connection closed")
            with trio.CancelScope(shield=True):
                await self.transport.aclose()

    async def _read_loop(self, handlers: trio.Nursery) -> None:
        connection = self.connection
        while True:
            try:
                event = connection.next_event()
                if event is NEED_DATA:
                    data, fds = await self.transport.receive()
                    connection.receive_data(data, fds)
                    continue
            except ProtocolError as exc:
                await self._close_with_reason(f"protocol error: {exc}")
                return
            except ConnectionClosed as exc:
                self.close_reason = str(exc)
                return
            if isinstance(event, Notice):
                await self._handle_notice(event)
            elif isinstance(event, Request):
                await self._request_slots.acquire()
                handlers.start_soon(self._handle_request, event)
            elif isinstance(event, Reply | ErrorReply | RejectedReply):
                self._resolve(event)
            elif isinstance(event, RejectedRequest):
                await self._send_quietly(connection.send_error(event.id, event.error))
            elif isinstance(event, RejectedNotice):
                self.log.warning("ignored bad notice %s: %s", event.op, event.error)
            elif isinstance(event, Closing):
                self.close_reason = f"peer closed: {event.reason}"
                return

    def _resolve(self, event: Reply | ErrorReply | RejectedReply) -> None:
        waiter = self._waiters.get(event.id)
        if waiter is None:  # an error not tied to a request of ours
            self.log.warning("unsolicited %s", event)
            return
        waiter.result = event
        waiter.done.set()

    async def _handle_notice(self, notice: Notice) -> None:
        try:
            await self.on_notice(self, notice)
        except MsixhubError as exc:
            self.log.warning("notice %s failed: %s", notice.op, exc)
        finally:
            close_all(notice.fds)  # the handler detached what it kept

    async def _handle_request(self, request: Request) -> None:
        reply_fds: Sequence[OwnedFd] = ()
        try:
            try:
                result = await self.on_request(self, request)
            except MessageError as error:
                data = self.connection.send_error(request.id, error)
            except RemoteError as error:  # a nested call failed: pass its reason on
                data = self.connection.send_error(
                    request.id, MessageError(error.code, error.message)
                )
            except (ConnectionClosed, trio.TooSlowError) as error:
                data = self.connection.send_error(
                    request.id, MessageError(ErrorCode.TIMEOUT, f"{request.op}: {error}")
                )
            else:
                body, reply_fds = result if isinstance(result, tuple) else (result, ())
                data = self.connection.send_reply(request, body, [fd.fileno() for fd in reply_fds])
            await self._send_quietly(data, [fd.fileno() for fd in reply_fds])
        except ProtocolError as exc:
            await self._close_with_reason(str(exc))
        finally:
            close_all(list(reply_fds))
            close_all(request.fds)
            self._request_slots.release()

    async def _send_quietly(self, data: bytes, fds: Sequence[int] = ()) -> None:
        with suppress(ConnectionClosed):
            await self._send(data, fds)

    async def _close_with_reason(self, reason: str) -> None:
        self.log.warning("closing: %s", reason)
        if self.connection.state is not State.CLOSED:
            data = self.connection.send_closing(reason)
            with trio.move_on_after(0.5):
                await self._send_quietly(data)
        await self.aclose(reason)

    async def aclose(self, reason: str = "closed") -> None:
        """Close the connection; every waiting request fails with ConnectionClosed."""
        if self.closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        self.closed.set()
        self.connection.close()
        for waiter in self._waiters.values():
            waiter.done.set()
        if self._serve_scope is not None:
            self._serve_scope.cancel()  # serve() closes the transport on its way out
        else:
            with trio.CancelScope(shield=True):
                await self.transport.aclose()


async def handshake(
    transport: Transport,
    role: Role,
    *,
    name: str = "",
    max_frame: int = DEFAULT_MAX_FRAME,
    max_fds: int = DEFAULT_MAX_FDS,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Connection:
    """Exchange hellos (both sides send first, so neither waits on the other)."""
    connection = Connection(
        role, name=name, max_frame=max_frame, max_fds=max_fds, fd_passing=transport.fd_passing
    )
    try:
        with trio.fail_after(timeout):
            await transport.send(connection.hello())
            while True:
                event = connection.next_event()
                if event is NEED_DATA:
                    data, fds = await transport.receive()
                    connection.receive_data(data, fds)
                    continue
                if isinstance(event, PeerHello):
                    return connection
                raise ProtocolError(f"expected hello, got {event}")
    except BaseException:
        connection.close()
        raise


@asynccontextmanager
async def open_peer(
    transport: Transport,
    role: Role,
    *,
    name: str = "",
    on_request: RequestHandler = _refuse_requests,
    on_notice: NoticeHandler = _ignore_notices,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[Peer]:
    """Handshake, then serve in the background for the duration of the block."""
    try:
        connection = await handshake(transport, role, name=name, max_frame=max_frame)
    except BaseException:
        await transport.aclose()
        raise
    peer = Peer(
        transport,
        connection,
        on_request=on_request,
        on_notice=on_notice,
        request_timeout=request_timeout,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.serve)
        try:
            yield peer
        finally:
            await peer.aclose("closed by us")
            nursery.cancel_scope.cancel()


async def connect_unix(path: str) -> Transport:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ConnectionClosed(f"cannot connect to {path}: {exc}") from None
    return Transport(sock)


async def connect_tcp(host: str, port: int) -> Transport:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ConnectionClosed(f"cannot connect to {host}:{port}: {exc}") from None
    stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    return Transport(stream.socket)
