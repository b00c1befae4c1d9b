"""The trio QEMU-protocol server, in process, with trio peers (``QemuPeer``) as clients."""

from __future__ import annotations

import mmap
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from msixhub.devices.ivshmem.domain import EventfdHooks, IvshmemDomain
from msixhub.devices.ivshmem.qemu_client import QemuPeer
from msixhub.devices.ivshmem.qemu_protocol import PeerGone, ServerClosed
from msixhub.devices.ivshmem.qemu_server import (
    DEFAULT_MAX_BACKLOG,
    DEFAULT_SEND_TIMEOUT,
    serve_qemu_protocol,
)
from msixhub.protocol.errors import ConnectionClosed
from msixhub.protocol.fds import OwnedFd, memfd

VECTORS = 2
SIZE = 1 << 20


@dataclass
class Server:
    path: str
    domain: IvshmemDomain
    cancel_scope: trio.CancelScope


async def start_server(
    nursery: trio.Nursery,
    tmp_path: Path,
    domain: IvshmemDomain,
    *,
    max_backlog: int = DEFAULT_MAX_BACKLOG,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
) -> Server:
    scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[str]) -> None:
        with scope:
            await serve_qemu_protocol(
                tmp_path / "ivshmem.sock",
                domain,
                max_backlog=max_backlog,
                send_timeout=send_timeout,
                task_status=task_status,
            )

    path = await nursery.start(serve)
    return Server(path, domain, scope)


@pytest.fixture
async def domain() -> AsyncIterator[IvshmemDomain]:
    d = IvshmemDomain("inproc", memfd(SIZE), VECTORS)
    yield d
    d.close()


@pytest.fixture
async def server(
    nursery: trio.Nursery, tmp_path: Path, domain: IvshmemDomain
) -> AsyncIterator[Server]:
    server = await start_server(nursery, tmp_path, domain)
    yield server
    server.cancel_scope.cancel()


async def test_greeting_gives_id_region_and_vectors(server: Server) -> None:
    with trio.fail_after(10):
        async with await QemuPeer.connect(server.path, VECTORS) as peer:
            assert peer.peer_id == 0
            assert peer.shm is not None and os.fstat(peer.shm.fileno()).st_size == SIZE
            assert len(peer.own_vectors) == VECTORS and peer.peers == {}


async def test_three_peers_ring_each_other_on_every_vector(server: Server) -> None:
    with trio.fail_after(10):
        peers = [await QemuPeer.connect(server.path, VECTORS) for _ in range(3)]
        try:
            ids = [p.peer_id for p in peers]
            assert ids == [0, 1, 2]
            for peer in peers:
                for other in ids:
                    if other != peer.peer_id:
                        await peer.wait_for_peer(other, VECTORS)
            for sender in peers:
                for receiver in peers:
                    if receiver is sender:
                        continue
                    for vector in range(VECTORS):
                        sender.ring(receiver.peer_id, vector)
                        assert await receiver.wait_rung(vector) == 1
            # the region is the same memory for all
            assert peers[0].shm is not None and peers[2].shm is not None
            with (
                mmap.mmap(peers[0].shm.fileno(), SIZE) as first,
                mmap.mmap(peers[2].shm.fileno(), SIZE) as third,
            ):
                first[100:105] = b"hello"
                assert third[100:105] == b"hello"
        finally:
            for peer in peers:
                peer.close()


async def test_departure_is_announced_and_fds_are_released(server: Server) -> None:
    with trio.fail_after(10):
        async with await QemuPeer.connect(server.path, VECTORS) as watcher:
            leaver = await QemuPeer.connect(server.path, VECTORS)
            await watcher.wait_for_peer(leaver.peer_id, VECTORS)
            leaver_vectors = [server.domain.vector_fd(leaver.peer_id, v) for v in range(VECTORS)]
            leaver.close()
            await watcher.wait_for_departure(leaver.peer_id)
            assert leaver.peer_id not in watcher.peers
            assert all(fd is not None and fd.closed for fd in leaver_vectors)
            assert list(server.domain.peer_ids()) == [watcher.peer_id]


async def test_a_peer_that_sends_data_is_dropped(server: Server) -> None:
    """The protocol is one-way; like QEMU's server, anything from a peer ends it."""
    with trio.fail_after(10):
        async with (
            await QemuPeer.connect(server.path, VECTORS) as watcher,
            await QemuPeer.connect(server.path, VECTORS) as talker,
        ):
            await watcher.wait_for_peer(talker.peer_id, VECTORS)
            await talker._sock.send(b"hello")
            await watcher.wait_for_departure(talker.peer_id)
            while not isinstance(await talker.next_event(), ServerClosed):
                pass


async def churn_until_gone(server: Server, watcher: QemuPeer, victim: int) -> None:
    """Join and leave peers until ``watcher`` hears that ``victim`` was dropped."""
    async with trio.open_nursery() as nursery:

        async def churn() -> None:
            while True:
                transient = await QemuPeer.connect(server.path, VECTORS)
                transient.close()

        nursery.start_soon(churn)
        while True:
            event = await watcher.next_event()
            if isinstance(event, PeerGone) and event.peer_id == victim:
                nursery.cancel_scope.cancel()
                return


@pytest.mark.parametrize(
    ("max_backlog", "send_timeout"),
    [pytest.param(8, 60.0, id="backlog"), pytest.param(1_000_000, 0.5, id="send-timeout")],
)
async def test_a_peer_that_stops_reading_is_dropped_alone(
    nursery: trio.Nursery,
    tmp_path: Path,
    domain: IvshmemDomain,
    max_backlog: int,
    send_timeout: float,
) -> None:
    server = await start_server(
        nursery, tmp_path, domain, max_backlog=max_backlog, send_timeout=send_timeout
    )
    with trio.fail_after(60):
        async with await QemuPeer.connect(server.path, VECTORS) as watcher:
            stuck = await QemuPeer.connect(server.path, VECTORS)  # and never reads again
            await watcher.wait_for_peer(stuck.peer_id, VECTORS)
            await churn_until_gone(server, watcher, stuck.peer_id)
            assert stuck.peer_id not in server.domain
            # the others are unaffected: a new peer and the watcher still ring each other
            async with await QemuPeer.connect(server.path, VECTORS) as late:
                await watcher.wait_for_peer(late.peer_id, VECTORS)
                watcher.ring(late.peer_id, 1)
                assert await late.wait_rung(1) == 1
            # the stuck peer finds the connection closed once it reads what was queued
            with pytest.raises(ConnectionClosed):
                await stuck.wait_for_departure(-1)
            stuck.close()
    server.cancel_scope.cancel()


async def test_refused_join_closes_the_connection(nursery: trio.Nursery, tmp_path: Path) -> None:
    class Refusing(EventfdHooks):
        def vector_fds(self, domain: IvshmemDomain, peer_id: int) -> list[OwnedFd]:
            raise OSError(24, "Too many open files")

    domain = IvshmemDomain("refusing", memfd(SIZE), 1, hooks=Refusing())
    server = await start_server(nursery, tmp_path, domain)
    try:
        with trio.fail_after(10), pytest.raises(ConnectionClosed):
            await QemuPeer.connect(server.path, 1)
        assert len(domain) == 0
    finally:
        server.cancel_scope.cancel()
        domain.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_shutdown_closes_everything_and_removes_the_socket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    before = open_fds()
    domain = IvshmemDomain("shutdown", memfd(SIZE), VECTORS)
    server = await start_server(nursery, tmp_path, domain)
    with trio.fail_after(10):
        peers = [await QemuPeer.connect(server.path, VECTORS) for _ in range(3)]
        await peers[0].wait_for_peer(peers[2].peer_id, VECTORS)
        server.cancel_scope.cancel()
        for peer in peers:
            with pytest.raises(ConnectionClosed):
                await peer.wait_for_departure(-1)
            peer.close()
    await trio.testing.wait_all_tasks_blocked()
    assert not Path(server.path).exists()
    assert len(domain) == 0
    domain.close()
    assert open_fds() <= before
