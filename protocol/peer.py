"""The thin trio shell around ``Connection``: one reader task drains events; requests from the
other side each run in their own task (so a handler may itself call the other side), or,
with ``inline_requests``, in the reader itself (cheaper, for handlers that never wait on
this peer); notices are handled in order, inline; replies wake the request that waits.

Every wait on the other side has a cap: a request times out (``trio.TooSlowError``, its id
forgotten so a late reply is dropped and its fds closed), and a send that cannot finish
within ``send_timeout`` means the peer stopped reading: the connection is closed rather
than letting it block us. Writes are serialised by a lock, so frames never interleave, and
a frame that started going out is always finished (or the connection closed), whatever
happens to the task that sent it: a cancelled sender never leaves half a frame behind.

The hot path is kept to what a round trip needs: a send that the socket takes at once
neither yields nor enters a cancel scope, and request deadlines are enforced by one
watchdog task per connection instead of one cancel scope per request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from enum import Enum

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


class _Verdict(Enum):
    """How a request ended without an answer."""

    TIMED_OUT = "timed out"
    CLOSED = "connection closed"


Outcome = Reply | ErrorReply | RejectedReply | _Verdict


class _Waiter:
    """One request awaiting its outcome; its task is parked only while ``task`` is set."""

    __slots__ = ("deadline", "result", "task")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.result: Outcome | None = None
        self.task: trio.lowlevel.Task | None = None

    def resolve(self, result: Outcome) -> None:
        self.result = result
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self.task = None  # cancelled: request() cleans up on its way out
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> Outcome:
        if self.result is None:
            self.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        assert self.result is not None
        return self.result


async def _refuse_requests(peer: Peer, request: Request) -> Message:
    raise MessageError(ErrorCode.UNKNOWN_OP, f"{request.op} is not served by this end")


async def _ignore_notices(peer: Peer, notice: Notice) -> None:
    close_all(notice.fds)


class Peer:
    """An open, handshaken msixhub connection.

    ``on_request`` answers the other side's requests: it returns the reply (or
    ``(reply, fds)``, whose fds the peer sends and then closes) or raises ``MessageError``
    for an error reply; any other exception is a bug, logged and answered ``internal``.
    With ``inline_requests=True`` it runs in the reader task, one request at a time: use
    it for handlers that do not wait on this same peer (they cannot: the reply they would
    wait for is read by the task they block). Otherwise each request runs in its own task,
    at most ``MAX_CONCURRENT_REQUESTS`` at once; past that the reader stops reading until
    one finishes (back-pressure on a flooding peer, which delays our own replies too)."""

    def __init__(
        self,
        transport: Transport,
        connection: Connection,
        *,
        on_request: RequestHandler = _refuse_requests,
        on_notice: NoticeHandler = _ignore_notices,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        inline_requests: bool = False,
    ) -> None:
        self.transport = transport
        self.connection = connection
        self.on_request = on_request
        self.on_notice = on_notice
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.inline_requests = inline_requests
        self.log = log.getChild(connection.name or f"fd{transport.socket.fileno()}")
        self.closed = trio.Event()
        self.close_reason = ""
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._request_slots = trio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._serve_scope: trio.CancelScope | None = None
        self._watchdog: trio.CancelScope | None = None  # its deadline: the earliest request's
        self._reader: trio.lowlevel.Task | None = None

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
        ``fds`` stay the caller's.

        Raises RemoteError (the other side refused), MessageError (we may not send this,
        e.g. FdPassingUnsupported on TCP: nothing was sent), ConnectionClosed,
        trio.TooSlowError (no reply within the timeout; a late reply is dropped)."""
        if self.closed.is_set():
            raise ConnectionClosed(self.close_reason or "connection is closed")
        if trio.lowlevel.current_task() is self._reader:
            raise RuntimeError(
                "a notice or inline request handler cannot wait for a reply on its own peer"
            )
        request_id, data = self.connection.send_request(body, fds)
        if timeout is None:
            timeout = self.request_timeout
        waiter = _Waiter(trio.current_time() + timeout)
        self._waiters[request_id] = waiter
        try:
            watchdog = self._watchdog
            if watchdog is None:  # nobody serves this peer (yet): a scope of our own
                with trio.fail_after(timeout):
                    await self._send(data, fds)
                    result = await waiter.wait()
            else:
                if waiter.deadline < watchdog.deadline:
                    watchdog.deadline = waiter.deadline
                await self._send(data, fds)
                result = await waiter.wait()
        except BaseException:
            self._waiters.pop(request_id, None)
            self.connection.forget(request_id)
            if isinstance(waiter.result, Reply):  # it came, but too late for us
                close_all(waiter.result.fds)
            raise
        if type(result) is Reply:
            return result.body, result.fds
        if type(result) is ErrorReply:
            raise RemoteError(result.code, result.message)
        if type(result) is RejectedReply:
            raise result.error
        if result is _Verdict.TIMED_OUT:
            raise trio.TooSlowError
        raise ConnectionClosed(self.close_reason or "connection closed before the reply")

    async def call(
        self, body: Message, fds: Sequence[int] = (), *, timeout: float | None = None
    ) -> Message:
        """A request whose reply carries no fds (any that come are closed)."""
        reply, reply_fds = await self.request(body, fds, timeout=timeout)
        if reply_fds:
            close_all(reply_fds)
        return reply

    async def notify(self, body: Message, fds: Sequence[int] = ()) -> None:
        """Send a one-way notice (a checkpoint even when the socket takes it at once)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closed.is_set():
            raise ConnectionClosed(self.close_reason or "connection is closed")
        await self._send(self.connection.send_notice(body, fds), fds)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole frame, or close the connection (and raise ConnectionClosed).

        The lock is taken only when the frame cannot go out at once: a frame the socket
        takes whole is sent without any await, so nothing can interleave with it."""
        lock = self._send_lock
        if lock.locked():
            await lock.acquire()  # cancellable: nothing of this frame is out yet
        else:
            try:
                sent = self.transport.send_nowait(data, fds)
            except ConnectionClosed as exc:
                await self._shut_down(str(exc), tell_peer=False)
                raise
            if sent == len(data):
                return
            lock.acquire_nowait()  # still free: nothing was awaited since we looked
            data = memoryview(data)[sent:]
            if sent:
                fds = ()
        try:
            # Once a frame has begun it must end, whatever happens to our caller;
            # send_timeout bounds how long a peer that stopped reading can hold us.
            with trio.CancelScope(shield=True), trio.fail_after(self.send_timeout):
                await self.transport.send(data, fds)
        except trio.TooSlowError:
            self.log.warning("closing: peer stopped reading (send timed out)")
            await self._shut_down("peer stopped reading (send timed out)", tell_peer=False)
            raise ConnectionClosed(self.close_reason) from None
        except ConnectionClosed as exc:
            await self._shut_down(str(exc), tell_peer=False)
            raise
        finally:
            lock.release()

    # --- serving the other side ------------------------------------------------------------

    async def serve(self) -> None:
        """Read and dispatch until the connection closes; returns normally then."""
        try:
            with trio.CancelScope() as self._serve_scope:
                if self.closed.is_set():
                    return
                async with trio.open_nursery() as handlers:
                    handlers.start_soon(self._expire_requests)
                    try:
                        await self._read_loop(handlers)
                    finally:
                        # No reply can come any more: close now, so that every request
                        # fails at once, not after the handlers finish (one that must finish,
                        # shielded, would otherwise wait for a reply here for ever).
                        self._mark_closed(
                            self.close_reason or "connection closed",
                            tell_peer=self.connection.state is not State.CLOSED,
                        )
                        handlers.cancel_scope.cancel()
        finally:
            self._serve_scope = None
            self._watchdog = None
            self._reader = None
            await self.aclose(self.close_reason or "connection closed")
            with trio.CancelScope(shield=True):
                await self.transport.aclose()

    async def _read_loop(self, handlers: trio.Nursery) -> None:
        connection = self.connection
        receive = self.transport.receive
        self._reader = trio.lowlevel.current_task()
        while True:
            try:
                event = connection.next_event()
                while event is NEED_DATA:
                    data, fds = await receive()
                    connection.receive_data(data, fds)
                    event = connection.next_event()
            except ProtocolError as exc:
                self.log.warning("closing: protocol error: %s", exc)
                await self._shut_down(f"protocol error: {exc}", tell_peer=True)
                return
            except ConnectionClosed as exc:
                self.close_reason = self.close_reason or str(exc)
                return
            if isinstance(event, Reply | ErrorReply | RejectedReply):
                self._resolve(event)
            elif isinstance(event, Request):
                if self.inline_requests:
                    await self._handle_request(event)
                else:
                    await self._request_slots.acquire()  # back-pressure on a flooding peer
                    handlers.start_soon(self._handle_request, event, True)
            elif isinstance(event, Notice):
                await self._handle_notice(event)
            elif isinstance(event, RejectedRequest):
                await self._answer_error(event.id, event.error)
            elif isinstance(event, RejectedNotice):
                self.log.warning("ignored bad notice %s: %s", event.op, event.error)
            elif isinstance(event, Closing):
                self.close_reason = f"peer closed: {event.reason}"
                return

    async def _expire_requests(self) -> None:
        """Fail the requests whose deadline passed (one sleeping task for all of them)."""
        deadline = math.inf
        while True:
            with trio.CancelScope(deadline=deadline) as self._watchdog:
                await trio.sleep_forever()
            now = trio.current_time()
            deadline = math.inf
            for request_id, waiter in list(self._waiters.items()):
                if waiter.deadline <= now:
                    del self._waiters[request_id]
                    self.connection.forget(request_id)
                    waiter.resolve(_Verdict.TIMED_OUT)
                else:
                    deadline = min(deadline, waiter.deadline)

    def _resolve(self, event: Reply | ErrorReply | RejectedReply) -> None:
        waiter = self._waiters.pop(event.id, None)
        if waiter is None:  # an error reply not tied to a request of ours (id 0)
            self.log.warning("unsolicited %s", event)
            if isinstance(event, Reply):
                close_all(event.fds)
            return
        waiter.resolve(event)

    async def _handle_notice(self, notice: Notice) -> None:
        try:
            await self.on_notice(self, notice)
        except MsixhubError as exc:
            self.log.warning("notice %s failed: %s", notice.op, exc)
        except Exception:
            self.log.exception("notice handler failed on %s", notice.op)
        finally:
            close_all(notice.fds)  # the handler detached what it kept

    async def _handle_request(self, request: Request, holds_slot: bool = False) -> None:
        reply_fds: Sequence[OwnedFd] = ()
        connection = self.connection
        try:
            try:
                result = await self.on_request(self, request)
                if isinstance(result, tuple):
                    body, reply_fds = result
                else:
                    body = result
                fds = [fd.fileno() for fd in reply_fds]
                data = connection.send_reply(request, body, fds)
            except MessageError as error:
                data, fds = connection.send_error(request.id, error), []
            except RemoteError as error:  # a nested call failed: pass its reason on
                error = MessageError(error.code, error.message)
                data, fds = connection.send_error(request.id, error), []
            except (ConnectionClosed, trio.TooSlowError) as error:
                error = MessageError(ErrorCode.TIMEOUT, f"{request.op}: {error}")
                data, fds = connection.send_error(request.id, error), []
            except ProtocolError:
                raise
            except Exception as exc:  # a bug in the handler: answer, log, keep serving
                self.log.exception("request handler failed on %s", request.op)
                error = MessageError(ErrorCode.INTERNAL, f"{request.op}: {type(exc).__name__}")
                data, fds = connection.send_error(request.id, error), []
            await self._send_quietly(data, fds)
        except ProtocolError as exc:  # the handler decided the stream is broken
            self.log.warning("closing: %s failed: %s", request.op, exc)
            await self._shut_down(f"protocol error: {exc}", tell_peer=True)
        except ConnectionClosed:
            pass  # the connection closed while the handler ran: nobody to answer
        finally:
            if reply_fds:
                close_all(list(reply_fds))
            if request.fds:
                close_all(request.fds)
            if holds_slot:
                self._request_slots.release()

    async def _answer_error(self, request_id: int, error: MessageError) -> None:
        with suppress(ConnectionClosed):  # nobody left to answer
            await self._send(self.connection.send_error(request_id, error))

    async def _send_quietly(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:  # noqa: SIM105 - the reply path: no context manager object per reply
            await self._send(data, fds)
        except ConnectionClosed:
            pass  # closed meanwhile, every waiter told: this reply has no reader

    async def aclose(self, reason: str = "closed") -> None:
        """Close the connection (telling the peer why, if that can be done without waiting);
        every waiting request fails with ConnectionClosed."""
        await self._shut_down(reason, tell_peer=self.connection.state is not State.CLOSED)

    def _mark_closed(self, reason: str, *, tell_peer: bool) -> bool:
        """The part of closing that never waits: no request may start, none waits any more.
        False if the connection was closed already."""
        if self.closed.is_set():
            return False
        self.close_reason = self.close_reason or reason
        self.closed.set()
        if tell_peer and not self._send_lock.locked():
            # Best effort and never blocking: a partial frame here is harmless (we close).
            with suppress(MsixhubError):
                self.transport.send_nowait(self.connection.send_closing(reason))
        self.connection.close()
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for waiter in waiters:
            waiter.resolve(_Verdict.CLOSED)
        return True

    async def _shut_down(self, reason: str, *, tell_peer: bool) -> None:
        if not self._mark_closed(reason, tell_peer=tell_peer):
            return
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
    """Exchange hellos (both sides send first, so neither waits on the other).

    Raises VersionMismatch (naming both versions) or ProtocolError after telling the peer
    why, ConnectionClosed, trio.TooSlowError. The transport stays the caller's."""
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
                if isinstance(event, Closing):
                    raise ConnectionClosed(f"peer closed during the handshake: {event.reason}")
                raise ProtocolError(f"expected hello, got {event}")
    except ProtocolError as exc:
        with suppress(MsixhubError):
            transport.send_nowait(connection.send_closing(str(exc)))
        connection.close()
        raise
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
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_frame: int = DEFAULT_MAX_FRAME,
    max_fds: int = DEFAULT_MAX_FDS,
    inline_requests: bool = False,
) -> AsyncIterator[Peer]:
    """Handshake, then serve in the background for the duration of the block."""
    try:
        connection = await handshake(
            transport, role, name=name, max_frame=max_frame, max_fds=max_fds
        )
    except BaseException:
        await transport.aclose()
        raise
    peer = Peer(
        transport,
        connection,
        on_request=on_request,
        on_notice=on_notice,
        request_timeout=request_timeout,
        send_timeout=send_timeout,
        inline_requests=inline_requests,
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
