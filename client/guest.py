"""A pretend guest: RAM in a memfd and guest drivers for attached devices, their interrupts
handled where the VMM reads them, so the whole system can be driven without a real guest
(demo, tests, benches).

    async with connect(hub) as vm, Guest.open(vm, ram=64 << 20) as guest:
        blk = await guest.blk("blk0")
        await blk.write(0, b"x" * 512)

MSI-X is programmed the way an OS does it: each entry gets an x86 message (address
0xFEE00000, data = 0x30 + vector), is unmasked, then MSI-X is enabled with the function unmasked.
A write to the virtio notify area is a kick (the VMM's ioeventfd), never a hub round trip.

While it is open the guest takes every event of the VMM's queue that is its own: its drivers'
interrupts and INTx, and every device up/down (the hub sends one of each per daemon restart).
Those are recorded (:attr:`Guest.daemon_up`, :attr:`Guest.comebacks`) and wake
:meth:`Guest.wait_daemon_up`, never queued: in a long run nobody reads the queue, and a full
queue stops the VMM's interrupt readers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from msixhub.client.virtio_driver import BlkDriver, RngDriver, VirtioPciDriver
from msixhub.client.virtqueue import DeviceMisbehaved, GuestAllocator
from msixhub.client.vmm import (
    MSIX_ENABLE,
    AttachedDevice,
    DeviceEvent,
    Event,
    Interrupt,
    IntxEvent,
    VmmClient,
)
from msixhub.devices import guestmem
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.pci import BarLayout

MSI_ADDRESS = 0xFEE0_0000
ENTRY_SIZE = 16


def msi_message(vector: int) -> tuple[int, int]:
    """The (address, data) an x86 guest would program for ``vector``."""
    return MSI_ADDRESS, 0x30 + vector


async def program_msix(device: AttachedDevice, vectors: range | None = None) -> None:
    """Program and unmask every table entry as a guest OS would (MSI-X itself stays off)."""
    layout = device.info.msix
    for vector in vectors if vectors is not None else range(device.info.num_vectors):
        address, data = msi_message(vector)
        base = layout.table_offset + vector * ENTRY_SIZE
        await device.mmio_write(layout.bar, base, 8, address)
        await device.mmio_write(layout.bar, base + 8, 4, data)
        await device.mmio_write(layout.bar, base + 12, 4, 0)


class VmmRegisterAccess:
    """The driver's register access over the VMM client: BAR accesses go to the hub, notify
    writes become kicks, the MSI-X enable bit is Message Control."""

    def __init__(self, device: AttachedDevice, layout: BarLayout) -> None:
        self.device = device
        self.layout = layout

    async def read(self, bar: int, offset: int, size: int) -> int:
        return await self.device.mmio_read(bar, offset, size)

    async def write(self, bar: int, offset: int, size: int, value: int) -> None:
        notify = self.layout.notify
        if bar == self.layout.bar and notify <= offset < notify + self.layout.window:
            self.device.kick(value)
            return
        await self.device.mmio_write(bar, offset, size, value)

    async def set_msix_enabled(self, enabled: bool) -> None:
        await self.device.msix_control_write(MSIX_ENABLE if enabled else 0)


class Guest:
    def __init__(self, vm: VmmClient, memory: GuestMemory, allocator: GuestAllocator) -> None:
        self.vm = vm
        self.memory = memory
        self.allocator = allocator
        self.drivers: dict[str, VirtioPciDriver] = {}
        self._nursery: trio.Nursery | None = None
        # a device that broke the ring contract (duplicate used id...)
        self.misbehaviour: list[str] = []
        self.daemon_up: dict[str, bool] = {}  # the hub's last word on each device's daemon
        self.comebacks: Counter[str] = Counter()  # "up" events: a daemon (re)registered
        self._daemons_changed = trio.Event()

    @classmethod
    @asynccontextmanager
    async def open(cls, vm: VmmClient, *, ram: int = 64 << 20) -> AsyncIterator[Guest]:
        region, fd = await vm.add_memory(ram)
        memory = GuestMemory.map([guestmem.Region(region.gpa, region.size, region.offset)], [fd])
        guest = cls(vm, memory, GuestAllocator(region.gpa + 4096, region.size - 4096))
        try:
            async with trio.open_nursery() as nursery:
                guest._nursery = nursery
                vm.handler = guest._handle
                try:
                    yield guest
                finally:
                    vm.handler = None
                    nursery.cancel_scope.cancel()
        finally:
            for driver in guest.drivers.values():
                driver.close()
            memory.close()

    async def virtio(self, device_id: str, *, msix: bool = True) -> VirtioPciDriver:
        """Attach ``device_id`` and return its driver (not yet initialized)."""
        device = await self.vm.attach(device_id)
        layout = BarLayout()
        vectors = device.info.num_vectors if msix else 0
        if vectors:
            await program_msix(device)
        driver = VirtioPciDriver(
            VmmRegisterAccess(device, layout),
            self.memory,
            self.allocator,
            layout=layout,
            msix_vectors=vectors,
        )
        self.drivers[device_id] = driver
        assert self._nursery is not None
        self._nursery.start_soon(driver.serve_intx)  # idle unless the driver falls back to INTx
        return driver

    async def blk(self, device_id: str, *, msix: bool = True) -> BlkDriver:
        blk = BlkDriver(await self.virtio(device_id, msix=msix))
        await blk.start()
        return blk

    async def rng(self, device_id: str, *, msix: bool = True) -> RngDriver:
        rng = RngDriver(await self.virtio(device_id, msix=msix))
        await rng.start()
        return rng

    async def wait_daemon_up(self, device_id: str, *, comebacks: int = 0) -> None:
        """Return once ``device_id``'s daemon is up and came back at least ``comebacks``
        times while this guest was open (``comebacks[id] + 1``, taken before a kill, waits
        for that restart). The caller bounds the wait."""
        while not self.daemon_up.get(device_id, True) or self.comebacks[device_id] < comebacks:
            await self._daemons_changed.wait()

    def _handle(self, event: Event) -> bool:
        """Interrupts for our drivers are handled at once, in the reader that took them;
        device up/down events are recorded, whatever the device."""
        if isinstance(event, DeviceEvent):
            up = self.daemon_up[event.device] = event.state == "up"
            if up:
                self.comebacks[event.device] += 1
            self._daemons_changed.set()
            self._daemons_changed = trio.Event()
            return True
        driver = self.drivers.get(event.device)
        if driver is None:
            return False
        try:
            if isinstance(event, Interrupt):
                driver.interrupt(event.vector)
            elif isinstance(event, IntxEvent):
                driver.set_intx(event.level)
            else:
                return False
        except DeviceMisbehaved as exc:
            self.misbehaviour.append(f"{event.device}: {exc}")
        return True
