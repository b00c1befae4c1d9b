"""The VMM client library: what a VMM embeds to use devices served by an msixhub hub.

    async with connect("/tmp/msixhub.sock", name="vm0") as vm:
        region, memory = await vm.add_memory(64 << 20)
        blk = await vm.attach("blk0")
        await blk.mmio_write(bar, offset, 4, value)
        async for event in vm.events():      # Interrupt | Intx | DeviceEvent
            ...

The client keeps the guest's view of each device's MSI-X table and Message Control and does
its half of the mask handoff (DESIGN.md): when a write masks a vector it stops reading that
vector's eventfd *before* forwarding the write; when a write unmasks it resumes reading only
*after* the hub acknowledged (by then the hub has stopped reading and sent any pending
interrupt as an ``Irq`` message, never through the eventfd). A count read from an eventfd is
never dropped: events wait in a bounded queue, and a reader whose queue is full stops reading,
so further notifications coalesce in the eventfd instead of being lost. Interrupts the hub
sends (``Irq``) coalesce the same way in the hub while they wait to be sent: one carries
``count`` notifications.

Over TCP (``connect(("host", port))``) no fd can travel: the hub reads every vector itself and
sends each interrupt as an ``Irq``, and a kick goes to the hub as a ``Kick`` notice (kicks of
one queue not yet sent coalesce, as in an eventfd). Guest memory needs fd passing: such a
VMM drives devices that need none (registers, interrupts, kicks).
"""

from __future__ import annotations

import array
import mmap
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NamedTuple

import trio
from msixhub.protocol.connection import Notice, Request
from msixhub.protocol.errors import ConnectionClosed, ErrorCode, MessageError, MsixhubError
from msixhub.protocol.fds import (
    NowaitReader,
    OwnedFd,
    close_all,
    eventfd_read_nowait,
    eventfd_write,
    memfd,
)
from msixhub.protocol.messages import (
    Attach,
    Attached,
    ClearIoeventfd,
    ClearIrqFd,
    Detach,
    DeviceInfo,
    DeviceState,
    Intx,
    Irq,
    IvshmemPeer,
    Kick,
    MmioRead,
    MmioWrite,
    MsixControlRead,
    MsixControlWrite,
    Region,
    SetBarMemory,
    SetIoeventfd,
    SetIrqFd,
    SetMemTable,
    Value,
)
from msixhub.protocol.ops import Empty
from msixhub.protocol.peer import Peer, connect_tcp, connect_unix, open_peer
from msixhub.protocol.schema import Message

ENTRY_SIZE = 16
MSIX_ENABLE = 1 << 15
FUNCTION_MASK = 1 << 14
EVENT_QUEUE_LIMIT = 4096


class Interrupt(NamedTuple):
    """An MSI-X interrupt: ``count`` device notifications coalesced into one message.

    A named tuple, unlike the other events: one is built per interrupt on the hot path, in
    a third of the time a frozen dataclass takes."""

    device: str
    vector: int
    address: int
    data: int
    count: int = 1


@dataclass(frozen=True, slots=True)
class IntxEvent:
    device: str
    level: bool


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    device: str
    state: str  # "up" | "down"


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """An ivshmem peer joined or left the shared-memory domain of ``device``; on a join the
    doorbells that ring it are in place."""

    device: str
    peer_id: int
    joined: bool


Event = Interrupt | IntxEvent | DeviceEvent | PeerEvent
IoeventfdKey = tuple[int, int, int, int | None]  # (bar, offset, size, datamatch or None: any)
FdRequest = SetIrqFd | ClearIrqFd | SetIoeventfd | ClearIoeventfd | SetBarMemory


class EventQueue:
    """Bounded FIFO of events. ``put`` never blocks and never drops; producers that can wait
    (eventfd readers) call ``wait_for_space`` before they read, so the bound holds. Interrupts
    that come as messages cannot wait (the connection is read whatever this queue holds: the
    replies come that way), so they coalesce instead (``put_interrupt``)."""

    def __init__(self, limit: int = EVENT_QUEUE_LIMIT) -> None:
        self.limit = limit
        self._items: deque[Event | list[Interrupt]] = deque()
        self._waiting: dict[tuple[str, int], list[Interrupt]] = {}  # queued message interrupts
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit

    def put(self, event: Event) -> None:
        self._items.append(event)
        self._readers.unpark()

    def put_interrupt(self, event: Interrupt) -> None:
        """A message-path interrupt: its count joins the one for the same vector still
        queued, if any (with the newer message), as an eventfd adds up the counts its reader
        has not read; so these take one place per vector, whatever their rate."""
        key = (event.device, event.vector)
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting[0] = event._replace(count=waiting[0].count + event.count)
            return
        slot = self._waiting[key] = [event]
        self._items.append(slot)
        self._readers.unpark()

    async def wait_for_space(self) -> None:
        while len(self._items) >= self.limit:
            await self._writers.park()

    async def get(self) -> Event:
        while not self._items:
            await self._readers.park()
        item = self._items.popleft()
        if len(self._items) < self.limit:
            self._writers.unpark_all()
        if isinstance(item, list):
            event = item[0]
            del self._waiting[event.device, event.vector]
            return event
        return item


class AttachedDevice:
    """A device attached to this VMM, with the guest's view of its MSI-X capability."""

    def __init__(
        self, vm: VmmClient, info: DeviceInfo, kicks: list[OwnedFd], state: Attached | None = None
    ) -> None:
        self.vm = vm
        self.info = info
        self.id = info.device
        self.kicks = kicks
        self.by_message = state is not None and state.by_message  # no fds: kicks by message
        self.detached = False  # closed: detached, or the VMM's connection is gone
        n = info.num_vectors
        self._table = array.array("I", [0, 0, 0, 1] * n)  # guest view; reset: all masked
        if state is not None and len(state.table) == n * ENTRY_SIZE:
            self._table = array.array("I", state.table)  # the state the hub kept
        self.control = state.control & (MSIX_ENABLE | FUNCTION_MASK) if state else 0
        self.irq_fds: dict[int, OwnedFd] = {}
        self._readers: dict[int, trio.CancelScope] = {}
        self.interrupts = array.array("Q", bytes(8 * n))  # interrupts received per vector
        self.notifications = array.array("Q", bytes(8 * n))  # notifications they carried
        self.ioeventfds: dict[IoeventfdKey, OwnedFd] = {}
        self.bar_memory: dict[int, mmap.mmap] = {}  # BARs that are memory (ivshmem's BAR2)

    # --- the guest's view --------------------------------------------------------------------

    def is_masked(self, vector: int) -> bool:
        return (
            not self.control & MSIX_ENABLE
            or bool(self.control & FUNCTION_MASK)
            or bool(self._table[vector * 4 + 3] & 1)
        )

    def message(self, vector: int) -> tuple[int, int]:
        base = vector * 4
        return self._table[base] | self._table[base + 1] << 32, self._table[base + 2]

    def _table_range(self, bar: int, offset: int) -> int | None:
        layout = self.info.msix
        rel = offset - layout.table_offset
        if bar == layout.bar and 0 <= rel < self.info.num_vectors * ENTRY_SIZE:
            return rel
        return None

    # --- guest accesses ----------------------------------------------------------------------

    async def mmio_read(self, bar: int, offset: int, size: int) -> int:
        reply = await self.vm.peer.call(MmioRead(self.id, bar, offset, size))
        assert isinstance(reply, Value)
        return reply.value

    def ioeventfd_write(self, bar: int, offset: int, size: int, value: int) -> bool:
        """A guest write that an ioeventfd takes (an ivshmem doorbell) is one eventfd write
        here, nobody asked: True if one did. ``mmio_write`` tries this first; a VMM's vCPU
        loop may call it directly, as KVM matches ioeventfds in the kernel."""
        ioeventfds = self.ioeventfds
        fd = ioeventfds.get((bar, offset, size, value)) or ioeventfds.get((bar, offset, size, None))
        if fd is None:
            return False
        eventfd_write(fd.fileno())
        return True

    async def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if self.ioeventfd_write(bar, offset, size, value):
            return
        rel = self._table_range(bar, offset)
        if rel is None or rel % size or size not in (4, 8):
            await self.vm.peer.call(MmioWrite(self.id, bar, offset, size, value))
            return
        vector, word = divmod(rel, ENTRY_SIZE)
        words = [(word // 4, value & 0xFFFF_FFFF)]
        if size == 8:
            words.append((word // 4 + 1, value >> 32))
        await self._change_view(
            [vector],
            lambda: self._store(vector, words),
            MmioWrite(self.id, bar, offset, size, value),
        )

    def _store(self, vector: int, words: list[tuple[int, int]]) -> None:
        for index, word_value in words:
            # Message Address bits 1:0 are reserved (DWORD-aligned), as the hub's model has it.
            self._table[vector * 4 + index] = word_value & ~3 if index == 0 else word_value

    async def msix_control_read(self) -> int:
        reply = await self.vm.peer.call(MsixControlRead(self.id))
        assert isinstance(reply, Value)
        return reply.value

    async def msix_control_write(self, value: int) -> None:
        def store() -> None:
            self.control = value & (MSIX_ENABLE | FUNCTION_MASK)

        await self._change_view(
            range(self.info.num_vectors), store, MsixControlWrite(self.id, value)
        )

    async def _change_view(self, vectors: range | list[int], store: object, write: Message) -> None:
        """Apply a guest write with the VMM's half of the mask handoff."""
        before = {v: self.is_masked(v) for v in vectors}
        saved_table, saved_control = self._table[:], self.control
        store()  # type: ignore[operator]
        for vector in vectors:
            if self.is_masked(vector) and not before[vector]:
                self._stop_reading(vector)  # at once, before the hub takes over
        try:
            await self.vm.peer.call(write)
        except BaseException:
            self._table, self.control = saved_table, saved_control
            for vector in vectors:
                if not self.is_masked(vector):
                    self._start_reading(vector)
            raise
        for vector in vectors:
            if before[vector] and not self.is_masked(vector):
                self._start_reading(vector)  # after the ack: the hub has let go

    def mask_function(self) -> None:
        """The VMM's half of a function mask the hub applies by itself (on a detach): every
        reader stops now and leaves its count to the hub, and none restarts."""
        self.control |= FUNCTION_MASK
        for vector in list(self._readers):
            self._stop_reading(vector)

    def kick(self, queue: int) -> None:
        """Notify ``queue`` (the ioeventfd write a VMM does on the guest's notify access)."""
        if self.by_message and not self.detached and 0 <= queue < self.info.num_queues:
            self.vm.post_kick(self.id, queue)
            return
        kicks = self.kicks
        if not 0 <= queue < len(kicks):
            raise self._no_kick(queue)
        eventfd_write(kicks[queue].fileno())

    def _no_kick(self, queue: int) -> MsixhubError:
        if self.detached:
            return ConnectionClosed(f"device {self.id!r} is detached from this VMM")
        return MessageError(
            ErrorCode.BAD_RANGE,
            f"device {self.id!r} has no queue {queue} ({self.info.num_queues} queues)",
        )

    # --- fds the hub hands over --------------------------------------------------------------

    def apply(self, body: FdRequest, fd: OwnedFd | None) -> None:
        """One of the hub's fd requests for this device (``fd`` becomes ours), in order."""
        if isinstance(body, SetIrqFd):
            assert fd is not None
            self._set_irq_fd(body.vector, fd)
        elif isinstance(body, ClearIrqFd):
            self._clear_irq_fd(body.vector)
        elif isinstance(body, SetIoeventfd):
            assert fd is not None
            old = self.ioeventfds.pop((body.bar, body.offset, body.size, body.datamatch), None)
            self.ioeventfds[body.bar, body.offset, body.size, body.datamatch] = fd
            if old is not None:
                old.close()
        elif isinstance(body, ClearIoeventfd):
            old = self.ioeventfds.pop((body.bar, body.offset, body.size, body.datamatch), None)
            if old is not None:
                old.close()
        else:
            assert fd is not None
            self._set_bar_memory(body.bar, body.size, fd)

    def _set_bar_memory(self, bar: int, size: int, fd: OwnedFd) -> None:
        with fd:  # the mapping keeps the memory; the fd is not needed after it
            if os.fstat(fd.fileno()).st_size < size:
                raise MessageError(ErrorCode.BAD_RANGE, f"BAR{bar} memory is smaller than {size}")
            mapping = mmap.mmap(fd.fileno(), size)
        old = self.bar_memory.pop(bar, None)
        self.bar_memory[bar] = mapping
        if old is not None:
            old.close()

    # --- interrupt channels ------------------------------------------------------------------

    def _set_irq_fd(self, vector: int, fd: OwnedFd) -> None:
        self._clear_irq_fd(vector)
        self.irq_fds[vector] = fd
        if not self.is_masked(vector):
            self._start_reading(vector)

    def _clear_irq_fd(self, vector: int, *, take: bool = True) -> None:
        """Stop reading ``vector``'s eventfd and close it; what it holds is taken first if
        ours to read (``take=False`` on detach: the hub reads it from then on)."""
        self._stop_reading(vector)
        fd = self.irq_fds.pop(vector, None)
        if fd is None:
            return
        if take and not self.is_masked(vector):
            self._take(vector, eventfd_read_nowait(fd.fileno()))
        trio.lowlevel.notify_closing(fd.fileno())
        fd.close()

    def _start_reading(self, vector: int) -> None:
        fd = self.irq_fds.get(vector)
        if fd is None or vector in self._readers:
            return
        scope = self._readers[vector] = trio.CancelScope()
        self.vm.nursery.start_soon(self._read, vector, fd, scope)

    def _stop_reading(self, vector: int) -> None:
        scope = self._readers.pop(vector, None)
        if scope is not None:
            scope.cancel()  # a reader waiting on the fd is taken off it now, synchronously

    async def _read(self, vector: int, fd: OwnedFd, scope: trio.CancelScope) -> None:
        """The vector's reader while the VMM owns it: one wake-up and one read per interrupt.

        It checks that it is still the vector's reader right before each wait, not only
        after it: a reader stopped before it first ran (or while it waited for queue space)
        must not wait on the fd, which the VMM (or a test) may be waiting on by then. The fd
        is closed only after its reader is stopped, so the checks also keep a closed, perhaps
        reused, fd number from being read. (A dict lookup, not ``scope.cancel_called``,
        which reads the clock: this runs once per interrupt.)"""
        queue, readers = self.vm.queue, self._readers
        if readers.get(vector) is not scope:
            return  # stopped before it ran: the fd may be closed already
        number, read = fd.fileno(), NowaitReader().read  # a blocking file, and others hold it
        with scope:
            try:
                while True:
                    if queue.full:
                        await queue.wait_for_space()
                    if readers.get(vector) is not scope:
                        return
                    await trio.lowlevel.wait_readable(number)
                    if readers.get(vector) is not scope:
                        return  # masked, or closing, while it woke
                    self._take(vector, read(number))
            except trio.ClosedResourceError:
                return

    def _take(self, vector: int, count: int) -> None:
        if count:
            self.interrupts[vector] += 1
            self.notifications[vector] += count
            address, data = self.message(vector)
            self.vm.emit(Interrupt(self.id, vector, address, data, count))

    def close(self) -> None:
        self.detached = True
        for vector in list(self.irq_fds):
            self._clear_irq_fd(vector, take=False)
        close_all(self.kicks)
        close_all(list(self.ioeventfds.values()))
        self.ioeventfds.clear()
        for mapping in self.bar_memory.values():
            mapping.close()
        self.bar_memory.clear()


class VmmClient:
    def __init__(self, peer: Peer, nursery: trio.Nursery) -> None:
        self.peer = peer
        self.nursery = nursery
        self.queue = EventQueue()
        # Called in the reader that took the event, before it is queued: True consumes it.
        # A VMM injects an interrupt into its vCPU right there; waking another task first
        # would cost a task switch per interrupt.
        self.handler: Callable[[Event], bool] | None = None
        self.devices: dict[str, AttachedDevice] = {}
        self._attaching: dict[str, list[tuple[FdRequest, OwnedFd | None]]] = {}
        self.regions: list[Region] = []
        self.memory: list[OwnedFd] = []
        self._kicks: dict[tuple[str, int], None] = {}  # by message, not yet sent, in order
        self._kicks_ready = trio.lowlevel.ParkingLot()

    def post_kick(self, device_id: str, queue: int) -> None:
        """A kick by message: kicks of one queue not yet sent are one, as in an eventfd."""
        self._kicks[device_id, queue] = None
        self._kicks_ready.unpark()

    async def _send_kicks(self) -> None:
        while True:
            if not self._kicks:
                await self._kicks_ready.park()
                continue
            device_id, queue = key = next(iter(self._kicks))
            del self._kicks[key]
            try:
                await self.peer.notify(Kick(device_id, queue))
            except ConnectionClosed:
                return

    def emit(self, event: Event) -> None:
        if self.handler is None or not self.handler(event):
            self.queue.put(event)

    # --- memory ------------------------------------------------------------------------------

    async def add_memory(
        self, size: int, *, gpa: int | None = None, hugetlb: bool = False
    ) -> tuple[Region, OwnedFd]:
        """Create guest RAM (a memfd) at ``gpa`` (default: after the last region) and tell the
        hub, which hands it to every attached device before this returns. The fd stays ours."""
        if gpa is None:
            gpa = max((r.gpa + r.size for r in self.regions), default=0)
        fd = memfd(size, f"guest-ram@{gpa:#x}", hugetlb=hugetlb)
        region = Region(gpa, size, 0)
        try:
            await self._set_table([*self.regions, region], [*self.memory, fd])
        except BaseException:
            fd.close()
            raise
        self.regions.append(region)
        self.memory.append(fd)
        return region, fd

    async def remove_memory(self, gpa: int) -> None:
        index = next((i for i, r in enumerate(self.regions) if r.gpa == gpa), None)
        if index is None:
            raise MessageError(ErrorCode.NOT_FOUND, f"no memory region at {gpa:#x}")
        regions = self.regions[:index] + self.regions[index + 1 :]
        fds = self.memory[:index] + self.memory[index + 1 :]
        await self._set_table(regions, fds)
        self.regions = regions
        self.memory.pop(index).close()

    async def _set_table(self, regions: list[Region], fds: list[OwnedFd]) -> None:
        await self.peer.call(SetMemTable(regions), [fd.fileno() for fd in fds])

    # --- devices -----------------------------------------------------------------------------

    async def attach(self, device_id: str) -> AttachedDevice:
        self._attaching[device_id] = []
        try:
            reply, kicks = await self.peer.request(Attach(device_id))
            assert isinstance(reply, Attached)
            device = AttachedDevice(self, reply.info, kicks, reply)
            self.devices[device_id] = device
            for body, fd in self._attaching.pop(device_id):
                device.apply(body, fd)
            return device
        finally:
            close_all([fd for _, fd in self._attaching.pop(device_id, []) if fd is not None])

    async def detach(self, device_id: str) -> None:
        """Hand the device back. The hub function-masks it when it takes the Detach, and
        reads its eventfds from then on: the VMM does its half of that mask first (it stops
        reading at once, as for any mask). What the hub sent before it took the Detach is
        still this VMM's, so the device stays here, its interrupts counted and emitted, until
        the reply."""
        device = self.devices[device_id]
        device.mask_function()
        try:
            await self.peer.call(Detach(device_id))
        finally:
            self.devices.pop(device_id, None)
            device.close()

    async def events(self) -> AsyncIterator[Event]:
        """Interrupts, INTx level changes and device up/down events, in arrival order."""
        while True:
            yield await self.queue.get()

    async def next_event(self) -> Event:
        return await self.queue.get()

    # --- what the hub tells us ---------------------------------------------------------------

    async def _on_request(self, peer: Peer, request: Request) -> Message:
        body = request.body
        if isinstance(body, FdRequest):
            # The hub may send these before the attach reply: they wait for the device.
            fd = (
                OwnedFd(request.fds[0].detach(), f"{request.op}-{body.device}")
                if request.fds
                else None
            )
            device = self.devices.get(body.device)
            if device is not None:
                device.apply(body, fd)
            elif body.device in self._attaching:
                self._attaching[body.device].append((body, fd))
            elif fd is not None:
                fd.close()
            return Empty()
        raise MessageError(ErrorCode.UNKNOWN_OP, f"a VMM does not serve {request.op}")

    async def _on_notice(self, peer: Peer, notice: Notice) -> None:
        body = notice.body
        if isinstance(body, Irq):
            device = self.devices.get(body.device)
            if device is not None:
                device.interrupts[body.vector] += 1
                device.notifications[body.vector] += body.count
            elif body.device not in self._attaching:  # (attaching: the reply is behind it)
                return  # sent before the device was released: not ours any more
            event = Interrupt(body.device, body.vector, body.address, body.data, body.count)
            if self.handler is None or not self.handler(event):
                self.queue.put_interrupt(event)
        elif isinstance(body, Intx):
            self.emit(IntxEvent(body.device, body.level))
        elif isinstance(body, DeviceState):
            self.emit(DeviceEvent(body.device, body.state))
        elif isinstance(body, IvshmemPeer):
            self.emit(PeerEvent(body.device, body.peer_id, body.joined))

    async def _let_go_when_disconnected(self) -> None:
        """Once the connection is gone, the hub has taken the devices back (function-masked,
        their eventfds read by the hub, then by the next VMM): stop reading and kicking them
        here, or this client would steal notifications that are no longer its own."""
        await self.peer.closed.wait()
        for device in self.devices.values():
            device.close()

    def close(self) -> None:
        for device in self.devices.values():
            device.close()
        self.devices.clear()
        close_all(self.memory)


@asynccontextmanager
async def connect(
    path: str | tuple[str, int], *, name: str = "", request_timeout: float = 10.0
) -> AsyncIterator[VmmClient]:
    """Connect to the hub at ``path`` as a VMM (a unix socket, or a (host, port) on TCP: the
    message path, see the module doc); everything is closed when the block ends."""
    transport = await (connect_unix(path) if isinstance(path, str) else connect_tcp(*path))
    async with trio.open_nursery() as nursery:
        holder: list[VmmClient] = []

        async def on_request(peer: Peer, request: Request) -> Message:
            return await holder[0]._on_request(peer, request)

        async def on_notice(peer: Peer, notice: Notice) -> None:
            await holder[0]._on_notice(peer, notice)

        async with open_peer(
            transport,
            "vmm",
            name=name or f"vmm{os.getpid()}",
            on_request=on_request,
            on_notice=on_notice,
            request_timeout=request_timeout,
        ) as peer:
            vm = VmmClient(peer, nursery)
            holder.append(vm)
            nursery.start_soon(vm._let_go_when_disconnected)
            nursery.start_soon(vm._send_kicks)
            try:
                yield vm
            finally:
                vm.close()
                nursery.cancel_scope.cancel()
