"""The virtio-pci modern transport (virtio 1.x section 4.1) as a pure register model.

One memory BAR holds four windows (QEMU's layout): common configuration, ISR status,
device-specific configuration and the notification area. The MSI-X table and PBA are not
here: the hub owns them. The model talks to the outside through three small interfaces the
daemon implements:

* :class:`VectorResources` -- ``await use(v)`` / ``await unuse(v)``, the hub's per-vector
  resources. They are coroutines because they are hub RPCs; that is why :meth:`write` is
  ``async``. A refusal is :class:`VectorRefused`, and the register then reads back
  ``VIRTIO_MSI_NO_VECTOR`` so the driver can retry with fewer vectors.
* :class:`InterruptSink` -- ``notify(v)`` (an eventfd write) and ``set_intx(level)``.
* :class:`QueueRunner` -- ``kick(q)`` (look at queue q) and ``await quiesce()`` (wait until
  no request of this device is executing), needed by a reset.

Register accesses must be serialised by the caller (one at a time per device, e.g. under a
lock): a write may be suspended in a hub RPC, and an access that arrives meanwhile raises
:class:`TransportBusy`. :meth:`pop` and :meth:`complete` may run at any time.

Vector bookkeeping across a crash: every register write is saved to the device-state
region, and a vector register is saved as NO_VECTOR *before* ``unuse``/``use`` and as the
new vector only after ``use`` succeeded. So the vectors the saved state holds are always a
subset of those the hub has counted for the device. A kill inside that window leaves the
hub one reference too many (the old vector's if the hub never saw the ``unuse``, the new
one's if ``use`` succeeded but its reply was lost), and a kill inside a reset leaves it
every reference the reset was giving back. The hub keeps its counts across the restart,
so a restarted daemon asks for them and calls :meth:`VirtioPciTransport.reconcile_vectors`,
serialised with register accesses (a write that comes first changes both sides alike, so
the surplus waits for it unchanged).
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.constants import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    ISR_CONFIG,
    ISR_QUEUE,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_DEVICE_ID_BASE,
    VIRTIO_PCI_VENDOR_ID,
    Status,
    bit,
)
from msixhub.devices.virtio.device import DeviceRequest, VirtioDevice
from msixhub.devices.virtio.inflight import (
    DeviceStateError,
    DeviceStateRegion,
    QueueRegisters,
    TransportState,
)
from msixhub.devices.virtio.ring import Chain, RingLayout, SplitVirtqueue, VirtqueueError
from msixhub.protocol.errors import MsixhubError

TRANSPORT_FEATURES = bit(F_VERSION_1) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX)
_DRIVER_OK = int(Status.DRIVER_OK)
_LIVE_MASK = int(Status.DRIVER_OK | Status.FAILED)


class CommonCfg(IntEnum):
    """Offsets in ``struct virtio_pci_common_cfg``."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30


COMMON_CFG = struct.Struct("<IIIIHHBBHHHHHQQQ")  # 0x38 bytes, in CommonCfg order
_QUEUE_ADDRESS_FIELDS: dict[int, str] = {
    CommonCfg.QUEUE_DESC: "desc",
    CommonCfg.QUEUE_DRIVER: "driver",
    CommonCfg.QUEUE_DEVICE: "device",
}


class CapType(IntEnum):
    """``cfg_type`` of a virtio PCI capability."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4


PCI_CAP_ID_VNDR = 0x09
_VIRTIO_CAP = struct.Struct("<BBBBBBxxII")  # struct virtio_pci_cap, 16 bytes
_NOTIFY_MULT = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class BarLayout:
    """Where the virtio structures sit: one BAR, four 4 KiB windows, notify stride 4."""

    bar: int = 4
    common: int = 0x0000
    isr: int = 0x1000
    device: int = 0x2000
    notify: int = 0x3000
    window: int = 0x1000
    notify_off_multiplier: int = 4

    @property
    def size(self) -> int:
        """BAR size (a power of two, as PCI wants)."""
        end = max(self.common, self.isr, self.device, self.notify) + self.window
        return 1 << (end - 1).bit_length()

    def notify_address(self, queue_notify_off: int) -> int:
        return self.notify + queue_notify_off * self.notify_off_multiplier

    def capabilities(self) -> list[bytes]:
        """The vendor-specific PCI capabilities (virtio_pci_cap) for the device's config
        space, common/notify/ISR/device order; ``cap_next`` is 0 for whoever links the list."""
        caps = []
        for cap_type, offset in (
            (CapType.COMMON, self.common),
            (CapType.NOTIFY, self.notify),
            (CapType.ISR, self.isr),
            (CapType.DEVICE, self.device),
        ):
            length = _VIRTIO_CAP.size + (_NOTIFY_MULT.size if cap_type is CapType.NOTIFY else 0)
            cap = _VIRTIO_CAP.pack(
                PCI_CAP_ID_VNDR, 0, length, cap_type, self.bar, 0, offset, self.window
            )
            if cap_type is CapType.NOTIFY:
                cap += _NOTIFY_MULT.pack(self.notify_off_multiplier)
            caps.append(cap)
        return caps

    @classmethod
    def from_capabilities(cls, caps: list[bytes]) -> BarLayout:
        """Read the layout back from virtio_pci_cap structures, as a driver discovers it."""
        found: dict[int, tuple[int, int, int]] = {}
        multiplier = 0
        for cap in caps:
            vndr, _next, length, cfg_type, bar, _id, offset, window = _VIRTIO_CAP.unpack_from(cap)
            if vndr != PCI_CAP_ID_VNDR or length < _VIRTIO_CAP.size:
                raise ValueError(f"not a virtio_pci_cap: {cap.hex()}")
            found.setdefault(cfg_type, (bar, offset, window))
            if cfg_type == CapType.NOTIFY:
                multiplier = _NOTIFY_MULT.unpack_from(cap, _VIRTIO_CAP.size)[0]
        if any(t not in found for t in CapType):
            raise ValueError(f"missing virtio capabilities: have types {sorted(found)}")
        bars = {bar for bar, _, _ in found.values()}
        windows = {window for _, _, window in found.values()}
        if len(bars) != 1 or len(windows) != 1:
            raise ValueError("this layout wants all structures in one BAR with one window size")
        return cls(
            bars.pop(),
            found[CapType.COMMON][1],
            found[CapType.ISR][1],
            found[CapType.DEVICE][1],
            found[CapType.NOTIFY][1],
            windows.pop(),
            multiplier,
        )

    def locate(self, offset: int, size: int) -> tuple[CapType, int]:
        """The window an access falls in and the offset inside it."""
        if size not in (1, 2, 4, 8):
            raise BarAccessError(f"access size {size} is not 1, 2, 4 or 8")
        for window, base in (
            (CapType.COMMON, self.common),
            (CapType.ISR, self.isr),
            (CapType.DEVICE, self.device),
            (CapType.NOTIFY, self.notify),
        ):
            if base <= offset and offset + size <= base + self.window:
                return window, offset - base
        raise BarAccessError(f"access [{offset:#x}, +{size}) is not inside one virtio window")


@dataclass(frozen=True, slots=True)
class PciIdentity:
    """Config-space identity of a modern (non-transitional) virtio-pci function."""

    vendor_id: int
    device_id: int
    revision: int
    class_code: int
    subsystem_vendor_id: int
    subsystem_id: int

    @classmethod
    def of(cls, device: VirtioDevice) -> PciIdentity:
        return cls(
            VIRTIO_PCI_VENDOR_ID,
            VIRTIO_PCI_DEVICE_ID_BASE + device.device_id,
            0x01,
            device.pci_class,
            VIRTIO_PCI_VENDOR_ID,
            0x1100,
        )


class BarAccessError(ValueError):
    """An access the BAR cannot take (bad size, outside the windows)."""


class TransportBusy(RuntimeError):
    """A register access arrived while a write was waiting on the hub (serialise them)."""


class VectorRefused(MsixhubError):
    """The hub refused ``use`` of a vector (budget exhausted, vector past the table)."""


class VectorResources(Protocol):
    async def use(self, vector: int) -> None:
        """Take a reference on ``vector``'s resources; raise VectorRefused if impossible."""
        ...

    async def unuse(self, vector: int) -> None: ...


class InterruptSink(Protocol):
    def notify(self, vector: int) -> None:
        """Deliver MSI-X ``vector`` (the hub decides masked/pending)."""
        ...

    def set_intx(self, asserted: bool) -> None:
        """Set the level of the INTx pin (MSI-X disabled)."""
        ...


class QueueRunner(Protocol):
    def kick(self, queue: int) -> None:
        """Queue ``queue`` may have new buffers: pop until :meth:`VirtioPciTransport.pop`
        returns None."""
        ...

    async def quiesce(self) -> None:
        """Return once no request of this device is executing (their completions are
        dropped after a reset)."""
        ...


class Request:
    """A popped request: execute ``work`` (off the loop if ``blocking``), then complete it.
    A plain slotted class, not a frozen dataclass: one is made per request (0.4 us less)."""

    __slots__ = ("queue", "ring", "work")

    def __init__(self, queue: int, work: DeviceRequest, ring: SplitVirtqueue) -> None:
        self.queue = queue
        self.work = work
        self.ring = ring

    @property
    def chain(self) -> Chain:
        return self.work.chain

    @property
    def blocking(self) -> bool:
        return self.work.blocking

    def execute(self) -> int:
        return self.work.execute()


class _Queue:
    __slots__ = ("error", "regs", "resubmit", "ring")

    def __init__(self, regs: QueueRegisters) -> None:
        self.regs = regs
        self.ring: SplitVirtqueue | None = None
        self.resubmit: deque[Request] = deque()
        self.error: str | None = None


def _reset_state(device: VirtioDevice, generation: int) -> TransportState:
    return TransportState(
        config_generation=generation,
        queues=[QueueRegisters(size=device.max_queue_size) for _ in range(device.num_queues)],
    )


class VirtioPciTransport:
    """One virtio-pci function: registers, status machine, queues, interrupts."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        *,
        vectors: VectorResources,
        interrupts: InterruptSink,
        runner: QueueRunner,
        state: DeviceStateRegion | None = None,
        layout: BarLayout | None = None,
    ) -> None:
        self.device = device
        self.memory = memory
        self.layout = layout or BarLayout()
        if device.num_queues * self.layout.notify_off_multiplier > self.layout.window:
            raise ValueError(f"{device.num_queues} queues do not fit the notify window")
        self._vectors = vectors
        self._interrupts = interrupts
        self._runner = runner
        self._region = state
        self._msix_enabled = False
        self._intx = False
        self._isr = 0
        self._busy = False
        if state is None:
            loaded = _reset_state(device, generation=0)
        elif state.reset_pending:  # a reset cut short, or a region no driver wrote yet
            loaded = _reset_state(device, state.load().config_generation)
        else:  # the registers as the driver left them, whatever the status (even 0)
            loaded = state.load()
            if loaded.status & Status.FEATURES_OK and not device.negotiate(loaded.driver_features):
                raise DeviceStateError("the device refuses the features saved in its region")
        self._st = loaded
        self._queues = [_Queue(regs) for regs in loaded.queues]
        self._resumed = False

    # -- what the daemon reads ----------------------------------------------------------

    @property
    def status(self) -> int:
        return self._st.status

    @property
    def features(self) -> int:
        """The negotiated features (valid once FEATURES_OK is set)."""
        return self._st.driver_features

    def queue_error(self, queue: int) -> str | None:
        """Why ``queue`` was stopped (a hostile-guest message), if it was."""
        return self._queues[queue].error

    def vector_uses(self) -> Counter[int]:
        """The vector references this device holds at the hub, by vector."""
        vectors = [self._st.config_msix_vector] + [q.regs.msix_vector for q in self._queues]
        return Counter(v for v in vectors if v != VIRTIO_MSI_NO_VECTOR)

    def live_queues(self) -> list[int]:
        return [q for q in range(len(self._queues)) if self._live(q)]

    def requeued(self, queue: int) -> int:
        """Requests a restored queue took before the crash and has still to run again."""
        return len(self._queues[queue].resubmit)

    # -- register access ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A driver read of ``size`` bytes at ``offset`` in the BAR."""
        window, at = self.layout.locate(offset, size)
        self._check_idle()
        if window is CapType.COMMON:
            data = self._common_image()
        elif window is CapType.DEVICE:
            data = self.device.config_space()
        elif window is CapType.ISR:
            return self._read_isr() if at == 0 else 0
        else:
            return 0
        return int.from_bytes(data[at : at + size].ljust(size, b"\0"), "little")

    async def write(self, offset: int, size: int, value: int) -> None:
        """A driver write; may await hub RPCs (vector use/unuse) and the runner (reset)."""
        window, at = self.layout.locate(offset, size)
        self._check_idle()
        value &= (1 << (8 * size)) - 1
        if window is CapType.NOTIFY:
            queue, rest = divmod(at, self.layout.notify_off_multiplier)
            if not rest and queue < len(self._queues):
                self._runner.kick(queue)
        elif window is CapType.DEVICE:
            self.device.write_config(at, value.to_bytes(size, "little"))
        elif window is CapType.COMMON:
            self._busy = True
            try:
                await self._write_common(at, size, value)
            finally:
                self._busy = False
                self._save()

    def _check_idle(self) -> None:
        if self._busy:
            raise TransportBusy("a register write is still waiting on the hub")

    def _common_image(self) -> bytes:
        st = self._st
        q = self._selected()
        regs = q.regs if q is not None else QueueRegisters(size=0)
        offered = self.device.device_features() | TRANSPORT_FEATURES
        return COMMON_CFG.pack(
            st.device_feature_select,
            (offered >> (32 * st.device_feature_select)) & 0xFFFFFFFF
            if st.device_feature_select < 2
            else 0,
            st.driver_feature_select,
            (st.driver_features >> (32 * st.driver_feature_select)) & 0xFFFFFFFF
            if st.driver_feature_select < 2
            else 0,
            st.config_msix_vector,
            len(self._queues),
            st.status,
            st.config_generation,
            st.queue_select,
            regs.size,
            regs.msix_vector,
            int(regs.enabled),
            st.queue_select if q is not None else 0,  # queue_notify_off
            regs.desc,
            regs.driver,
            regs.device,
        )

    def _selected(self) -> _Queue | None:
        select = self._st.queue_select
        return self._queues[select] if select < len(self._queues) else None

    async def _write_common(self, at: int, size: int, value: int) -> None:
        st, q = self._st, self._selected()
        match (at, size):
            case (CommonCfg.DEVICE_FEATURE_SELECT, 4):
                st.device_feature_select = value
            case (CommonCfg.DRIVER_FEATURE_SELECT, 4):
                st.driver_feature_select = value
            case (CommonCfg.DRIVER_FEATURE, 4):
                if st.driver_feature_select < 2 and not st.status & Status.FEATURES_OK:
                    shift = 32 * st.driver_feature_select
                    st.driver_features = (st.driver_features & ~(0xFFFFFFFF << shift)) | (
                        value << shift
                    )
            case (CommonCfg.CONFIG_MSIX_VECTOR, 2):
                await self._assign_vector(None, value)
            case (CommonCfg.DEVICE_STATUS, 1):
                await self._write_status(value)
            case (CommonCfg.QUEUE_SELECT, 2):
                st.queue_select = value
            case (CommonCfg.QUEUE_MSIX_VECTOR, 2) if q is not None:
                await self._assign_vector(q, value)
            case (CommonCfg.QUEUE_SIZE, 2) if q is not None and not q.regs.enabled:
                # A driver may shrink a queue; a value that is no power of two up to the
                # maximum is ignored and reads back unchanged (QEMU does the same).
                if 0 < value <= self.device.max_queue_size and not value & (value - 1):
                    q.regs.size = value
            case (CommonCfg.QUEUE_ENABLE, 2) if q is not None:
                if value == 1 and not q.regs.enabled:  # writing 0 is not allowed (4.1.4.3.2)
                    q.regs.enabled = True
                    if st.status & Status.DRIVER_OK:
                        self._start_queue(st.queue_select)
            case (at_, 4 | 8) if q is not None and not q.regs.enabled:
                self._write_queue_address(q.regs, at_, size, value)

    @staticmethod
    def _write_queue_address(regs: QueueRegisters, at: int, size: int, value: int) -> None:
        """queue_desc/driver/device: one 64-bit access or two 32-bit halves."""
        field_at, half = at & ~7, at & 7
        name = _QUEUE_ADDRESS_FIELDS.get(field_at)
        if name is None or (size == 8 and half) or half not in (0, 4):
            return
        if size == 8:
            setattr(regs, name, value)
        else:
            shift = 8 * half
            old = getattr(regs, name)
            setattr(regs, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    # -- status machine -----------------------------------------------------------------

    async def _write_status(self, value: int) -> None:
        st = self._st
        if value == 0:
            await self._reset()
            return
        # Bits are only ever added (a driver clears them by resetting); NEEDS_RESET is
        # the device's own bit.
        old = st.status
        new = (old | value) & ~Status.DEVICE_NEEDS_RESET | (old & Status.DEVICE_NEEDS_RESET)
        added = new & ~old
        if added & Status.FEATURES_OK and not self._features_acceptable():
            new &= ~Status.FEATURES_OK
        if added & Status.DRIVER_OK and not new & Status.FEATURES_OK:
            st.status = int((new & ~Status.DRIVER_OK) | Status.DEVICE_NEEDS_RESET)
            self._signal_config()
            return
        st.status = int(new)  # a plain int: the per-request liveness check reads it
        if added & Status.DRIVER_OK:
            for index, q in enumerate(self._queues):
                if q.regs.enabled:
                    self._start_queue(index)

    def _features_acceptable(self) -> bool:
        features = self._st.driver_features
        offered = self.device.device_features() | TRANSPORT_FEATURES
        return (
            not features & ~offered
            and bool(features & bit(F_VERSION_1))
            and self.device.negotiate(features)
        )

    def _negotiated(self, feature: int) -> bool:
        return bool(self._st.driver_features & bit(feature))

    def _ring_layout(self, regs: QueueRegisters) -> RingLayout:
        return RingLayout(regs.size, regs.desc, regs.driver, regs.device)

    def _start_queue(self, index: int) -> None:
        q = self._queues[index]
        inflight = self._region.queue(index) if self._region is not None else None
        try:
            q.ring = SplitVirtqueue(
                self.memory,
                self._ring_layout(q.regs),
                event_idx=self._negotiated(F_EVENT_IDX),
                indirect=self._negotiated(F_INDIRECT_DESC),
                inflight=inflight,
            )
        except VirtqueueError as exc:
            self._fail(index, exc)
            return
        if inflight is not None:
            inflight.start(q.regs.size, used_idx=0)
        self._runner.kick(index)

    async def _reset(self) -> None:
        """Status 0: stop the rings, wait for executing requests, forget everything."""
        rings = [q.ring for q in self._queues if q.ring is not None]
        for q in self._queues:
            q.ring = None
            for request in q.resubmit:
                request.chain.release()
            q.resubmit.clear()
        await self._runner.quiesce()
        held = self.vector_uses()
        self._st = _reset_state(self.device, self._st.config_generation)
        self._queues = [_Queue(regs) for regs in self._st.queues]
        self._isr = 0
        self._update_intx()
        self._save(reset=True)  # before the unuses: the saved vectors stay a subset of the hub's
        if self._region is not None:
            for index in range(len(self._queues)):
                self._region.queue(index).invalidate()
        for ring in rings:
            ring.close()
        self.device.reset()
        for vector, count in held.items():
            for _ in range(count):
                await self._vectors.unuse(vector)

    async def _assign_vector(self, q: _Queue | None, new: int) -> None:
        """config_msix_vector / queue_msix_vector: unuse the old vector, use the new one."""
        old = self._st.config_msix_vector if q is None else q.regs.msix_vector
        if new == old:
            return
        self._set_vector(q, VIRTIO_MSI_NO_VECTOR)
        self._save()
        if old != VIRTIO_MSI_NO_VECTOR:
            await self._vectors.unuse(old)
        if new != VIRTIO_MSI_NO_VECTOR:
            try:
                await self._vectors.use(new)
            except VectorRefused:
                return
            self._set_vector(q, new)

    async def reconcile_vectors(self, held: Mapping[int, int]) -> None:
        """Make the hub's references for this device equal :meth:`vector_uses`, given
        ``held``, the hub's count per vector (after a restart, see the module doc).

        Surplus references are unused first (that frees their routes). A register whose
        vector the hub does not count (the invariant rules it out, but the hub is the
        authority) is used again, and reads NO_VECTOR if refused, as after a refused
        write. Serialised with register accesses like :meth:`write`."""
        self._check_idle()
        self._busy = True
        try:
            wanted = self.vector_uses()
            have = Counter({v: n for v, n in held.items() if n > 0})
            for vector, surplus in (have - wanted).items():
                for _ in range(surplus):
                    await self._vectors.unuse(vector)
            have &= wanted
            for q in [None, *self._queues]:
                vector = self._st.config_msix_vector if q is None else q.regs.msix_vector
                if vector == VIRTIO_MSI_NO_VECTOR:
                    continue
                if have[vector]:
                    have[vector] -= 1
                    continue
                try:
                    await self._vectors.use(vector)
                except VectorRefused:
                    self._set_vector(q, VIRTIO_MSI_NO_VECTOR)
        finally:
            self._busy = False
            self._save()

    def _set_vector(self, q: _Queue | None, vector: int) -> None:
        if q is None:
            self._st.config_msix_vector = vector
        else:
            q.regs.msix_vector = vector

    def _save(self, *, reset: bool = False) -> None:
        if self._region is not None:
            self._region.save(self._st, reset=reset)

    def set_memory(self, memory: GuestMemory) -> None:
        """A new memory table; live rings translate their areas again (a ring the new
        table no longer covers stops its queue). The caller closes the old table."""
        self.memory = memory
        for index, q in enumerate(self._queues):
            if q.ring is None:
                continue
            try:
                q.ring.remap(memory)
            except VirtqueueError as exc:
                self._fail(index, exc)

    # -- restart --------------------------------------------------------------------------

    def resume(self) -> None:
        """Call once, after construction and ``set_msix_enabled``, before serving accesses.

        On a device restored from its state region this rebuilds the live queues from the
        in-flight log (the requests to execute again come first out of :meth:`pop`), sends
        one interrupt per live queue (a completion may have been published without one)
        and kicks the runner. On a fresh device it does nothing.
        """
        if self._resumed:
            return
        self._resumed = True
        if not self._st.status & Status.DRIVER_OK:
            return
        for index, q in enumerate(self._queues):
            if q.regs.enabled and not q.regs.broken:
                self._recover_queue(index)
        for index in self.live_queues():
            self._signal_queue(index)
            self._runner.kick(index)
        if self._st.status & Status.DEVICE_NEEDS_RESET:
            self._signal_config()

    def _recover_queue(self, index: int) -> None:
        q = self._queues[index]
        if self._region is None or not self._region.queue(index).valid:
            self._start_queue(index)
            return
        try:
            ring, chains = SplitVirtqueue.recover(
                self.memory,
                self._ring_layout(q.regs),
                inflight=self._region.queue(index),
                event_idx=self._negotiated(F_EVENT_IDX),
                indirect=self._negotiated(F_INDIRECT_DESC),
            )
        except (VirtqueueError, DeviceStateError) as exc:
            self._fail(index, exc)
            return
        q.ring = ring
        for number, chain in enumerate(chains):
            try:
                q.resubmit.append(Request(index, self.device.parse(index, chain), ring))
            except VirtqueueError as exc:
                for later in chains[number:]:
                    later.release()
                self._fail(index, exc)
                return

    # -- queues ---------------------------------------------------------------------------

    def _live(self, index: int) -> bool:
        q = self._queues[index]
        return (
            q.ring is not None
            and not q.regs.broken
            and self._st.status & _LIVE_MASK == _DRIVER_OK  # plain ints: runs per request
        )

    def pop(self, queue: int) -> Request | None:
        """The next request of ``queue``, or None (empty, not live, or just stopped)."""
        if not self._live(queue):
            return None
        q = self._queues[queue]
        if q.resubmit:
            return q.resubmit.popleft()
        assert q.ring is not None
        try:
            chain = q.ring.pop()
            if chain is None:
                return None
        except VirtqueueError as exc:
            self._fail(queue, exc)
            return None
        try:
            return Request(queue, self.device.parse(queue, chain), q.ring)
        except VirtqueueError as exc:
            chain.release()
            self._fail(queue, exc)
            return None

    def complete(self, request: Request, written: int, *, notify: bool = True) -> None:
        """Return a request on the used ring and interrupt the driver if it wants one.

        ``notify=False`` leaves the interrupt to a later :meth:`notify_used` for the
        queue, so a batch of completions costs one interrupt (vhost's ``add_used_n`` then
        ``signal``); the caller must make that call before it waits for anything.
        A request whose device was reset since it was popped is dropped.
        """
        ring, chain = request.ring, request.work.chain
        try:
            if ring is not self._queues[request.queue].ring:
                return
            ring.push(chain.head, written)
            if notify and ring.needs_notification():
                self._signal_queue(request.queue)
        finally:
            chain.release()

    def abandon(self, request: Request) -> None:
        """Let go of a popped request without completing it (the daemon is stopping): its
        head stays taken in the in-flight log, so the next daemon runs it again."""
        request.work.chain.release()

    def close(self) -> None:
        """The daemon is stopping: release every view of guest memory held here (rings,
        requests recovered and not yet popped). The state region is left as it is."""
        for q in self._queues:
            for request in q.resubmit:
                request.work.chain.release()
            q.resubmit.clear()
            if q.ring is not None:
                q.ring.close()
                q.ring = None

    def notify_used(self, queue: int) -> None:
        """Interrupt the driver if it wants one for what ``queue`` completed since the last
        check (the event-idx rule spans the whole batch)."""
        ring = self._queues[queue].ring
        if ring is not None and ring.needs_notification():
            self._signal_queue(queue)

    def _fail(self, index: int, exc: Exception) -> None:
        """A hostile guest: stop this queue, set DEVICE_NEEDS_RESET, tell the driver."""
        q = self._queues[index]
        q.regs.broken = True
        q.error = str(exc)
        self._st.status = int(self._st.status | Status.DEVICE_NEEDS_RESET)
        self._save()
        self._signal_config()

    # -- interrupts ---------------------------------------------------------------------

    def set_msix_enabled(self, enabled: bool) -> None:
        """The hub's MSI-X enable bit for this function (INTx is used while it is clear)."""
        self._msix_enabled = enabled
        self._update_intx()

    def config_changed(self) -> None:
        """The device-specific configuration changed (e.g. capacity): bump generation, tell."""
        self._st.config_generation = (self._st.config_generation + 1) & 0xFF
        self._save()
        self._signal_config()

    def _signal_queue(self, index: int) -> None:
        if self._msix_enabled:
            vector = self._queues[index].regs.msix_vector
            if vector != VIRTIO_MSI_NO_VECTOR:
                self._interrupts.notify(vector)
        else:
            self._isr |= ISR_QUEUE
            self._update_intx()

    def _signal_config(self) -> None:
        self._isr |= ISR_CONFIG  # set whatever the interrupt mode (4.1.4.5.1)
        if self._msix_enabled:
            if self._st.config_msix_vector != VIRTIO_MSI_NO_VECTOR:
                self._interrupts.notify(self._st.config_msix_vector)
        else:
            self._update_intx()

    def _read_isr(self) -> int:
        value, self._isr = self._isr, 0
        self._update_intx()
        return value

    def _update_intx(self) -> None:
        level = not self._msix_enabled and self._isr != 0
        if level != self._intx:
            self._intx = level
            self._interrupts.set_intx(level)
