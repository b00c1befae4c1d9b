"""A trio peer that joins an ivshmem server through QEMU's protocol (the shell around
``ClientDecoder``): what an msixhub peer, a test, or a debugging tool uses to attach to
QEMU's contrib server, to ``msixhub ivshmem-server``, or to the hub's ivshmem socket.

It keeps what the server said: the region, its own vectors (read to be rung), and each
peer's vectors (written to ring it). It owns every fd it received and closes them on
departure notices and on ``aclose``.
"""

from __future__ import annotations

import array
import os
import socket
from types import TracebackType

import trio
from msixhub.devices.ivshmem.qemu_protocol import (
    NEED_DATA,
    ClientDecoder,
    ClientEvent,
    OwnVector,
    PeerGone,
    PeerVector,
    ServerClosed,
    SharedMemory,
    Welcome,
)
from msixhub.protocol.errors import ConnectionClosed, ProtocolError
from msixhub.protocol.fds import OwnedFd, close_all, eventfd_read_nowait, eventfd_write

_RECV_BYTES = 4096
_MAX_FDS_PER_RECV = 64


class QemuPeer:
    """One connection to an ivshmem server. Use ``await QemuPeer.connect(path)``, which
    returns once the region and our own ``vectors`` eventfds have arrived."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._decoder = ClientDecoder()
        self.peer_id = -1
        self.shm: OwnedFd | None = None
        self.own_vectors: list[OwnedFd] = []
        self.peers: dict[int, list[OwnedFd]] = {}

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], vectors: int) -> QemuPeer:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer = cls(sock)
        try:
            await sock.connect(os.fspath(path))
            while len(peer.own_vectors) < vectors:
                if isinstance(await peer.next_event(), ServerClosed):
                    raise ConnectionClosed("the ivshmem server closed the connection")
        except BaseException:
            peer.close()
            raise
        return peer

    async def next_event(self) -> ClientEvent:
        """The next event from the server, with our bookkeeping already applied (the fds it
        names are this peer's, closed by it)."""
        while (event := self._decoder.next_event()) is NEED_DATA:
            await self._receive()
        self._apply(event)
        return event

    async def wait_for_peer(self, peer_id: int, vectors: int) -> None:
        """Read events until ``peer_id`` has ``vectors`` vectors."""
        while len(self.peers.get(peer_id, ())) < vectors:
            await self._next_or_closed()

    async def wait_for_departure(self, peer_id: int) -> None:
        while True:
            event = await self._next_or_closed()
            if isinstance(event, PeerGone) and event.peer_id == peer_id:
                return

    def ring(self, peer_id: int, vector: int) -> None:
        """Ring ``vector`` of ``peer_id`` (KeyError/IndexError if we do not know it)."""
        eventfd_write(self.peers[peer_id][vector].fileno())

    async def wait_rung(self, vector: int) -> int:
        """Wait until our ``vector`` is rung; return the count read (rings coalesce)."""
        fd = self.own_vectors[vector].fileno()
        while True:  # read once readable, never blocking: the other peers share the file
            await trio.lowlevel.wait_readable(fd)
            if count := eventfd_read_nowait(fd):
                return count

    def close(self) -> None:
        self._sock.close()
        self._decoder.close()
        fds = [*self.own_vectors, *(fd for fds in self.peers.values() for fd in fds)]
        if self.shm is not None:
            fds.append(self.shm)
        self.own_vectors.clear()
        self.peers.clear()
        close_all(fds)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> QemuPeer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _next_or_closed(self) -> ClientEvent:
        event = await self.next_event()
        if isinstance(event, ServerClosed):
            raise ConnectionClosed("the ivshmem server closed the connection")
        return event

    async def _receive(self) -> None:
        data, ancdata, flags, _addr = await self._sock.recvmsg(
            _RECV_BYTES, socket.CMSG_SPACE(_MAX_FDS_PER_RECV * 4)
        )
        fds: list[OwnedFd] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                numbers = array.array("i")
                numbers.frombytes(payload[: len(payload) - len(payload) % numbers.itemsize])
                fds.extend(OwnedFd(n, "ivshmem-received") for n in numbers)
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise ProtocolError("fds lost: control data truncated")
        self._decoder.receive_data(data, fds)

    def _apply(self, event: ClientEvent) -> None:
        if isinstance(event, Welcome):
            self.peer_id = event.peer_id
        elif isinstance(event, SharedMemory):
            self.shm = event.fd
        elif isinstance(event, OwnVector):
            os.set_blocking(event.fd.fileno(), False)  # only we read it: wait_rung polls
            self.own_vectors.append(event.fd)
        elif isinstance(event, PeerVector):
            self.peers.setdefault(event.peer_id, []).append(event.fd)
        elif isinstance(event, PeerGone):
            close_all(self.peers.pop(event.peer_id, []))
