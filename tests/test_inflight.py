"""The device-state region: layout, and exactly-once completion after a kill at every line
of the ring and in-flight code, after a real SIGKILL, and through the transport."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import msixhub.devices.virtio.inflight as inflight_module
import msixhub.devices.virtio.ring as ring_module
import pytest
import trio
import trio.testing
from msixhub.client.virtio_driver import BlkDriver
from msixhub.client.virtqueue import DriverVirtqueue, GuestAllocator
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.blk import BlkDevice
from msixhub.devices.virtio.constants import Status
from msixhub.devices.virtio.inflight import (
    DeviceStateError,
    DeviceStateRegion,
    QueueRegisters,
    TransportState,
)
from msixhub.devices.virtio.pci import VirtioPciTransport
from msixhub.devices.virtio.ring import Chain, SplitVirtqueue
from msixhub.protocol.fds import OwnedFd, memfd
from virtio_harness import virtio_system

MEM = 1 << 20


def test_region_layout_and_shape_checks() -> None:
    assert DeviceStateRegion.size_for(1, 256) == 48 + 48 + 16 * 256
    buffer = bytearray(DeviceStateRegion.size_for(2, 64))
    region = DeviceStateRegion(buffer, 2, 64)
    assert buffer[:4] == b"MXDS"
    state = region.load()
    assert (state.status, state.config_msix_vector, len(state.queues)) == (0, 0xFFFF, 2)
    with pytest.raises(DeviceStateError, match="expected"):
        DeviceStateRegion(buffer, 3, 32)
    with pytest.raises(DeviceStateError, match="needs"):
        DeviceStateRegion(bytearray(100), 2, 64)
    with pytest.raises(DeviceStateError, match="bad shape"):
        DeviceStateRegion(buffer, 0, 64)
    saved = TransportState(
        driver_features=1 << 32 | 1 << 29,
        config_msix_vector=3,
        status=0x0F,
        config_generation=7,
        device_feature_select=1,
        driver_feature_select=1,
        queue_select=1,
        queues=[
            QueueRegisters(64, 1, True, False, 0x1000, 0x2000, 0x3000),
            QueueRegisters(32, 2, True, True, 1 << 40, 1 << 41, 1 << 42),
        ],
    )
    region.save(saved)
    assert DeviceStateRegion(buffer, 2, 64).load() == saved  # another incarnation reads it


# -- a kill at every line ---------------------------------------------------------------


class SimulatedKill(BaseException):
    """Stands for SIGKILL: nothing after it runs, memory stays as it was."""


def run_with_kill(work: Callable[[], None], kill_at: int | None) -> int:
    """Run ``work``, raising SimulatedKill before its ``kill_at``-th line in the ring or
    in-flight modules. Returns how many such lines ran."""
    targets = {ring_module.__file__, inflight_module.__file__}
    lines = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
            if lines == kill_at:
                raise SimulatedKill
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename in targets else None

    sys.settrace(calls)
    try:
        work()
    finally:
        sys.settrace(None)
    return lines


SIZE = 8
REQUESTS = 8


class Guest:
    """Guest memory with REQUESTS one-buffer requests on a ring, and a device-state region."""

    def __init__(self, fd: OwnedFd, region_buffer: bytearray) -> None:
        self.memory = GuestMemory.from_memfd(fd, MEM)
        allocator = GuestAllocator(0x1000, MEM - 0x1000)
        self.driver = DriverVirtqueue(self.memory, allocator, SIZE, event_idx=True, indirect=True)
        self.buffers = [allocator.alloc(8) for _ in range(REQUESTS)]
        for token, buffer in enumerate(self.buffers):
            self.driver.add([], [(buffer, 8)], token)
        self.region_buffer = region_buffer

    def harvest(self) -> Counter[object]:
        tokens: Counter[object] = Counter()
        while (used := self.driver.get_used()) is not None:
            assert used.length == 8
            tokens[used.token] += 1
        return tokens


def daemon(ring: SplitVirtqueue, executions: Counter[int], resubmit: list[Chain]) -> None:
    """Complete resubmitted chains, then pop everything, completing out of order in threes."""

    def complete(chain: Chain) -> None:
        executions[chain.head] += 1
        chain.writable[0][:8] = b"done%04d" % chain.head
        ring.push(chain.head, 8)
        chain.release()

    for chain in resubmit:
        complete(chain)
    batch: list[Chain] = []
    while (chain := ring.pop()) is not None:
        batch.append(chain)
        if len(batch) == 3:
            for index in (2, 0, 1):
                complete(batch[index])
            batch.clear()
    for chain in batch:
        complete(chain)


def start_ring(guest: Guest) -> tuple[SplitVirtqueue, list[Chain]]:
    """What the transport does: a fresh ring if the log is not valid yet, else recovery."""
    region = DeviceStateRegion(guest.region_buffer, 1, SIZE)
    layout = guest.driver.layout
    if not region.queue(0).valid:
        ring = SplitVirtqueue(
            guest.memory, layout, event_idx=True, indirect=True, inflight=region.queue(0)
        )
        region.queue(0).start(SIZE, used_idx=0)
        return ring, []
    return SplitVirtqueue.recover(
        guest.memory, layout, event_idx=True, indirect=True, inflight=region.queue(0)
    )


def incarnation(guest: Guest, executions: Counter[int]) -> None:
    ring, resubmit = start_ring(guest)
    daemon(ring, executions, resubmit)


@pytest.fixture
def guest_fd() -> Iterator[OwnedFd]:
    with memfd(MEM, "inflight-test") as fd:
        yield fd


def test_kill_at_every_line_completes_each_request_exactly_once() -> None:
    def fresh() -> Guest:
        with memfd(MEM, "inflight-test") as fd:  # the mapping keeps the memory
            return Guest(fd, bytearray(DeviceStateRegion.size_for(1, SIZE)))

    probe = fresh()
    total = run_with_kill(lambda: incarnation(probe, Counter()), None)
    assert probe.harvest() == Counter(range(REQUESTS))
    probe.memory.close()
    assert total > 100
    for kill_at in range(1, total + 1):
        guest = fresh()
        executions: Counter[int] = Counter()
        with pytest.raises(SimulatedKill):
            run_with_kill(lambda: incarnation(guest, executions), kill_at)  # noqa: B023
        ring_module._fence = threading.Lock()  # a new process starts with fresh locks
        incarnation(guest, executions)  # the restarted daemon
        assert guest.harvest() == Counter(range(REQUESTS)), f"kill at line {kill_at}"
        for token, buffer in enumerate(guest.buffers):
            assert guest.memory.read(buffer, 4) == b"done", (kill_at, token)
        guest.memory.close()


def test_a_kill_at_every_line_of_a_reset_save_restores_the_old_registers_or_a_reset() -> None:
    """A reset rewrites every register: a kill part way must not restore a mix (a queue
    still enabled at old addresses under status 0). Registers saved whole restore as they
    are, status 0 or not; a region with ``reset_pending`` restores as a reset device."""
    live = TransportState(
        driver_features=1 << 32,
        config_msix_vector=0,
        status=0x0F,
        config_generation=3,
        queue_select=1,
        queues=[
            QueueRegisters(64, 1, True, False, 0x1000, 0x2000, 0x3000),
            QueueRegisters(32, 2, True, False, 0x4000, 0x5000, 0x6000),
        ],
    )
    reset = TransportState(config_generation=3, queues=[QueueRegisters(size=64)] * 2)
    size = DeviceStateRegion.size_for(2, 64)

    def saved_live() -> bytearray:
        buffer = bytearray(size)
        DeviceStateRegion(buffer, 2, 64).save(live)
        return buffer

    probe = saved_live()
    total = run_with_kill(lambda: DeviceStateRegion(probe, 2, 64).save(reset, reset=True), None)
    assert DeviceStateRegion(probe, 2, 64).load() == reset
    restored_as = Counter[str]()
    for kill_at in range(1, total + 1):
        buffer = saved_live()
        with pytest.raises(SimulatedKill):
            run_with_kill(
                lambda: DeviceStateRegion(buffer, 2, 64).save(reset, reset=True),  # noqa: B023
                kill_at,
            )
        region = DeviceStateRegion(buffer, 2, 64)
        if region.reset_pending:
            assert region.load().config_generation == 3, kill_at
            restored_as["reset"] += 1
        else:
            assert region.load() == live, kill_at
            restored_as["live"] += 1
    assert restored_as["reset"] >= 3  # kills between the flag and each record


def test_a_blank_region_restores_as_a_reset_device() -> None:
    region = DeviceStateRegion(bytearray(DeviceStateRegion.size_for(1, 64)), 1, 64)
    assert region.reset_pending  # queue sizes there are 0, not the device's maximum
    region.save(TransportState(queues=[QueueRegisters(size=64)]))
    assert not region.reset_pending


def test_recovery_ignores_a_guest_that_rewrote_its_used_idx(guest_fd: OwnedFd) -> None:
    guest = Guest(guest_fd, bytearray(DeviceStateRegion.size_for(1, SIZE)))
    ring, _ = start_ring(guest)
    chains = [ring.pop() for _ in range(3)]
    ring.push(chains[0].head, 8)  # type: ignore[union-attr]
    guest.memory.write_u16(guest.driver.layout.used + 2, 40)  # the guest scribbles
    region = DeviceStateRegion(guest.region_buffer, 1, SIZE)
    recovered = region.queue(0).recover(40)
    assert (recovered.used_idx, recovered.guest_used_idx_ok) == (1, False)
    assert recovered.heads == [chains[1].head, chains[2].head]  # type: ignore[union-attr]


# -- a real process, really killed ---------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys
    from msixhub.devices.guestmem import GuestMemory
    from msixhub.devices.virtio.inflight import DeviceStateRegion
    from msixhub.devices.virtio.ring import RingLayout, SplitVirtqueue
    memory_fd, region_fd, ready, size, desc, avail, used, mem = map(int, sys.argv[1:])
    memory = GuestMemory.from_memfd(memory_fd, mem)
    region = DeviceStateRegion.from_fd(region_fd, 1, size)
    layout = RingLayout(size, desc, avail, used)
    if region.queue(0).valid:
        ring, resubmit = SplitVirtqueue.recover(memory, layout, event_idx=True, indirect=True,
                                                inflight=region.queue(0))
    else:
        ring = SplitVirtqueue(memory, layout, event_idx=True, indirect=True,
                              inflight=region.queue(0))
        region.queue(0).start(size, used_idx=0)
        resubmit = []
    os.write(ready, b"r")
    def complete(chain):
        chain.writable[0][:4] = b"done"
        ring.push(chain.head, 8)
    for chain in resubmit:
        complete(chain)
    batch = []
    while (chain := ring.pop()) is not None:
        batch.append(chain)
        if len(batch) == 3:
            for index in (1, 2, 0):
                complete(batch[index])
            batch.clear()
    for chain in batch:
        complete(chain)
    """
)


def run_child(
    memory_fd: OwnedFd, region_fd: OwnedFd, layout: Any, size: int, kill_after: float | None
) -> None:
    ready_read, ready_write = os.pipe()
    fds = (memory_fd.fileno(), region_fd.fileno(), ready_write)
    args = [*map(str, fds), *map(str, (size, layout.desc, layout.avail, layout.used, MEM))]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], pass_fds=fds)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b"r"
        if kill_after is not None:
            time.sleep(kill_after)  # a random kill point, not a synchronisation
            child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) in (0, -signal.SIGKILL)
    finally:
        os.close(ready_read)
        child.kill()
        child.wait()


@pytest.mark.slow
def test_sigkill_in_a_real_daemon_process() -> None:
    size, requests = 256, 256
    chooser = random.Random(5)
    for _ in range(10):  # a child takes 1-2 ms for the lot: about half the kills land mid-way
        with (
            memfd(MEM, "guest") as guest_fd,
            memfd(DeviceStateRegion.size_for(1, size), "state") as region_fd,
            GuestMemory.from_memfd(guest_fd, MEM) as memory,
        ):
            allocator = GuestAllocator(0x1000, MEM - 0x1000)
            driver = DriverVirtqueue(memory, allocator, size, event_idx=True, indirect=True)
            buffers = [allocator.alloc(8) for _ in range(requests)]
            for token, buffer in enumerate(buffers):
                driver.add([], [(buffer, 8)], token)
            run_child(guest_fd, region_fd, driver.layout, size, chooser.uniform(0, 0.0015))
            run_child(guest_fd, region_fd, driver.layout, size, None)  # the restart
            tokens: Counter[object] = Counter()
            while (used := driver.get_used()) is not None:
                tokens[used.token] += 1
            assert tokens == Counter(range(requests))
            assert all(memory.read(buffer, 4) == b"done" for buffer in buffers)


# -- through the transport: registers and in-flight requests survive a restart --------------


async def test_transport_restart_resubmits_in_flight_requests() -> None:
    with memfd(1 << 20) as image_fd:
        image = image_fd.fileno()
        region_buffer = bytearray(DeviceStateRegion.size_for(1, 256))
        region = DeviceStateRegion(region_buffer, 1, 256)
        async with virtio_system(lambda: BlkDevice(image), state=region) as system:
            blk = BlkDriver(system.driver)
            with trio.fail_after(10):
                await blk.start()
                await blk.write(0, b"0" * 512)
                system.runner.held = []  # the daemon takes requests and then hangs
                done: Counter[int] = Counter()

                async def write(sector: int) -> None:
                    await blk.write(sector, bytes([sector]) * 512)
                    done[sector] += 1

                async with trio.open_nursery() as nursery:
                    for sector in (1, 2, 3):
                        nursery.start_soon(write, sector)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(system.runner.held) == 3
                    # SIGKILL: the old transport and its held requests are gone
                    for request in system.runner.held:
                        request.chain.release()
                    system.runner.held = None
                    restarted = VirtioPciTransport(
                        BlkDevice(image),
                        system.transport.memory,
                        vectors=system.vectors,
                        interrupts=system.sink,
                        runner=system.runner,
                        state=DeviceStateRegion(region_buffer, 1, 256),
                    )
                    assert restarted.status & Status.DRIVER_OK
                    assert restarted.vector_uses() == system.vectors.uses == {0: 1, 1: 1}
                    system.runner.transport = system.access.transport = restarted
                    restarted.set_msix_enabled(True)
                    restarted.resume()
                assert done == {1: 1, 2: 1, 3: 1}
                expected = b"0" * 512 + b"".join(bytes([s]) * 512 for s in (1, 2, 3))
                assert await blk.read(0, 4 * 512) == expected
                assert system.vectors.uses == {0: 1, 1: 1}
