"""Shared by the ivshmem hub tests: a hub serving QEMU's ivshmem protocol too, this process
as one peer's VMM, and a QEMU-protocol peer written from the spec alone."""

from __future__ import annotations

import array
import os
import socket
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


class SpecPeer:
    """An ivshmem client written from QEMU's docs/specs/ivshmem-spec.rst alone: a plain unix
    socket and ``recvmsg``; 8-byte little-endian signed integers, fds by SCM_RIGHTS (version
    0, our id, -1 with the region, each peer's id once per vector with an eventfd, our own id
    once per vector with ours; later an id with an fd is a join, without one a departure)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.id = -1
        self.shm = -1
        self.own: list[int] = []
        self.peers: dict[int, list[int]] = {}
        self.gone: list[int] = []

    @classmethod
    async def connect(cls, path: Path, vectors: int) -> SpecPeer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        peer = cls(sock)
        try:
            sock.connect(str(path))
            assert await peer.receive() == (0, None)  # protocol version
            peer.id, fd = await peer.receive()
            assert fd is None
            minus_one, shm = await peer.receive()
            assert minus_one == -1 and shm is not None
            peer.shm = shm
            while len(peer.own) < vectors:
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
                chunk, ancdata, _, _ = self.sock.recvmsg(8 - len(data), socket.CMSG_SPACE(4))
                if not chunk:
                    raise EOFError("the server closed the connection")
                data += chunk
                for level, kind, payload in ancdata:
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                        fds.extend(array.array("i", payload[: len(payload) // 4 * 4]))
        assert len(fds) <= 1
        return int.from_bytes(data, "little", signed=True), fds[0] if fds else None

    def handle(self, value: int, fd: int | None) -> None:
        if fd is None:
            for vector_fd in self.peers.pop(value):
                os.close(vector_fd)
            self.gone.append(value)
        elif value == self.id:
            os.set_blocking(fd, False)
            self.own.append(fd)
        else:
            self.peers.setdefault(value, []).append(fd)

    async def wait_for_join(self, peer_id: int, vectors: int) -> None:
        while len(self.peers.get(peer_id, ())) < vectors:
            self.handle(*await self.receive())

    async def wait_for_departure(self, peer_id: int) -> None:
        while peer_id not in self.gone:
            self.handle(*await self.receive())

    def ring(self, peer_id: int, vector: int) -> None:
        os.write(self.peers[peer_id][vector], (1).to_bytes(8, "little"))

    async def wait_rung(self, vector: int) -> int:
        fd = self.own[vector]
        with trio.fail_after(EVENT_TIMEOUT):
            await trio.lowlevel.wait_readable(fd)
        return int.from_bytes(os.read(fd, 8), "little")

    def close(self) -> None:
        self.sock.close()
        for fd in [*self.own, *(f for fds in self.peers.values() for f in fds), self.shm]:
            if fd >= 0:
                os.close(fd)
        self.own.clear()
        self.peers.clear()
        self.shm = -1
