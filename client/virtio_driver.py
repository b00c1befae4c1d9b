"""A guest driver for virtio-pci devices, for driving the system without a real guest.

It programs the device the way Linux does (``virtio_pci_modern``): reset and wait for
status 0, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK and its read-back, queue
setup (size, then the three ring addresses as 32-bit halves), vectors, queue_enable,
DRIVER_OK. Vectors follow ``vp_find_vqs``: one per queue plus one for config; else one
shared by the queues plus config; else INTx. A vector register that reads back
``VIRTIO_MSI_NO_VECTOR`` makes that attempt fail, which releases what it took.

Registers are reached through :class:`RegisterAccess` (async: in the VMM client it is a
hub/device round trip). Interrupts come in through :meth:`VirtioPciDriver.interrupt`
(an MSI-X vector) and :meth:`VirtioPciDriver.set_intx` (the INTx level); both are plain
calls that harvest the used rings at once, as an interrupt handler does. With INTx the
level only falls when ISR is read, so a task must run :meth:`VirtioPciDriver.serve_intx`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio
from msixhub.client.virtqueue import Buffer, DriverVirtqueue, GuestAllocator
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.blk import (
    REQUEST_HEADER,
    SECTOR,
    SEGMENT,
    BlkConfig,
    BlkFeature,
    BlkStatus,
    BlkType,
)
from msixhub.devices.virtio.constants import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    ISR_CONFIG,
    VIRTIO_MSI_NO_VECTOR,
    Status,
    bit,
)
from msixhub.devices.virtio.pci import BarLayout, CommonCfg
from msixhub.protocol.errors import MsixhubError

RING_FEATURES = bit(F_VERSION_1) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX)


class RegisterAccess(Protocol):
    """How the driver reaches the device: BAR accesses and the MSI-X enable bit."""

    async def read(self, bar: int, offset: int, size: int) -> int: ...

    async def write(self, bar: int, offset: int, size: int, value: int) -> None: ...

    async def set_msix_enabled(self, enabled: bool) -> None: ...


class DriverSetupError(MsixhubError):
    """The device would not come up (features refused, no queue, reset never finished)."""


@dataclass(frozen=True, slots=True)
class VectorPlan:
    """The vectors in use: config's and each queue's (NO_VECTOR everywhere under INTx)."""

    msix: bool
    config: int
    queues: tuple[int, ...]


class _Pending:
    """What :meth:`VirtioPciDriver.submit` waits on; called with the used length."""

    __slots__ = ("done", "length")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.length = 0

    def __call__(self, length: int) -> None:
        self.length = length
        self.done.set()


def _deliver(token: object, length: int) -> None:
    token(length)  # type: ignore[operator]  # every token this driver adds is a callback


class VirtioPciDriver:
    """One virtio-pci function as a guest driver sees it.

    ``msix_vectors`` is how many MSI-X table entries the VMM side has programmed for the
    device (0: the driver goes straight to INTx).
    """

    def __init__(
        self,
        access: RegisterAccess,
        memory: GuestMemory,
        allocator: GuestAllocator,
        *,
        layout: BarLayout,
        msix_vectors: int,
    ) -> None:
        self.access = access
        self.memory = memory
        self.allocator = allocator
        self.layout = layout
        self.msix_vectors = msix_vectors
        self.features = 0
        self.queues: list[DriverVirtqueue] = []
        self._queues_of: dict[int, list[int]] = {}
        self.plan = VectorPlan(False, VIRTIO_MSI_NO_VECTOR, ())
        self.config_changes = 0
        self._notify_offsets: list[int] = []
        self._intx = False
        self._intx_raised = trio.Event()
        self._config_changed = trio.Event()

    @property
    def plan(self) -> VectorPlan:
        """The vectors in use; setting it also sets which queues each vector harvests."""
        return self._plan

    @plan.setter
    def plan(self, plan: VectorPlan) -> None:
        self._plan = plan
        self._queues_of = {}
        for queue, vector in enumerate(plan.queues):
            self._queues_of.setdefault(vector, []).append(queue)

    # -- registers ----------------------------------------------------------------------

    async def _read(self, offset: int, size: int) -> int:
        return await self.access.read(self.layout.bar, self.layout.common + offset, size)

    async def _write(self, offset: int, size: int, value: int) -> None:
        await self.access.write(self.layout.bar, self.layout.common + offset, size, value)

    async def status(self) -> int:
        return await self._read(CommonCfg.DEVICE_STATUS, 1)

    async def _add_status(self, flag: int) -> None:
        await self._write(CommonCfg.DEVICE_STATUS, 1, await self.status() | flag)

    async def reset(self) -> None:
        """Write 0 and wait until the device reads back 0, as Linux ``vp_reset``."""
        await self._write(CommonCfg.DEVICE_STATUS, 1, 0)
        for _ in range(1000):
            if await self.status() == 0:
                return
            await trio.sleep(0.001)
        raise DriverSetupError("device status never read back 0 after reset")

    async def read_config(self, offset: int, size: int) -> int:
        """A device-config field; a 64-bit one is read as two halves under one generation."""
        base = self.layout.device + offset
        if size != 8:
            return await self.access.read(self.layout.bar, base, size)
        while True:
            generation = await self._read(CommonCfg.CONFIG_GENERATION, 1)
            low = await self.access.read(self.layout.bar, base, 4)
            high = await self.access.read(self.layout.bar, base + 4, 4)
            if await self._read(CommonCfg.CONFIG_GENERATION, 1) == generation:
                return low | high << 32

    # -- bring-up -----------------------------------------------------------------------

    async def initialize(self, wanted: int, queue_sizes: Sequence[int | None] = (None,)) -> int:
        """Bring the device to DRIVER_OK with one queue per entry of ``queue_sizes``
        (None: the device's maximum). Returns the negotiated features."""
        await self.reset()
        self.close()  # a reset device forgot its queues; their memory is not reused
        self._notify_offsets.clear()
        await self._add_status(Status.ACKNOWLEDGE)
        await self._add_status(Status.DRIVER)
        offered = 0
        for select in (0, 1):
            await self._write(CommonCfg.DEVICE_FEATURE_SELECT, 4, select)
            offered |= await self._read(CommonCfg.DEVICE_FEATURE, 4) << (32 * select)
        self.features = offered & wanted
        for select in (0, 1):
            await self._write(CommonCfg.DRIVER_FEATURE_SELECT, 4, select)
            await self._write(
                CommonCfg.DRIVER_FEATURE, 4, (self.features >> (32 * select)) & 0xFFFFFFFF
            )
        await self._add_status(Status.FEATURES_OK)
        if not await self.status() & Status.FEATURES_OK:
            await self._add_status(Status.FAILED)
            raise DriverSetupError(f"device refused features {self.features:#x}")
        available = await self._read(CommonCfg.NUM_QUEUES, 2)
        if len(queue_sizes) > available:
            raise DriverSetupError(f"{len(queue_sizes)} queues wanted, device has {available}")
        for index, wanted_size in enumerate(queue_sizes):
            await self._setup_queue(index, wanted_size)
        self.plan = await self._assign_vectors()
        for index in range(len(self.queues)):
            await self._write(CommonCfg.QUEUE_SELECT, 2, index)
            await self._write(CommonCfg.QUEUE_ENABLE, 2, 1)
        await self._add_status(Status.DRIVER_OK)
        return self.features

    async def _setup_queue(self, index: int, wanted_size: int | None) -> None:
        await self._write(CommonCfg.QUEUE_SELECT, 2, index)
        maximum = await self._read(CommonCfg.QUEUE_SIZE, 2)
        if maximum == 0:
            raise DriverSetupError(f"queue {index} is not available")
        size = maximum if wanted_size is None else min(wanted_size, maximum)
        if size != maximum:
            await self._write(CommonCfg.QUEUE_SIZE, 2, size)
        queue = DriverVirtqueue(
            self.memory,
            self.allocator,
            size,
            event_idx=bool(self.features & bit(F_EVENT_IDX)),
            indirect=bool(self.features & bit(F_INDIRECT_DESC)),
        )
        for register, address in (
            (CommonCfg.QUEUE_DESC, queue.layout.desc),
            (CommonCfg.QUEUE_DRIVER, queue.layout.avail),
            (CommonCfg.QUEUE_DEVICE, queue.layout.used),
        ):
            await self._write(register, 4, address & 0xFFFFFFFF)
            await self._write(register + 4, 4, address >> 32)
        self._notify_offsets.append(await self._read(CommonCfg.QUEUE_NOTIFY_OFF, 2))
        self.queues.append(queue)

    async def _assign_vectors(self) -> VectorPlan:
        count = len(self.queues)
        plans = []
        if self.msix_vectors >= count + 1:
            plans.append(VectorPlan(True, 0, tuple(range(1, count + 1))))
        if self.msix_vectors >= 2:
            plans.append(VectorPlan(True, 0, (1,) * count))
        for plan in plans:
            await self.access.set_msix_enabled(True)
            if await self._try_vectors(plan):
                return plan
            await self._try_vectors(
                VectorPlan(True, VIRTIO_MSI_NO_VECTOR, (VIRTIO_MSI_NO_VECTOR,) * count)
            )
        await self.access.set_msix_enabled(False)
        return VectorPlan(False, VIRTIO_MSI_NO_VECTOR, (VIRTIO_MSI_NO_VECTOR,) * count)

    async def _try_vectors(self, plan: VectorPlan) -> bool:
        """Write every vector register of ``plan``; False at the first that reads back
        NO_VECTOR (the hub refused it)."""
        await self._write(CommonCfg.CONFIG_MSIX_VECTOR, 2, plan.config)
        if await self._read(CommonCfg.CONFIG_MSIX_VECTOR, 2) != plan.config:
            return False
        for index, vector in enumerate(plan.queues):
            await self._write(CommonCfg.QUEUE_SELECT, 2, index)
            await self._write(CommonCfg.QUEUE_MSIX_VECTOR, 2, vector)
            if await self._read(CommonCfg.QUEUE_MSIX_VECTOR, 2) != vector:
                return False
        return True

    # -- requests and interrupts ----------------------------------------------------------

    async def submit(self, queue: int, out: Sequence[Buffer], in_: Sequence[Buffer]) -> int:
        """Add a chain, kick if the device wants it, wait for completion; the used length."""
        pending = _Pending()
        self.add(queue, out, in_, pending)
        await self.kick(queue)
        await pending.done.wait()
        return pending.length

    def add(
        self, queue: int, out: Sequence[Buffer], in_: Sequence[Buffer], done: Callable[[int], None]
    ) -> None:
        """Put a chain on ``queue`` without waiting for it: ``done(used length)`` is called
        from the interrupt handler. The device sees it at the next :meth:`kick`, so a batch
        of chains costs one avail idx store and at most one notification (as blk-mq's
        ``commit_rqs``)."""
        self.queues[queue].add(out, in_, done, publish=False)

    async def kick(self, queue: int) -> None:
        """Publish the chains added to ``queue``; notify the device if it wants it."""
        if self.queues[queue].kick_prepare():
            await self.access.write(
                self.layout.bar, self.layout.notify_address(self._notify_offsets[queue]), 2, queue
            )

    def _harvest(self, queues: Iterable[int]) -> None:
        for index in queues:
            self.queues[index].harvest(_deliver)

    def interrupt(self, vector: int) -> None:
        """MSI-X ``vector`` was delivered."""
        if self._plan.msix and vector == self._plan.config:
            self._config_interrupt()
        queues = self._queues_of.get(vector)
        if queues is not None:
            self._harvest(queues)

    def set_intx(self, asserted: bool) -> None:
        """The INTx level changed (MSI-X disabled)."""
        self._intx = asserted
        if asserted:
            self._intx_raised.set()

    async def serve_intx(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The INTx handler: while the line is up, read ISR (which lowers it) and harvest."""
        task_status.started()
        while True:
            await self._intx_raised.wait()
            self._intx_raised = trio.Event()
            while self._intx:
                isr = await self.access.read(self.layout.bar, self.layout.isr, 1)
                if isr & ISR_CONFIG:
                    self._config_interrupt()
                self._harvest(range(len(self.queues)))

    def _config_interrupt(self) -> None:
        self.config_changes += 1
        self._config_changed.set()
        self._config_changed = trio.Event()

    async def wait_config_change(self) -> None:
        await self._config_changed.wait()

    def close(self) -> None:
        """Forget the queues (and let go of their views of guest memory)."""
        for queue in self.queues:
            queue.close()
        self.queues.clear()


class BlkError(MsixhubError):
    def __init__(self, status: int) -> None:
        super().__init__(f"virtio-blk request failed with status {status}")
        self.status = status


@dataclass(frozen=True, slots=True)
class _Slot:
    header: int
    data: int
    status: int


class BlkDriver:
    """virtio-blk requests through a set of preallocated request slots."""

    FEATURES = RING_FEATURES | sum(
        bit(f)
        for f in (
            BlkFeature.SEG_MAX,
            BlkFeature.BLK_SIZE,
            BlkFeature.RO,
            BlkFeature.FLUSH,
            BlkFeature.DISCARD,
            BlkFeature.WRITE_ZEROES,
        )
    )

    def __init__(
        self,
        driver: VirtioPciDriver,
        *,
        slots: int = 8,
        max_transfer: int = 1 << 17,
        segment: int = 4096,
    ) -> None:
        self.driver = driver
        self.max_transfer = max_transfer
        self.segment = segment
        self._slot_count = slots
        self._slots: list[_Slot] = []
        self._free = trio.Semaphore(slots)
        self.capacity = 0
        self.blk_size = SECTOR
        self.seg_max = 0
        self.read_only = False

    async def start(self, features: int | None = None, queue_size: int | None = None) -> None:
        negotiated = await self.driver.initialize(
            self.FEATURES if features is None else features, (queue_size,)
        )
        self.capacity = await self.driver.read_config(BlkConfig.CAPACITY, 8)
        self.seg_max = await self.driver.read_config(BlkConfig.SEG_MAX, 4)
        if negotiated & bit(BlkFeature.BLK_SIZE):
            self.blk_size = await self.driver.read_config(BlkConfig.BLK_SIZE, 4)
        self.read_only = bool(negotiated & bit(BlkFeature.RO))
        allocator = self.driver.allocator
        self._slots = [
            _Slot(
                allocator.alloc(REQUEST_HEADER.size),
                allocator.alloc(self.max_transfer, 512),
                allocator.alloc(1, 1),
            )
            for _ in range(self._slot_count)
        ]

    def _segments(self, gpa: int, length: int) -> list[Buffer]:
        return [(gpa + at, min(self.segment, length - at)) for at in range(0, length, self.segment)]

    async def request(
        self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0
    ) -> tuple[int, bytes, int]:
        """One request; returns (status, data read, used length)."""
        if max(len(out), in_len) > self.max_transfer:
            raise ValueError(f"transfer larger than {self.max_transfer} bytes")
        memory = self.driver.memory
        async with self._free:
            slot = self._slots.pop()
            try:
                memory.write(slot.header, REQUEST_HEADER.pack(kind, 0, sector))
                memory.write(slot.status, b"\xff")
                readable = [(slot.header, REQUEST_HEADER.size)]
                if out:
                    memory.write(slot.data, out)
                    readable += self._segments(slot.data, len(out))
                writable = [*self._segments(slot.data, in_len), (slot.status, 1)]
                used = await self.driver.submit(0, readable, writable)
                status = memory.read(slot.status, 1)[0]
                data = memory.read(slot.data, in_len) if in_len else b""
            finally:
                self._slots.append(slot)
        return status, data, used

    async def _checked(
        self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0
    ) -> bytes:
        status, data, _ = await self.request(kind, sector, out, in_len)
        if status != BlkStatus.OK:
            raise BlkError(status)
        return data

    async def read(self, sector: int, length: int) -> bytes:
        return await self._checked(BlkType.IN, sector, in_len=length)

    async def write(self, sector: int, data: bytes) -> None:
        await self._checked(BlkType.OUT, sector, out=data)

    async def flush(self) -> None:
        await self._checked(BlkType.FLUSH)

    async def get_id(self) -> bytes:
        return (await self._checked(BlkType.GET_ID, in_len=20)).rstrip(b"\0")

    async def discard(self, sector: int, count: int) -> None:
        await self._checked(BlkType.DISCARD, out=SEGMENT.pack(sector, count, 0))

    async def write_zeroes(self, sector: int, count: int, *, unmap: bool = False) -> None:
        await self._checked(BlkType.WRITE_ZEROES, out=SEGMENT.pack(sector, count, int(unmap)))


class RngDriver:
    def __init__(self, driver: VirtioPciDriver, *, max_bytes: int = 4096) -> None:
        self.driver = driver
        self.max_bytes = max_bytes
        self._buffer = 0
        self._lock = trio.Lock()

    async def start(self) -> None:
        await self.driver.initialize(RING_FEATURES)
        self._buffer = self.driver.allocator.alloc(self.max_bytes)

    async def read(self, length: int) -> bytes:
        """Up to ``length`` random bytes (the device may return fewer)."""
        if not 0 < length <= self.max_bytes:
            raise ValueError(f"length must be in 1..{self.max_bytes}")
        async with self._lock:
            used = await self.driver.submit(0, [], [(self._buffer, length)])
            return self.driver.memory.read(self._buffer, used) if used else b""
