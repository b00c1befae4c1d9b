"""A virtio daemon stopped with requests in its queue workers: whatever was popped and not
completed is let go of (no view of guest memory stays pinned) and stays logged as taken in
the state region, so the next daemon over that region runs it, and every request is
completed exactly once.

The daemon runs in this process (``VirtioDaemon`` with a stand-in for the hub link), so
the stop can land at exact points of the worker: between popping requests and handing
them to threads, and after the worker is gone.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import trio
import trio.testing
from msixhub.client.virtio_driver import RING_FEATURES, VirtioPciDriver
from msixhub.client.virtqueue import GuestAllocator
from msixhub.devices.daemon import HubLink
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.daemon import VirtioDaemon
from msixhub.devices.virtio.inflight import DeviceStateRegion
from msixhub.devices.virtio.ring import Chain
from msixhub.devices.virtio.rng import RngDevice
from msixhub.protocol.fds import OwnedFd, memfd
from msixhub.protocol.messages import Region

MEMORY_SIZE = 1 << 20
RAM_BASE = 0x10000
QUEUE_SIZE = 64
REQUESTS = 8
TIMEOUT = 10.0


class ThreadedRequest:
    """A request that always goes to a worker thread (as an uncached disk read)."""

    blocking = True

    def __init__(self, chain: Chain) -> None:
        self.chain = chain

    def execute(self) -> int:
        return 0

    def execute_nowait(self) -> None:
        return None


class ThreadedDevice(RngDevice):
    """An entropy-shaped device whose requests all need a thread; ``on_parse(n)`` runs as
    the n-th request (from 1) is popped, so a test can stop the daemon right there."""

    def __init__(self, on_parse: Callable[[int], None] = lambda n: None) -> None:
        super().__init__(queue_size=QUEUE_SIZE)
        self.on_parse = on_parse
        self.chains: list[Chain] = []

    def parse(self, queue: int, chain: Chain) -> ThreadedRequest:  # type: ignore[override]
        self.chains.append(chain)
        self.on_parse(len(self.chains))
        return ThreadedRequest(chain)


class HubStandIn:
    """What the daemon uses of its hub link: a nursery, vectors and the INTx line."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.msix_enabled = False
        self.on_msix_enabled: Callable[[bool], None] | None = None
        self.driver: VirtioPciDriver | None = None

    async def use(self, vector: int) -> None:
        raise AssertionError("the driver runs over INTx here")

    async def unuse(self, vector: int) -> None:
        raise AssertionError("the driver runs over INTx here")

    def notify_soon(self, vector: int) -> None:
        raise AssertionError("the driver runs over INTx here")

    def set_intx_soon(self, level: bool) -> None:
        if self.driver is not None:
            self.driver.set_intx(level)


class Registers:
    """The driver's BAR accesses, straight into the daemon (as the hub forwards them)."""

    def __init__(self, daemon: VirtioDaemon) -> None:
        self.daemon = daemon

    async def read(self, bar: int, offset: int, size: int) -> int:
        return await self.daemon.bar_read(bar, offset, size)

    async def write(self, bar: int, offset: int, size: int, value: int) -> None:
        await self.daemon.bar_write(bar, offset, size, value)

    async def set_msix_enabled(self, enabled: bool) -> None:
        assert not enabled


@contextmanager
def shared_fds() -> Iterator[tuple[OwnedFd, OwnedFd]]:
    """Guest memory and the device-state region, as the hub keeps them across daemons."""
    state_size = DeviceStateRegion.size_for(1, QUEUE_SIZE)
    with memfd(MEMORY_SIZE, "guest") as ram, memfd(state_size, "state") as state:
        yield ram, state


def start_daemon(
    device: ThreadedDevice, hub: HubStandIn, ram: OwnedFd, state: OwnedFd
) -> VirtioDaemon:
    """Register a daemon as ``open_device`` does: memory table, then the state region."""
    daemon = VirtioDaemon("rng0", "virtio-rng", device)
    daemon.attach_hub(cast(HubLink, hub))
    daemon.set_memory([Region(0, MEMORY_SIZE, 0)], [OwnedFd(os.dup(ram.fileno()), "ram")])
    daemon.set_inflight(OwnedFd(os.dup(state.fileno()), "state"), restarted=False)
    return daemon


def stop_daemon(daemon: VirtioDaemon) -> None:
    """Close it, checking that nothing it held still pins guest memory."""
    assert daemon.transport is not None
    daemon.transport.close()
    assert daemon.memory.close(), "a view of guest memory outlived the daemon"
    daemon.close()


def logged_as_taken(state: OwnedFd) -> list[int]:
    region = DeviceStateRegion.from_fd(state, 1, QUEUE_SIZE)
    try:
        return region.queue(0).in_flight()
    finally:
        region.close()


def released(chain: Chain) -> bool:
    views = chain.readable + chain.writable
    try:
        for view in views:
            view.nbytes  # noqa: B018 (raises once released)
    except ValueError:
        return True
    return False


class Completions:
    """One token per request, each a callable the driver's interrupt handler calls once
    the request came back; ``order`` lists them as they came back (across daemons)."""

    def __init__(self, count: int) -> None:
        self.tokens = [functools.partial(self._came_back, n) for n in range(count)]
        self.order: list[int] = []
        self.all_back = trio.Event()

    def _came_back(self, n: int, length: int) -> None:
        self.order.append(n)
        if len(self.order) == len(self.tokens):
            self.all_back.set()

    def harvest(self, driver: VirtioPciDriver) -> None:
        driver.queues[0].harvest(lambda token, length: cast(Callable[[int], None], token)(length))


def add_requests(driver: VirtioPciDriver, buffer: int, completions: Completions) -> None:
    for token in completions.tokens:
        driver.add(0, [], [(buffer, 16)], token)
    driver.queues[0].kick_prepare()


async def finish_in_a_new_daemon(
    ram: OwnedFd, state: OwnedFd, driver: VirtioPciDriver, completions: Completions
) -> None:
    """Run a second daemon over the same region until every request came back."""
    completions.harvest(driver)  # what the first daemon completed
    taken = logged_as_taken(state)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            hub = HubStandIn(nursery)
            hub.driver = driver  # resuming raises INTx at once
            daemon = start_daemon(ThreadedDevice(), hub, ram, state)
            driver.access = Registers(daemon)
            assert daemon.transport is not None
            assert daemon.transport.requeued(0) == len(taken)
            await nursery.start(driver.serve_intx)
            await completions.all_back.wait()
            nursery.cancel_scope.cancel()
        stop_daemon(daemon)
    assert sorted(completions.order) == list(range(len(completions.tokens)))  # each once
    assert logged_as_taken(state) == []


async def bring_up(daemon: VirtioDaemon, memory: GuestMemory) -> VirtioPciDriver:
    assert daemon.transport is not None
    driver = VirtioPciDriver(
        Registers(daemon),
        memory,
        GuestAllocator(RAM_BASE, MEMORY_SIZE - RAM_BASE),
        layout=daemon.transport.layout,
        msix_vectors=0,
    )
    await driver.initialize(RING_FEATURES)
    return driver


async def test_requests_in_the_worker_at_a_stop_are_released_and_run_by_the_next_daemon() -> None:
    """The stop lands as the 5th request is popped: the first ones are in threads, or
    started but not yet running, the 5th waits for a thread slot, the rest are in the ring."""
    completions = Completions(REQUESTS)
    with shared_fds() as (ram, state), GuestMemory.from_memfd(ram, MEMORY_SIZE) as memory:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:

                def stop_at_the_fifth(n: int) -> None:
                    if n == 5:
                        nursery.cancel_scope.cancel()

                device = ThreadedDevice(stop_at_the_fifth)
                daemon = start_daemon(device, HubStandIn(nursery), ram, state)
                driver = await bring_up(daemon, memory)
                add_requests(driver, driver.allocator.alloc(16), completions)
                await trio.testing.wait_all_tasks_blocked()  # the queue worker is idle:
                await daemon.kicked(0)  # the kick is served inline, then handed to it
                await trio.sleep_forever()  # until the 5th request stops everything
        stop_daemon(daemon)

        assert len(device.chains) == 5
        assert all(released(chain) for chain in device.chains)
        taken = logged_as_taken(state)
        parsed_heads = [chain.head for chain in device.chains]
        assert taken == [head for head in parsed_heads if head in taken]  # in pop order
        assert parsed_heads[-1] in taken  # the one waiting for a slot, at least

        await finish_in_a_new_daemon(ram, state, driver, completions)
        driver.close()


async def test_a_kick_after_the_worker_stopped_pops_nothing() -> None:
    """The hub's kick reader can run once more after the queue worker was cancelled: the
    kick must leave the ring alone, not pop a request that no task will ever run."""
    completions = Completions(2)
    with shared_fds() as (ram, state), GuestMemory.from_memfd(ram, MEMORY_SIZE) as memory:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                device = ThreadedDevice()
                daemon = start_daemon(device, HubStandIn(nursery), ram, state)
                driver = await bring_up(daemon, memory)
                nursery.cancel_scope.cancel()
            add_requests(driver, driver.allocator.alloc(16), completions)
            await daemon.kicked(0)
        stop_daemon(daemon)

        assert device.chains == []
        assert logged_as_taken(state) == []
        await finish_in_a_new_daemon(ram, state, driver, completions)
        driver.close()
