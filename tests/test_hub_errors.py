"""Bad input from a VMM or a device: a clear error (``RemoteError`` with the right code), and
nothing changed: the same routes, the same owner, the same fds, interrupts still flowing.
And a VMM killed for real while its vectors are unmasked: the hub survives, function-masks
the device, collects pending bits, and hands them to the next VMM once it unmasks.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from msixhub.client.msix_guest import MSIX_ENABLE, pba_pending, set_vector_mask
from msixhub.client.vmm import connect
from msixhub.devices.daemon import NoVectorError, open_device
from msixhub.devices.testdev import TestDevice
from msixhub.protocol.connection import Request
from msixhub.protocol.errors import ConnectionClosed, ErrorCode, RemoteError
from msixhub.protocol.fds import OwnedFd, close_all, eventfd_write, memfd
from msixhub.protocol.messages import (
    Attach,
    Detach,
    MmioRead,
    MmioWrite,
    Region,
    RegisterDevice,
    SetMemTable,
)
from msixhub.protocol.peer import Peer, connect_unix, open_peer
from msixhub.protocol.schema import Message
from msixhub.server.hub import TELL_TIMEOUT
from msixhub.testing.processes import ManagedProcess, device_process, open_fds
from msixhub.testing.system import (
    Testdev,
    TestdevSystem,
    next_interrupt,
    running_system,
)

STALL_LIMIT = TELL_TIMEOUT + 3.0  # one timeout, and time to spare; not one per fd (4 here)
UNHINDERED = 0.5  # well inside TELL_TIMEOUT: what a hung peer must not hold up
Handler = Callable[[Peer, Request], Awaitable[Message]]


async def expect_interrupts_still_flow(
    system: TestdevSystem, vector: int = 0, testdev: Testdev | None = None
) -> None:
    await (testdev or system.testdev).notify(vector)
    interrupt = await next_interrupt(system.vm)
    assert (interrupt.vector, interrupt.count) == (vector, 1)


async def test_unknown_device(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        before = await system.status.report()
        with pytest.raises(RemoteError) as error:
            await system.vm.attach("no-such-device")
        assert error.value.code == ErrorCode.NOT_FOUND
        assert "no-such-device" not in system.vm.devices
        assert await system.status.report() == before


async def test_vector_past_the_table(tmp_path: Path) -> None:
    async with running_system(tmp_path, vectors=8) as system:
        assert not await system.testdev.use(5000)  # testdev's RESULT register says: refused
        assert not await system.testdev.use(8)
        assert (await system.status.routes())["in_use"] == 0

        # The codes, as a device sees them: past the table is not a shortage of routes.
        probe = TestDevice("probe", 8, 1)
        async with open_device(system.hub.socket, probe) as (link, _):
            for vector in (8, 2047, 5000):
                with pytest.raises(NoVectorError) as error:
                    await link.use(vector)
                assert error.value.code == ErrorCode.BAD_RANGE
        assert (await system.status.routes())["in_use"] == 0


async def test_route_shortage_is_a_distinct_error(tmp_path: Path) -> None:
    async with running_system(tmp_path, budget=3, vectors=8) as system:
        probe = TestDevice("probe", 8, 1)
        async with open_device(system.hub.socket, probe) as (link, _):
            for vector in range(3):
                await link.use(vector)
            with pytest.raises(NoVectorError) as error:
                await link.use(3)
            assert error.value.code == ErrorCode.NO_ROUTE
            routes = await system.status.routes()
            assert (routes["in_use"], routes["alloc_failures"]) == (3, 1)
            assert not await system.testdev.use(0)  # dev0 shares the exhausted budget


@pytest.mark.parametrize(
    ("regions", "sizes", "why"),
    [
        ([Region(0, 8192, 0), Region(4096, 8192, 0)], [8192, 8192], "overlap"),
        ([Region(0, 8192, 0)], [4096], "past the fd"),
        ([Region(0, 4096, 4096)], [4096], "offset past the fd"),
        ([Region(0, 0, 0)], [4096], "empty"),
        ([Region((1 << 64) - 4096, 8192, 0)], [8192], "wraps"),
    ],
    ids=["overlap", "past-fd", "offset-past-fd", "empty", "wraps"],
)
async def test_bad_memory_table(
    tmp_path: Path, regions: list[Region], sizes: list[int], why: str
) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(1))
        assert system.daemon is not None
        hub_fds, daemon_fds = open_fds(system.hub.pid), open_fds(system.daemon.pid)
        fds: list[OwnedFd] = [memfd(size, why) for size in sizes]
        try:
            with pytest.raises(RemoteError) as error:
                await system.vm.peer.call(SetMemTable(regions), [fd.fileno() for fd in fds])
        finally:
            for fd in fds:
                fd.close()
        assert error.value.code == ErrorCode.BAD_RANGE
        # The hub closes a request's fds just after its reply: one more round trip, then count.
        await system.status.report()
        # Nothing kept, nothing replaced: the daemon still has the old table's one fd.
        assert (open_fds(system.hub.pid), open_fds(system.daemon.pid)) == (hub_fds, daemon_fds)
        await system.vm.add_memory(4096)  # a good table still goes through
        await expect_interrupts_still_flow(system)


async def test_second_vmm_cannot_take_an_attached_device(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(1))
        async with connect(system.hub.socket, name="vm1") as intruder:
            with pytest.raises(RemoteError) as error:
                await intruder.attach("dev0")
            assert error.value.code == ErrorCode.CONFLICT
            for request in (Detach("dev0"), MmioRead("dev0", 0, 0, 4)):
                with pytest.raises(RemoteError) as error:
                    await intruder.peer.call(request)
                assert error.value.code == ErrorCode.BAD_STATE
        with pytest.raises(RemoteError) as error:
            await system.vm.attach("dev0")  # attached already, to this very VMM
        assert error.value.code == ErrorCode.CONFLICT

        assert (await system.status.device("dev0"))["vmm"] == "vm0"
        await expect_interrupts_still_flow(system)


async def test_bad_msix_access_changes_nothing(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(2))
        layout = system.device.info.msix
        entry = await system.device.mmio_read(layout.bar, layout.table_offset, 8)
        for offset, size in ((2, 4), (0, 2), (4, 8)):  # misaligned, too narrow, misaligned
            with pytest.raises(RemoteError) as error:
                # Raw, as a buggy VMM would send it (the client mirrors only whole entries).
                write = MmioWrite("dev0", layout.bar, layout.table_offset + offset, size, 1)
                await system.vm.peer.call(write)
            assert error.value.code == ErrorCode.BAD_RANGE
        assert await system.device.mmio_read(layout.bar, layout.table_offset, 8) == entry
        await expect_interrupts_still_flow(system)


# A VMM in its own process: attach, program and unmask vectors 0 and 1, enable MSI-X, say so.
DOOMED_VMM = """
import sys, trio
from msixhub.client.vmm import connect
from msixhub.testing.system import Testdev

async def main(socket):
    async with connect(socket, name="doomed") as vm:
        await Testdev(await vm.attach("dev0")).setup(range(2))
        print("unmasked", file=sys.stderr, flush=True)
        await trio.sleep_forever()

trio.run(main, sys.argv[1])
"""


async def test_killed_vmm_leaves_pending_bits_for_the_next(tmp_path: Path) -> None:
    async with running_system(tmp_path, vectors=2, queues=2) as system:
        vm = system.vm
        kicks = [fd.dup() for fd in system.device.kicks]  # to make the device notify later
        try:
            await vm.detach("dev0")

            doomed = ManagedProcess("doomed", [sys.executable, "-c", DOOMED_VMM, system.hub.socket])
            async with trio.open_nursery() as nursery:
                await doomed.start(nursery)
                await doomed.wait_for_line("unmasked")
                assert (await system.status.device("dev0"))["vmm"] == "doomed"
                doomed.kill()
                assert await doomed.wait() == -signal.SIGKILL

            report = await system.status.wait_for(
                lambda r: r["vmms"] == ["vm0"] and r["devices"][0]["vmm"] is None
            )
            (device,) = report["devices"]
            assert device["up"]
            assert device["msix_control"] & 0xC000 == 0xC000  # enabled, function-masked

            for queue in (0, 1, 1):  # queue q echoes on vector q
                eventfd_write(kicks[queue].fileno())
            rows = await system.status.wait_for(
                lambda r: [v["pending"] for v in r["devices"][0]["vectors"]] == [True, True]
            )
            assert [v["delivered"] for v in rows["devices"][0]["vectors"]] == [0, 0]

            # The next VMM programs what it wants (the hub kept the old entries) and enables.
            device_again = await vm.attach("dev0")
            assert await pba_pending(device_again, 0) and await pba_pending(device_again, 1)
            await Testdev(device_again).setup(range(2), enable=False)
            assert len(vm.queue) == 0  # still function-masked
            await device_again.msix_control_write(MSIX_ENABLE)
            arrived = sorted(
                [(i.vector, i.count) for i in [await next_interrupt(vm) for _ in range(2)]]
            )
            assert arrived == [(0, 1), (1, 1)]
            assert not await pba_pending(device_again, 0)
        finally:
            close_all(kicks)
        await expect_interrupts_still_flow(system, 0, Testdev(device_again))
        await expect_interrupts_still_flow(system, 1, Testdev(device_again))


async def test_access_outside_the_bars(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        device = system.device
        bar0 = next(bar.size for bar in device.info.bars if bar.index == 0)
        for bar, offset, size in ((0, bar0, 4), (0, bar0 - 4, 8), (5, 0, 4)):
            with pytest.raises(RemoteError) as error:
                await device.mmio_read(bar, offset, size)
            assert error.value.code == ErrorCode.BAD_RANGE
            with pytest.raises(RemoteError) as error:
                await device.mmio_write(bar, offset, size, 0)
            assert error.value.code == ErrorCode.BAD_RANGE
        await system.testdev.setup(range(1))
        await expect_interrupts_still_flow(system)


def never_answer_until(asked: trio.Event) -> Handler:
    async def never_answer(peer: Peer, request: Request) -> Message:
        for fd in request.fds:
            fd.close()
        asked.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    return never_answer


async def expect_mask_round_trips_unhindered(system: TestdevSystem) -> None:
    """Another VMM's MSI-X writes on its own device, well inside the hub's TELL_TIMEOUT."""
    with trio.fail_after(UNHINDERED):
        await set_vector_mask(system.device, 0, True)
        await set_vector_mask(system.device, 0, False)
        await system.testdev.use(1)  # a device's control request: its own lock only


@pytest.mark.parametrize("role", ["vmm", "device"])
async def test_a_peer_that_never_answers_stalls_only_its_own_devices(
    tmp_path: Path, role: str
) -> None:
    """The hub hands fds to a peer while holding the lock of the device concerned; one that
    reads but never answers is disconnected after TELL_TIMEOUT, and meanwhile other devices
    and other VMMs go on (before, one hub-wide lock stalled every VMM's writes for 2 s)."""
    async with (
        running_system(tmp_path, vectors=4) as system,
        device_process(system.hub, "testdev", "dev1", "--vectors", "4"),
    ):
        await system.testdev.setup(range(1))
        other = await system.vm.attach("dev1")
        await Testdev(other).setup(range(4))  # four routed vectors: four fds for the next VMM
        await system.vm.detach("dev1")

        asked = trio.Event()
        handler = never_answer_until(asked)
        transport = await connect_unix(system.hub.socket)
        async with (
            open_peer(transport, role, name="mute", on_request=handler) as mute,  # type: ignore[arg-type]
            trio.open_nursery() as nursery,
        ):

            async def ask_and_be_hung_up_on() -> None:
                with pytest.raises(ConnectionClosed):
                    if role == "vmm":
                        await mute.request(Attach("dev1"))  # its SetIrqFd goes unanswered
                    else:  # its SetKickFd goes unanswered
                        await mute.request(RegisterDevice(TestDevice("mute0", 2, 1).info))

            nursery.start_soon(ask_and_be_hung_up_on)
            with trio.fail_after(STALL_LIMIT):
                await asked.wait()  # the hub waits for the mute peer, holding dev1's lock
            asked_at = trio.current_time()
            await expect_mask_round_trips_unhindered(system)
            with trio.fail_after(STALL_LIMIT):
                await mute.closed.wait()  # the hub hung up on it
            assert trio.current_time() - asked_at >= TELL_TIMEOUT - 0.1

        if role == "vmm":  # gone, and its device released (the release follows the departure)
            await system.status.wait_for(
                lambda r: (
                    r["vmms"] == ["vm0"]
                    and [d["vmm"] for d in r["devices"] if d["id"] == "dev1"] == [None]
                )
            )
        else:
            await system.status.wait_for(
                lambda r: [d["up"] for d in r["devices"] if d["id"] == "mute0"] == [False]
            )
        await system.vm.attach("dev1")  # released, as any departed VMM's devices are
        await expect_interrupts_still_flow(system)


async def test_a_vmm_cut_off_from_the_hub_lets_go_of_its_devices(tmp_path: Path) -> None:
    """Its process lives on, with duplicates of the eventfds: it must stop reading them, or
    it would steal the notifications of the hub (pending bits) and of the next VMM."""
    async with running_system(tmp_path, vectors=2) as system:
        await system.testdev.setup(range(2))
        orphan = system.vm
        orphan.peer.transport.socket.shutdown(socket.SHUT_RDWR)  # the hub sees it vanish
        with trio.fail_after(STALL_LIMIT):
            await orphan.peer.closed.wait()
        await system.status.wait_for(lambda r: r["vmms"] == [] and r["devices"][0]["vmm"] is None)
        assert system.device.irq_fds == {}

        async with connect(system.hub.socket, name="vm1") as vm:
            testdev = Testdev(await vm.attach("dev0"))
            await testdev.setup(range(2))
            for _ in range(3):
                await testdev.notify(1)
                interrupt = await next_interrupt(vm)
                assert (interrupt.vector, interrupt.count) == (1, 1)
        assert len(orphan.queue) == 0
