"""The trio shell that serves QEMU's ivshmem protocol for one ``IvshmemDomain``.

Every connection becomes a peer of the domain: it gets the greeting, then every join and
departure. The protocol is one-way, so anything from the peer (data, EOF, an error) means it
is gone, as in QEMU's server. What QEMU's server does not survive, this one does, dropping
only the peer concerned:

* a failing send (the peer died, reset the connection): its departure is announced;
* a peer that stops reading: each send may block at most ``send_timeout`` seconds, and at
  most ``max_backlog`` messages may wait for it; past either it is dropped;
* SIGPIPE: every send passes MSG_NOSIGNAL.

Fds: the domain owns the region and the eventfds; each connection owns its socket. A message's
fd is duplicated for the one send that carries it, so a departure while that send is blocked
cannot change which file the number names.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from msixhub.devices.ivshmem.domain import Announcement, DomainConfigError, IvshmemDomain
from msixhub.devices.ivshmem.qemu_protocol import MESSAGE_SIZE, PeerOutbox, ServerMessage, greeting
from msixhub.protocol.errors import MsixhubError

DEFAULT_SEND_TIMEOUT = 5.0
DEFAULT_MAX_BACKLOG = 4096
LISTEN_BACKLOG = 10
_FD_LIMIT_RETRY = 0.05
"""ETOOMANYREFS: our user has too many fds in flight (queued at peers that do not read). They
are freed when those peers are dropped, so the send retries until its own timeout."""

log = logging.getLogger("msixhub.ivshmem.qemu")


def bind_unix_listener(path: str | os.PathLike[str]) -> socket.socket:
    """A listening unix socket at ``path`` (a plain socket: it can be made before trio runs,
    or before the process daemonizes, so that errors reach the terminal)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(path))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_qemu_protocol(
    listener: str | os.PathLike[str] | socket.socket,
    domain: IvshmemDomain,
    *,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_backlog: int = DEFAULT_MAX_BACKLOG,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept QEMU-protocol peers on ``listener`` (a path, or a listening unix socket whose
    ownership passes here) until cancelled. ``task_status.started`` gets the socket path; on
    exit the socket file is removed, as QEMU's server does. The domain stays the caller's."""
    sock = listener if isinstance(listener, socket.socket) else bind_unix_listener(listener)
    try:
        path = sock.getsockname()
        identity = os.stat(path).st_ino
    except BaseException:
        sock.close()
        raise
    trio_sock = trio.socket.from_stdlib_socket(sock)
    handler = partial(
        _serve_peer, domain=domain, send_timeout=send_timeout, max_backlog=max_backlog
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(trio_sock)])
            log.info("listening on %s for ivshmem %r", path, domain.name)
            task_status.started(path)
    finally:
        trio_sock.close()
        _unlink_if_ours(path, identity)


def _unlink_if_ours(path: str, inode: int) -> None:
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


class _Connection:
    """One peer's socket: a reader that waits for it to go, a writer that drains its outbox."""

    def __init__(self, stream: trio.SocketStream, send_timeout: float, max_backlog: int) -> None:
        self.socket = stream.socket
        self.outbox = PeerOutbox(max_backlog)
        self._send_timeout = send_timeout
        self._wake = trio.Event()
        self._scope = trio.CancelScope()

    def announce(self, event: Announcement) -> None:
        """``PeerSink``: queue for the writer, never block, never raise. A backlog over the
        bound ends the connection at once, even if the writer is blocked in a send."""
        self.outbox.announce(event)
        if self.outbox.failure is not None:
            self._scope.cancel()
        self._wake.set()

    async def run(self) -> str:
        """Serve until the peer goes or must be dropped; return why."""
        reason = "server shutting down"

        async def until_done(part: Callable[[], Awaitable[str]]) -> None:
            nonlocal reason
            reason = await part()
            self._scope.cancel()

        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_done, self._read)
                nursery.start_soon(until_done, self._write)
        return self.outbox.failure or reason

    async def _read(self) -> str:
        try:
            data = await self.socket.recv(MESSAGE_SIZE)
        except OSError as exc:
            return f"receive failed: {exc}"
        return "sent data (the protocol is one-way)" if data else "hung up"

    async def _write(self) -> str:
        while True:
            message = self.outbox.next_message()
            if self.outbox.failure is not None:
                return self.outbox.failure
            if message is None:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            try:
                with trio.fail_after(self._send_timeout):
                    await self._send(message)
            except trio.TooSlowError:
                return f"send blocked over {self._send_timeout}s (peer stopped reading)"
            except OSError as exc:
                return f"send failed: {exc}"

    async def _send(self, message: ServerMessage) -> None:
        if message.fd is None:
            await self._sendmsg(message.payload, [])
            return
        with message.fd.dup() as fd:
            fds = array.array("i", [fd.fileno()])
            await self._sendmsg(message.payload, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])

    async def _sendmsg(
        self, payload: bytes, ancdata: list[tuple[int, int, array.array[int]]]
    ) -> None:
        while True:
            try:
                sent = await self.socket.sendmsg([payload], ancdata, socket.MSG_NOSIGNAL)
            except OSError as exc:
                if exc.errno != errno.ETOOMANYREFS:
                    raise
                await trio.sleep(_FD_LIMIT_RETRY)
                continue
            if sent != len(payload):
                raise OSError(errno.EIO, f"short send: {sent} of {len(payload)} bytes")
            return


async def _serve_peer(
    stream: trio.SocketStream, *, domain: IvshmemDomain, send_timeout: float, max_backlog: int
) -> None:
    connection = _Connection(stream, send_timeout, max_backlog)
    try:
        join = domain.join(connection)
    except (MsixhubError, DomainConfigError, OSError) as exc:
        connection.socket.close()
        log.warning("refused a peer of ivshmem %r: %s", domain.name, exc)
        return
    try:
        connection.outbox.greet(greeting(join, domain.shm))
        domain.dispatch(join.notices)
        log.info("peer %d joined ivshmem %r", join.peer_id, domain.name)
        reason = await connection.run()
    finally:
        # The socket first: once others hear of the departure, nothing of the peer is open.
        connection.socket.close()
        domain.dispatch(domain.leave(join.peer_id))
    log.info("peer %d left ivshmem %r: %s", join.peer_id, domain.name, reason)
