"""Shared by the ivshmem hub tests: a hub serving QEMU's ivshmem protocol too, this process
as one peer's VMM, and a QEMU-protocol peer written from the spec alone."""

from __future__ import annotations

import array
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from msixhub.client.vmm import Interrupt, PeerEvent, VmmClient, connect
from msixhub.testing.ivshmem import IvshmemGuest
from msixhub.testing.processes import HubProcess, hub_process
from msixhub.testing.system import EVENT_TIMEOUT

NAME = "shm"
SIZE = 1 << 20
VECTORS = 2


def daemon_args(name: str = NAME, size: str = "1M", vectors: int = VECTORS) -> tuple[str, ...]:
    return ("--name", name, "--size", size, "--vectors", str(vectors))


@asynccontextmanager
async def ivshmem_hub(
    directory: Path, *, policy: str = "static", budget: int = 4096
) -> AsyncIterator[HubProcess]:
    """A hub that also serves QEMU's ivshmem protocol for the domain NAME at ``qemu.sock``."""
    extra = (
        *("--ivshmem-socket", str(directory / "qemu.sock"), "--ivshmem-name", NAME),
        *("--ivshmem-size", "1M", "--ivshmem-vectors", str(VECTORS)),
    )
    async with hub_process(directory, route_policy=policy, route_budget=budget, extra=extra) as hub:
        yield hub


@dataclass(eq=False)
class Local:
    """This process as one peer's VMM."""

    vm: VmmClient
    guest: IvshmemGuest
    peer_id: int

    async def next_event(self) -> object:
        with trio.fail_after(EVENT_TIMEOUT):
            return await self.vm.next_event()

    async def next_irq(self) -> Interrupt:
        event = await self.next_event()
        assert isinstance(event, Interrupt), event
        return event

    async def wait_for_peer(self, peer_id: int, joined: bool) -> None:
        while await self.next_event() != PeerEvent(self.guest.device.id, peer_id, joined):
            pass


@asynccontextmanager
async def local_peer(
    hub: HubProcess, device_id: str, *, setup: bool = True
) -> AsyncIterator[Local]:
    async with connect(hub.socket, name=f"vm-{device_id}") as vm:
        guest = IvshmemGuest(await vm.attach(device_id))
        if setup:
            await guest.setup()
        yield Local(vm, guest, await guest.position())


class SpecPeerState:
    """What an ivshmem client knows, from QEMU's docs/specs/ivshmem-spec.rst alone, fed the
    server's messages in order: 8-byte little-endian signed integers, each with at most one fd
    (SCM_RIGHTS): version 0, our id, -1 with the region, each peer's id once per vector with
    an eventfd, our own id once per vector with ours; later an id with an fd is a join,
    without one a departure. No I/O here: the peers below read their socket each their way."""

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.version: int | None = None
        self.id = -1
        self.shm = -1
        self.own: list[int] = []  # our eventfds (non-blocking), by vector
        self.peers: dict[int, list[int]] = {}
        self.gone: list[int] = []

    @property
    def greeted(self) -> bool:
        return len(self.own) == self.vectors

    def handle(self, value: int, fd: int | None) -> None:
        if self.version is None:
            assert (value, fd) == (0, None), f"protocol version first, got {value}, fd {fd}"
            self.version = value
        elif self.id < 0:
            assert fd is None and 0 <= value <= 0xFFFF, f"our id next, got {value}, fd {fd}"
            self.id = value
        elif self.shm < 0:
            assert value == -1 and fd is not None, f"the region next, got {value}, fd {fd}"
            self.shm = fd
        elif fd is None:
            for vector_fd in self.peers.pop(value):
                os.close(vector_fd)
            self.gone.append(value)
        elif value == self.id:
            os.set_blocking(fd, False)
            self.own.append(fd)
        else:
            self.peers.setdefault(value, []).append(fd)

    def ring(self, peer_id: int, vector: int) -> None:
        os.write(self.peers[peer_id][vector], (1).to_bytes(8, sys.byteorder))  # an eventfd

    def close_fds(self) -> None:
        for fd in [*self.own, *(f for fds in self.peers.values() for f in fds), self.shm]:
            if fd >= 0:
                os.close(fd)
        self.own.clear()
        self.peers.clear()
        self.shm = -1


def receive_part(sock: socket.socket, missing: int, fds: list[int]) -> bytes:
    """One ``recvmsg`` of at most the ``missing`` bytes of a message; the fds that came with
    it are added to ``fds``."""
    chunk, ancdata, _flags, _addr = sock.recvmsg(missing, socket.CMSG_SPACE(4))
    if not chunk:
        raise EOFError("the server closed the connection")
    for level, kind, payload in ancdata:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.extend(array.array("i", payload[: len(payload) // 4 * 4]))
    return chunk


def decode_message(data: bytes, fds: list[int]) -> tuple[int, int | None]:
    assert len(data) == 8 and len(fds) <= 1, (data, fds)
    return int.from_bytes(data, "little", signed=True), fds[0] if fds else None


class SpecPeer(SpecPeerState):
    """A spec peer on a non-blocking socket, waiting in trio."""

    def __init__(self, sock: socket.socket, vectors: int) -> None:
        super().__init__(vectors)
        self.sock = sock

    @classmethod
    async def connect(cls, path: Path, vectors: int) -> SpecPeer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        peer = cls(sock, vectors)
        try:
            sock.connect(str(path))
            while not peer.greeted:
                peer.handle(*await peer.receive())
        except BaseException:
            peer.close()
            raise
        return peer

    async def receive(self) -> tuple[int, int | None]:
        data = b""
        fds: list[int] = []
        with trio.fail_after(EVENT_TIMEOUT):
            while len(data) < 8:
                await trio.lowlevel.wait_readable(self.sock)
                data += receive_part(self.sock, 8 - len(data), fds)
        return decode_message(data, fds)

    async def wait_for_join(self, peer_id: int, vectors: int) -> None:
        while len(self.peers.get(peer_id, ())) < vectors:
            self.handle(*await self.receive())

    async def wait_for_departure(self, peer_id: int) -> None:
        while peer_id not in self.gone:
            self.handle(*await self.receive())

    async def wait_rung(self, vector: int) -> int:
        fd = self.own[vector]
        with trio.fail_after(EVENT_TIMEOUT):
            await trio.lowlevel.wait_readable(fd)
        return int.from_bytes(os.read(fd, 8), sys.byteorder)

    def close(self) -> None:
        self.sock.close()
        self.close_fds()
