"""The guest-driver toolkit wired straight to the virtio-pci model, in one process.

Stands in for the hub and the daemon shell: a vector book with a route budget (the hub's
use/unuse), an interrupt sink that calls the driver's handlers, and a queue runner that
pops requests on kicks and executes blocking ones in worker threads, like the daemon will.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from msixhub.client.virtio_driver import VirtioPciDriver
from msixhub.client.virtqueue import GuestAllocator
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.device import VirtioDevice
from msixhub.devices.virtio.inflight import DeviceStateRegion
from msixhub.devices.virtio.pci import Request, VectorRefused, VirtioPciTransport
from msixhub.protocol.fds import OwnedFd, memfd

MEMORY_SIZE = 4 << 20
RAM_BASE = 0x10000


class VectorBook:
    """The hub's per-vector resources: refcounts, a table size and a route budget."""

    def __init__(self, table_size: int = 8, budget: int = 8) -> None:
        self.table_size = table_size
        self.budget = budget
        self.uses: Counter[int] = Counter()
        self.calls: list[tuple[str, int]] = []

    async def use(self, vector: int) -> None:
        self.calls.append(("use", vector))
        if vector >= self.table_size:
            raise VectorRefused(f"vector {vector} past the table")
        if vector not in self.uses and len(self.uses) >= self.budget:
            raise VectorRefused("route budget exhausted")
        self.uses[vector] += 1

    async def unuse(self, vector: int) -> None:
        self.calls.append(("unuse", vector))
        assert self.uses[vector] > 0, f"unuse of unused vector {vector}"
        self.uses[vector] -= 1
        if not self.uses[vector]:
            del self.uses[vector]


class Sink:
    """The interrupt path: records every notification and hands it to the driver."""

    def __init__(self) -> None:
        self.driver: VirtioPciDriver | None = None
        self.notified: list[int] = []
        self.intx = False
        self.intx_edges = 0

    def notify(self, vector: int) -> None:
        self.notified.append(vector)
        if self.driver is not None:
            self.driver.interrupt(vector)

    def set_intx(self, asserted: bool) -> None:
        self.intx = asserted
        self.intx_edges += asserted
        if self.driver is not None:
            self.driver.set_intx(asserted)


class Runner:
    """What the daemon shell does with kicks: pop until empty, execute, complete."""

    def __init__(self) -> None:
        self.transport: VirtioPciTransport | None = None
        self.kicks: Counter[int] = Counter()
        self.executed: list[Request] = []
        self.held: list[Request] | None = None  # a list: pop but never execute (a "hung" daemon)
        self._send, self._receive = trio.open_memory_channel[int](math.inf)
        self._executing = 0
        self._idle = trio.Event()
        self._idle.set()

    def kick(self, queue: int) -> None:
        self.kicks[queue] += 1
        self._send.send_nowait(queue)

    async def quiesce(self) -> None:
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for queue in self._receive:
                assert self.transport is not None
                while (request := self.transport.pop(queue)) is not None:
                    if self.held is not None:
                        self.held.append(request)
                        continue
                    self._executing += 1
                    self._idle = trio.Event()
                    nursery.start_soon(self._execute, request)

    async def _execute(self, request: Request) -> None:
        assert self.transport is not None
        if request.blocking:
            written = await trio.to_thread.run_sync(request.execute)
        else:
            written = request.execute()
        self.executed.append(request)
        self.transport.complete(request, written)
        self._executing -= 1
        if not self._executing:
            self._idle.set()


class Access:
    """The driver's register path, straight into the transport, one access at a time
    (the lock the daemon holds around register accesses)."""

    def __init__(self, transport: VirtioPciTransport) -> None:
        self.transport = transport
        self.msix_enabled: list[bool] = []
        self._lock = trio.Lock()

    async def read(self, bar: int, offset: int, size: int) -> int:
        assert bar == self.transport.layout.bar
        async with self._lock:
            return self.transport.read(offset, size)

    async def write(self, bar: int, offset: int, size: int, value: int) -> None:
        assert bar == self.transport.layout.bar
        async with self._lock:
            await self.transport.write(offset, size, value)

    async def set_msix_enabled(self, enabled: bool) -> None:
        self.msix_enabled.append(enabled)
        self.transport.set_msix_enabled(enabled)


@dataclass
class System:
    fd: OwnedFd
    memory: GuestMemory
    device: VirtioDevice
    transport: VirtioPciTransport
    driver: VirtioPciDriver
    vectors: VectorBook
    sink: Sink
    runner: Runner
    access: Access


@asynccontextmanager
async def virtio_system(
    make_device: Callable[[], VirtioDevice],
    *,
    msix_vectors: int = 8,
    budget: int = 8,
    state: DeviceStateRegion | None = None,
) -> AsyncIterator[System]:
    fd = memfd(MEMORY_SIZE, "virtio-test")
    memory = GuestMemory.from_memfd(fd, MEMORY_SIZE)  # the VMM's mapping
    device_memory = GuestMemory.from_memfd(fd, MEMORY_SIZE)  # the daemon's
    device = make_device()
    vectors, sink, runner = VectorBook(msix_vectors, budget), Sink(), Runner()
    transport = VirtioPciTransport(
        device, device_memory, vectors=vectors, interrupts=sink, runner=runner, state=state
    )
    runner.transport = transport
    access = Access(transport)
    driver = VirtioPciDriver(
        access,
        memory,
        GuestAllocator(RAM_BASE, MEMORY_SIZE - RAM_BASE),
        layout=transport.layout,
        msix_vectors=msix_vectors,
    )
    sink.driver = driver
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            await nursery.start(driver.serve_intx)
            yield System(fd, memory, device, transport, driver, vectors, sink, runner, access)
            nursery.cancel_scope.cancel()
    finally:
        transport.memory.close()
        memory.close()
        fd.close()
