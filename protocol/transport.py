"""Bytes and fds over a trio socket: ``sendmsg``/``recvmsg`` with SCM_RIGHTS on unix sockets,
plain ``send``/``recv`` on TCP (which cannot carry fds).

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


class Transport:
    """One connected stream socket, owned: ``aclose()`` closes it exactly once."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self.fd_passing = sock.family == socket.AF_UNIX
        self.closed = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._sock

    def peer_credentials(self) -> tuple[int, int, int] | None:
        """(pid, uid, gid) of the process at the other end of a unix socket, else None."""
        if not self.fd_passing:
            return None
        raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, gid = array.array("i", raw)
        return pid, uid, gid

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send all of ``data``; ``fds`` travel with its first byte. The fds stay the caller's."""
        if fds and not self.fd_passing:
            raise FdPassingUnsupported("this transport (TCP) cannot pass file descriptors")
        view = memoryview(data)
        try:
            if fds:
                ancillary = [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
                ]
                sent = await self._sock.sendmsg([view], ancillary, socket.MSG_NOSIGNAL)
                view = view[sent:]
            while view:
                sent = await self._sock.send(view, socket.MSG_NOSIGNAL)
                view = view[sent:]
        except (OSError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"send failed: {exc}") from None

    async def receive(self) -> tuple[bytes, list[int]]:
        """The next chunk of bytes and the fds that came with it; ``b""`` at end of stream."""
        try:
            if not self.fd_passing:
                return await self._sock.recv(RECEIVE_SIZE), []
            data, ancillary, flags, _ = await self._sock.recvmsg(
                RECEIVE_SIZE, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (OSError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"receive failed: {exc}") from None
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(array.array("i", payload[:usable]))
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise ProtocolError("file descriptors were truncated in transit")
        return data, fds

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
        await trio.lowlevel.checkpoint()
