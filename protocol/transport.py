"""Bytes and fds over a socket under trio: ``sendmsg``/``recvmsg`` with SCM_RIGHTS on unix
sockets, plain ``send``/``recv`` on TCP (which cannot carry fds).

The socket is driven directly (non-blocking syscalls, ``trio.lowlevel.wait_*`` only when
the kernel says "would block") because the protocol's round trip is dominated by scheduler
passes: a send that fits in the socket buffer completes without yielding, and a receive in
a request/reply exchange waits for readability first instead of trying a ``recvmsg`` that
would fail.

OS errors become ``ConnectionClosed`` here, at the boundary; ``trio.Cancelled`` passes through.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Sequence

import trio
from msixhub.protocol.errors import ConnectionClosed, FdPassingUnsupported, ProtocolError
from msixhub.protocol.frame import MAX_FDS_LIMIT

RECEIVE_SIZE = 256 * 1024
_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_LIMIT * _FD_SIZE)
_CLOSED_ERRORS = (OSError, trio.ClosedResourceError)
# Plain ints: the flag enums cost a Python-level __and__ on every receive.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


class Transport:
    """One connected stream socket, owned: ``aclose()`` closes it exactly once.

    The Transport takes the socket over: the trio socket passed in is detached (its
    ``fileno()`` becomes -1) and ``transport.socket`` is the one to use from then on."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        family, kind, proto = sock.family, sock.type, sock.proto
        self._raw = socket.socket(family, kind, proto, fileno=sock.detach())
        self._sock = trio.socket.from_stdlib_socket(self._raw)  # sets it non-blocking
        self.fd_passing = family == socket.AF_UNIX
        self.closed = False
        self._buffer = bytearray(RECEIVE_SIZE)
        self._view = memoryview(self._buffer)
        self._last_was_full = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._sock

    def peer_credentials(self) -> tuple[int, int, int] | None:
        """(pid, uid, gid) of the process at the other end of a unix socket, else None."""
        if not self.fd_passing:
            return None
        raw = self._raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, gid = array.array("i", raw)
        return pid, uid, gid

    def send_nowait(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> int:
        """Send what the socket takes now, without blocking; the number of bytes sent.
        ``fds`` travel with the first byte, so they were sent iff the result is > 0."""
        if fds and not self.fd_passing:
            raise FdPassingUnsupported("this transport (TCP) cannot pass file descriptors")
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                return self._raw.sendmsg([data], ancillary, _MSG_NOSIGNAL)
            return self._raw.send(data, _MSG_NOSIGNAL)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise ConnectionClosed(f"send failed: {exc}") from None

    async def send(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> None:
        """Send all of ``data``; ``fds`` travel with its first byte. The fds stay the caller's.

        Cancelling this after part of ``data`` went out leaves a partial frame on the
        stream: callers that may be cancelled shield it (``Peer`` does)."""
        view = memoryview(data)
        while view:
            sent = self.send_nowait(view, fds)
            if sent:
                view = view[sent:]
                fds = ()
                continue
            if self.closed:
                raise ConnectionClosed("send failed: transport is closed")
            try:
                await trio.lowlevel.wait_writable(self._raw)
            except _CLOSED_ERRORS as exc:
                raise ConnectionClosed(f"send failed: {exc}") from None

    async def receive(self) -> tuple[bytes, list[int]]:
        """The next chunk of bytes and the fds that came with it; ``b""`` at end of stream."""
        # In a request/reply exchange the next chunk is rarely there before we look, so wait
        # first; after a full buffer (a peer streaming at us) read first, but stay fair.
        must_wait = not self._last_was_full
        if not must_wait:
            await trio.lowlevel.checkpoint()
        while True:
            if must_wait:
                if self.closed:
                    raise ConnectionClosed("receive failed: transport is closed")
                try:
                    await trio.lowlevel.wait_readable(self._raw)
                except _CLOSED_ERRORS as exc:
                    raise ConnectionClosed(f"receive failed: {exc}") from None
            try:
                if self.fd_passing:
                    size, ancillary, flags, _ = self._raw.recvmsg_into(
                        [self._buffer], _ANCILLARY_SIZE, _MSG_CMSG_CLOEXEC
                    )
                else:
                    size, ancillary, flags = self._raw.recv_into(self._buffer), [], 0
                break
            except BlockingIOError:
                must_wait = True
            except OSError as exc:
                raise ConnectionClosed(f"receive failed: {exc}") from None
        self._last_was_full = size == RECEIVE_SIZE
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(array.array("i", payload[:usable]))
        if flags & _MSG_CTRUNC:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise ProtocolError("file descriptors were truncated in transit")
        return bytes(self._view[:size]), fds

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()  # wakes any task waiting on it (notify_closing), then closes
        await trio.lowlevel.checkpoint()
