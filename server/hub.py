"""The hub: owns every device's MSI-X capability, the shared route table, the vector and kick
channels, and the memory tables; registers device daemons and VMM clients.

Concurrency rules (each a reason, not a habit):
* The MSI-X model and the route table are synchronous and pure: a state change is atomic
  because nothing is awaited in the middle of it. What needs serialising is the I/O that
  follows, the messages the hub sends a device's daemon and its VMM (fds, memory tables),
  which must reach each peer in the order the state changed. So each device has its own
  lock, held by a control operation on that device (or by the application of its route
  changes) while it tells that device's daemon and VMM. A peer that stops answering holds
  only the locks of the devices it serves, each for at most TELL_TIMEOUT (then it is
  disconnected): other devices and other VMMs go on. Before, one lock for the whole hub
  stalled every VMM's MSI-X writes behind one hung peer.
* A VMM's memory table has a lock of its own (two replacements must not interleave).
  Lock order: a VMM's memory lock, then a device's; never two devices' locks at once.
* Route changes drained from the table are queued per device, in order, and applied whole
  (shielded) by whoever holds that device's lock: the operation that caused them, or a
  background task for changes that fall to another device (a lazy eviction) or that come
  from notices. Notices (``notify``, ``set_intx``) and the hub's masked-vector readers never
  take a lock: they run synchronously against the model. (A notice handler that waited for a
  lock could deadlock: the holder may be waiting for a reply queued behind that notice.)
* A VMM that cannot take fds (on TCP) gets the message path DESIGN.md promises: the hub is
  the reader of every vector eventfd of its devices, masked or not, so each delivery is an
  ``Irq`` message (as on the direct path), and its kicks arrive as ``Kick`` notices that the
  hub writes into the kick eventfd. Masking, pending bits and counters are the model's, the
  same on both paths. What has no message form (guest memory, ivshmem BAR memory) is
  refused with ``unsupported``.
* Frames to a VMM that the hub originates (interrupts it delivers, INTx, device state) go
  through a bounded outbox (server/outbox.py) in which interrupts coalesce per vector while
  they wait, as in an eventfd: a device that notifies faster than the VMM reads costs a
  count, not a slot per notification. Only control notices can fill it; a VMM that lets it
  fill is disconnected rather than blocking us.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio
from msixhub.protocol.connection import Notice, Request
from msixhub.protocol.errors import (
    ConnectionClosed,
    ErrorCode,
    FdPassingUnsupported,
    MessageError,
    RemoteError,
)
from msixhub.protocol.fds import OwnedFd, close_all, eventfd, eventfd_write, memfd
from msixhub.protocol.messages import (
    Attached,
    BarRead,
    BarWrite,
    ClearCallFd,
    ClearIrqFd,
    DeviceInfo,
    DeviceState,
    Intx,
    Irq,
    Kick,
    MmioRead,
    MmioWrite,
    MsixControlWrite,
    Notify,
    Region,
    Registered,
    SetCallFd,
    SetIntx,
    SetIrqFd,
    SetKickFd,
    SetMemTable,
    SetMsixEnabled,
    StatusReport,
    Value,
)
from msixhub.protocol.ops import Empty
from msixhub.protocol.peer import Peer
from msixhub.protocol.schema import Message, Opaque
from msixhub.server.channels import VectorChannels
from msixhub.server.ivshmem import IvshmemHost
from msixhub.server.msix import (
    ENTRY_SIZE,
    Delivery,
    MsixCapability,
    Outcome,
    Transition,
)
from msixhub.server.outbox import CoalescedIrq, Outbox
from msixhub.server.routes import NoRouteError, RouteChange, RouteTable
from msixhub.server.status import build_report

log = logging.getLogger("msixhub.hub")

FUNCTION_MASK = 1 << 14
DEVICE_WAIT = 5.0  # how long a guest access waits for a restarting daemon
OUTBOX_SIZE = 4096
TELL_TIMEOUT = 2.0  # how long a peer may take to answer a message the hub sends it


@dataclass(eq=False)
class Vmm:
    peer: Peer
    name: str
    outbox: Outbox[tuple[Device, int]] = field(default_factory=lambda: Outbox(OUTBOX_SIZE))
    outbox_ready: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    stopped_reading: bool = False  # its outbox filled: it is being disconnected

    @property
    def by_message(self) -> bool:
        """It cannot take fds (TCP, or it said so): interrupts and kicks go by message."""
        return not _takes_fds(self.peer)

    regions: list[Region] = field(default_factory=list)
    memory: list[OwnedFd] = field(default_factory=list)
    devices: dict[str, Device] = field(default_factory=dict)
    memory_lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(eq=False)
class Device:
    info: DeviceInfo
    msix: MsixCapability
    channels: VectorChannels
    kicks: list[OwnedFd]
    inflight: OwnedFd | None
    peer: Peer | None = None
    pid: int | None = None
    up: trio.Event = field(default_factory=trio.Event)
    vmm: Vmm | None = None
    intx_level: bool = False
    registrations: int = 0
    # Serialises what the hub tells this device's daemon and VMM (see the module doc).
    lock: trio.Lock = field(default_factory=trio.Lock)
    route_changes: list[RouteChange] = field(default_factory=list)  # drained, not applied
    route_work_scheduled: bool = False

    @property
    def id(self) -> str:
        return self.info.device

    def msix_region(self, bar: int, offset: int, size: int) -> str | None:
        """'table', 'pba' or None (a device register) for a guest access."""
        layout = self.info.msix
        if bar != layout.bar:
            return None
        table_end = layout.table_offset + self.msix.num_vectors * ENTRY_SIZE
        if layout.table_offset <= offset < table_end:
            return "table"
        pba_end = layout.pba_offset + ((self.msix.num_vectors + 63) // 64) * 8
        if layout.pba_offset <= offset < pba_end:
            return "pba"
        return None


class Hub:
    def __init__(self, routes: RouteTable, nursery: trio.Nursery) -> None:
        self.routes = routes
        self._nursery = nursery
        self.devices: dict[str, Device] = {}
        self.vmms: dict[Peer, Vmm] = {}
        self._device_of: dict[Peer, Device] = {}
        self.started = trio.current_time()
        self.ivshmem = IvshmemHost(self)
        # Told (device id, daemon pid) at every registration: the supervisor's health signal.
        self.on_registered: Callable[[str, int | None], None] | None = None

    # --- connections -----------------------------------------------------------------------

    async def serve_peer(self, peer: Peer) -> None:
        """Serve one handshaken connection until it closes, then forget it."""
        role = peer.peer_hello.role
        peer.on_request = self._on_request
        peer.on_notice = self._on_notice
        if role == "vmm":
            vmm = Vmm(peer, peer.peer_hello.name or peer.log.name)
            self.vmms[peer] = vmm
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain_outbox, vmm)
                try:
                    await peer.serve()
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True):
                        await self._vmm_gone(vmm)
        else:
            try:
                await peer.serve()
            finally:
                with trio.CancelScope(shield=True):
                    await self._device_gone(peer)

    async def _drain_outbox(self, vmm: Vmm) -> None:
        """Send what the outbox holds, in order, until the connection closes. Each send is a
        checkpoint: deliveries made meanwhile merge into the slots still queued, and a mask
        meanwhile takes back those of its vectors (an Irq popped is sent: see
        ``_take_back_unsent``)."""
        outbox = vmm.outbox
        while True:
            item = outbox.pop()
            if item is None:
                await vmm.outbox_ready.park()
                continue
            if isinstance(item, CoalescedIrq):
                device, vector = item.key
                if device.vmm is not vmm:
                    # Not expected (a release takes every unsent delivery back first), but
                    # sending it would read a table that may be another guest's now.
                    continue
                item = _irq(device, vector, item.count)
            try:
                await vmm.peer.notify(item)
            except ConnectionClosed:
                return

    def _post(self, vmm: Vmm | None, message: Message) -> None:
        if vmm is None or not vmm.peer.is_open or vmm.stopped_reading:
            return
        if vmm.outbox.post(message):
            vmm.outbox_ready.unpark()
        else:
            self._stopped_reading(vmm)

    def _stopped_reading(self, vmm: Vmm) -> None:
        """Its outbox is full of control notices (interrupts never fill it)."""
        vmm.stopped_reading = True
        log.warning("VMM %s is not reading its notices; disconnecting it", vmm.name)
        self._nursery.start_soon(vmm.peer.aclose, "outbox full: VMM stopped reading")

    async def _on_request(
        self, peer: Peer, request: Request
    ) -> Message | tuple[Message, list[OwnedFd]]:
        role = peer.peer_hello.role
        handler = _HANDLERS.get((role, request.op)) or _HANDLERS.get(("any", request.op))
        if handler is None:
            raise MessageError(
                ErrorCode.UNKNOWN_OP, f"{request.op} is not an operation for a {role}"
            )
        return await handler(self, peer, request)

    async def _on_notice(self, peer: Peer, notice: Notice) -> None:
        body = notice.body
        if isinstance(body, Kick) and peer in self.vmms:
            self._kick(peer, body)
            return
        device = self._device_of.get(peer)
        if device is None:
            raise MessageError(ErrorCode.BAD_STATE, f"{notice.op} before register_device")
        if isinstance(body, Notify):
            self._check_vector(device, body.vector)
            self._handle_outcome(device, body.vector, device.msix.notify(body.vector))
            self._wake_route_worker()
        elif isinstance(body, SetIntx):
            self._set_intx(device, body.level)

    def _kick(self, peer: Peer, kick: Kick) -> None:
        """A kick by message (a VMM without kick fds): the write the VMM would have made."""
        device = self._owned_device(peer, kick.device)
        if kick.queue >= len(device.kicks):
            raise MessageError(
                ErrorCode.BAD_RANGE, f"device {kick.device!r} has {len(device.kicks)} queues"
            )
        eventfd_write(device.kicks[kick.queue].fileno())

    # --- the interrupt path (synchronous: never awaits) ------------------------------------

    def _on_counts(self, device: Device, vector: int, count: int) -> None:
        """A count read from a vector's eventfd by the hub (masked, or its VMM is on the
        message path): ``count`` notifications, taken by the model in one step."""
        self._handle_outcome(device, vector, device.msix.notify_many(vector, count), count)
        self._wake_route_worker()

    def _handle_outcome(
        self, device: Device, vector: int, outcome: Delivery | Outcome, count: int = 1
    ) -> None:
        """Act on ``count`` notifications of ``vector`` whose outcome was ``outcome`` (INTx is a
        level, and an ivshmem ring coalesces while one is on its way: raised once for all)."""
        if isinstance(outcome, Delivery):
            self._deliver(device, outcome, count)
        elif outcome is Outcome.INTX:
            if device.info.shared_memory:
                self.ivshmem.raise_intx(device, vector)  # ivshmem: IntrStatus is the daemon's
            else:
                self._set_intx(device, True)

    def _deliver(self, device: Device, delivery: Delivery, count: int = 1) -> None:
        """A delivery the hub makes (a pending bit on unmask, a count it read from an unmasked
        vector's eventfd, the direct path) goes to the VMM by message, never into the vector's
        eventfd: the hub reads that eventfd again as soon as the vector is masked, and a count
        of its own still there (the VMM's reader had not run) came back as a new notification,
        pending and delivered again -- counted twice.

        It waits in the VMM's outbox, merged with the deliveries to the same vector not yet
        sent (one ``Irq`` with their count). Accounting: each stays counted ``delivered``
        (the model counted it when it returned the Delivery), not ``coalesced``: it is handed
        to the VMM, which accounts ``count`` notifications, as it does a count read from an
        eventfd -- unlike a notification merged into a pending bit, which the VMM never sees.
        So ``sent == delivered + coalesced + dropped + intx + cleared + pending`` holds as
        before, and the VMM's sum of counts equals ``delivered`` once the outbox is sent.

        Until it is popped to be sent, the slot can be taken back (``_take_back_unsent``):
        see there for where the line between "sent" and "not sent" is drawn. The outbox never
        refuses a delivery, and a VMM that has gone or is being disconnected still gets it:
        its departure releases the device, which takes every unsent one back into pending,
        for the next VMM. (A device without a VMM is function-masked: nothing to deliver.)"""
        vmm = device.vmm
        if vmm is not None:
            vmm.outbox.post_irq((device, delivery.vector), count)
            vmm.outbox_ready.unpark()

    def _take_back_unsent(self, device: Device, vmm: Vmm, vectors: Iterable[int]) -> None:
        """``vectors`` of ``device`` were just masked: the deliveries to them still unsent in
        ``vmm``'s outbox are taken back and become pending (``MsixCapability.undeliver``),
        so the VMM never receives an interrupt for a vector masked when the hub sent it,
        and the unmask delivers it once, like any pending vector.

        Where the line is: an Irq is sent the moment the outbox's drain task pops it
        (synchronously, with the table's address and data at that moment). One popped
        before the hub applied the mask -- in the middle of being written to the socket --
        is in flight, like an MSI write the function issued before the mask took effect: it
        stays ``delivered`` and the VMM receives it although its guest has masked the vector
        locally (the VMM applies a mask at once, then tells the hub). One still in the
        outbox when the hub applies the mask has not left the function: it is taken back.
        Called synchronously with the model's transition, so nothing is popped in between."""
        outbox = vmm.outbox
        undeliver = device.msix.undeliver
        for vector in vectors:
            count = outbox.retract((device, vector))
            if count:
                undeliver(vector, count)

    def _set_intx(self, device: Device, level: bool) -> None:
        if device.intx_level != level:
            device.intx_level = level
            self._post(device.vmm, Intx(device.id, level))

    async def _apply_transition(self, device: Device, transition: Transition) -> None:
        """Hand the readers of the vectors ``transition`` changed over, and deliver what it
        delivered. Call it as soon as the model returned ``transition``: it takes back the
        masked vectors' unsent deliveries before its first checkpoint."""
        if transition.masked and device.vmm is not None:
            self._take_back_unsent(device, device.vmm, transition.masked)
        channels = device.channels
        for vector in transition.masked:
            channels.start_reading(vector)
        if not _hub_reads_all(device):
            for vector in transition.unmasked:
                channels.stop_reading(vector)
        for delivery in transition.deliveries:
            self._deliver(device, delivery)
        await self._apply_route_changes(device)

    # --- routes ----------------------------------------------------------------------------

    def _wake_route_worker(self, holder: Device | None = None) -> None:
        """Queue what the route table changed on its devices, and have each device's changes
        applied in the background (under its lock) unless they are already on their way or
        the caller holds that device's lock (``holder``: it applies them itself). Called per
        notification: when, as almost always, nothing moved, it does no more than ask."""
        if not self.routes.has_changes:
            return
        for device in self._collect_route_changes():
            if device is not holder and not device.route_work_scheduled:
                device.route_work_scheduled = True
                self._nursery.start_soon(self._route_worker, device)

    def _collect_route_changes(self) -> set[Device]:
        """The table hands changes over only by draining: keep them, in order, per device.
        Returns the devices that got some."""
        touched: set[Device] = set()
        for change in self.routes.drain_changes():
            device = self.devices.get(change.owner)
            if device is not None:  # not ours (an ivshmem QEMU peer's): nothing to open
                device.route_changes.append(change)
                touched.add(device)
        return touched

    async def _route_worker(self, device: Device) -> None:
        async with device.lock:
            device.route_work_scheduled = False
            await self._apply_route_changes(device)

    async def _apply_route_changes(self, device: Device) -> None:
        """Open or close the eventfd of every route of ``device`` acquired or released since
        the last call (the caller holds ``device.lock``). Changes that fall to other devices
        (a lazy eviction) are theirs to apply, in the background: a hung peer over there must
        not hold this operation.

        Shielded: changes drained from the table must be applied whole. The request that
        caused them is cancelled when its peer goes away (a daemon killed in the middle of
        ``unuse``), and a change dropped halfway left a channel open without its route, so
        that the vector's next ``use`` failed for good. Each message sent here is bounded by
        TELL_TIMEOUT, so the shield cannot hold us long."""
        with trio.CancelScope(shield=True):
            while True:
                self._wake_route_worker(holder=device)
                changes, device.route_changes = device.route_changes, []
                if not changes:
                    return
                for change in changes:
                    if change.acquired:
                        await self._open_channel(device, change.vector)
                    else:
                        await self._close_channel(device, change.vector)

    async def _open_channel(self, device: Device, vector: int) -> None:
        fd = device.channels.open(vector)
        await self._tell_device(device, SetCallFd(vector), [fd])
        if device.vmm is not None and not device.vmm.by_message:
            await self._tell_vmm(device.vmm, SetIrqFd(device.id, vector), [fd])
        if device.msix.is_masked(vector) or _hub_reads_all(device):
            device.channels.start_reading(vector)

    async def _close_channel(self, device: Device, vector: int) -> None:
        # Device first: once it has answered, nobody writes the eventfd any more.
        await self._tell_device(device, ClearCallFd(vector))
        device.channels.stop_reading(vector)
        if device.vmm is not None and not device.vmm.by_message:
            await self._tell_vmm(device.vmm, ClearIrqFd(device.id, vector))
        device.channels.close(vector)

    async def _tell_device(
        self, device: Device, body: Message, fds: Iterable[OwnedFd] = ()
    ) -> None:
        if device.peer is None:
            return  # it gets the whole state when it registers again
        await _tell(device.peer, f"device {device.id}", body, fds)

    async def _tell_vmm(self, vmm: Vmm, body: Message, fds: Iterable[OwnedFd] = ()) -> None:
        await _tell(vmm.peer, f"VMM {vmm.name}", body, fds)

    # --- device daemons --------------------------------------------------------------------

    async def register_device(self, peer: Peer, request: Request) -> tuple[Message, list[OwnedFd]]:
        info = request.body.info  # type: ignore[attr-defined]
        _check_layout(info)
        _check_takes_fds(peer, "a device daemon")
        if peer in self._device_of:
            raise MessageError(ErrorCode.BAD_STATE, "this connection already registered a device")
        device = self.devices.get(info.device)
        restarted = device is not None
        if device is None:
            self.ivshmem.admit(info)
            device = self._create_device(info)
        async with device.lock:
            if peer in self._device_of:
                raise MessageError(
                    ErrorCode.BAD_STATE, "this connection already registered a device"
                )
            if device.peer is not None:
                raise MessageError(
                    ErrorCode.CONFLICT, f"device {info.device!r} is already registered and running"
                )
            elif not _same_device(device.info, info):
                raise MessageError(
                    ErrorCode.CONFLICT, f"device {info.device!r} came back with a different layout"
                )
            device.peer = peer
            device.pid = _peer_pid(peer)
            device.registrations += 1
            self._device_of[peer] = device
            await self._push_device_state(device)
            await self.ivshmem.device_up(device)
            if not peer.is_open:  # hung up, or on (a tell timed out): _device_gone follows
                raise MessageError(ErrorCode.BAD_STATE, f"device {info.device!r} went away")
            device.up.set()
            self._post(device.vmm, DeviceState(device.id, "up"))
        log.info(
            "device %s (%s) %s",
            info.device,
            info.kind,
            "re-registered" if restarted else "registered",
        )
        if self.on_registered is not None:
            self.on_registered(info.device, device.pid)
        reply = Registered(restarted=restarted, has_inflight=device.inflight is not None)
        # Reply fds are closed once sent: the daemon gets a duplicate, the hub keeps its own.
        return reply, [device.inflight.dup()] if device.inflight is not None else []

    def _create_device(self, info: DeviceInfo) -> Device:
        msix = MsixCapability(info.num_vectors, self.routes, owner=info.device, has_intx=info.intx)
        holder: list[Device] = []
        channels = VectorChannels(self._nursery, lambda v, n: self._on_counts(holder[0], v, n))
        kicks = [eventfd() for _ in range(info.num_queues)]
        inflight = (
            memfd(info.inflight_size, f"inflight-{info.device}") if info.inflight_size else None
        )
        device = Device(info, msix, channels, kicks, inflight)
        holder.append(device)
        self.devices[info.device] = device
        return device

    async def _push_device_state(self, device: Device) -> None:
        """Everything a (re)started daemon needs: memory, call fds, kick fds."""
        if device.vmm is not None and device.vmm.regions:
            await self._tell_device(device, SetMemTable(device.vmm.regions), device.vmm.memory)
        for vector, fd in sorted(device.channels.fds.items()):
            await self._tell_device(device, SetCallFd(vector), [fd])
        for queue, fd in enumerate(device.kicks):
            await self._tell_device(device, SetKickFd(queue), [fd])
        if device.msix.enabled:
            await self._tell_device(device, SetMsixEnabled(True))

    async def _device_gone(self, peer: Peer) -> None:
        device = self._device_of.pop(peer, None)
        if device is None:
            return
        device.peer = None
        device.pid = None
        device.up = trio.Event()
        log.warning(
            "device %s went away (%s); its MSI-X state is kept", device.id, peer.close_reason
        )
        self._post(device.vmm, DeviceState(device.id, "down"))
        await self.ivshmem.device_down(device)

    def _device_for(self, peer: Peer) -> Device:
        device = self._device_of.get(peer)
        if device is None:
            raise MessageError(ErrorCode.BAD_STATE, "register_device first")
        return device

    @staticmethod
    def _check_vector(device: Device, vector: int) -> None:
        if vector >= device.msix.num_vectors:
            raise MessageError(
                ErrorCode.BAD_RANGE,
                f"vector {vector} is past the table of {device.msix.num_vectors}",
            )

    async def use(self, peer: Peer, request: Request) -> Message:
        device = self._device_for(peer)
        vector = request.body.vector  # type: ignore[attr-defined]
        self._check_vector(device, vector)
        async with device.lock:
            try:
                device.msix.use(vector)
            except NoRouteError as exc:
                raise MessageError(ErrorCode.NO_ROUTE, str(exc)) from None
            await self._apply_route_changes(device)
        return Empty()

    async def unuse(self, peer: Peer, request: Request) -> Message:
        device = self._device_for(peer)
        vector = request.body.vector  # type: ignore[attr-defined]
        self._check_vector(device, vector)
        async with device.lock:
            device.channels.drain(vector)
            device.msix.unuse(vector)
            await self._apply_route_changes(device)
        return Empty()

    async def deassert(self, peer: Peer, request: Request) -> Message:
        device = self._device_for(peer)
        vector = request.body.vector  # type: ignore[attr-defined]
        self._check_vector(device, vector)
        device.channels.drain(vector)  # earlier notifications become pending, then are cleared
        device.msix.deassert(vector)
        return Empty()

    # --- VMM clients -----------------------------------------------------------------------

    def _vmm_of(self, peer: Peer) -> Vmm:
        return self.vmms[peer]

    def _owned_device(self, peer: Peer, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            raise MessageError(ErrorCode.NOT_FOUND, f"no device {device_id!r}")
        if device.vmm is not self.vmms.get(peer):
            raise MessageError(
                ErrorCode.BAD_STATE, f"device {device_id!r} is not attached to this VMM"
            )
        return device

    async def attach(self, peer: Peer, request: Request) -> tuple[Message, list[OwnedFd]]:
        vmm = self._vmm_of(peer)
        device_id = request.body.device  # type: ignore[attr-defined]
        device = self.devices.get(device_id)
        if device is None:
            raise MessageError(ErrorCode.NOT_FOUND, f"no device {device_id!r}")
        if vmm.by_message and device.info.shared_memory:
            _check_takes_fds(peer, f"a VMM that attaches {device_id!r} (ivshmem BAR memory)")
        async with device.lock:
            if device.vmm is not None:
                owner = "this VMM" if device.vmm is vmm else f"VMM {device.vmm.name!r}"
                raise MessageError(
                    ErrorCode.CONFLICT, f"device {device_id!r} is attached to {owner}"
                )
            if not vmm.peer.is_open:
                raise MessageError(ErrorCode.BAD_STATE, f"VMM {vmm.name!r} is gone")
            await self.ivshmem.attach(device, vmm)  # ivshmem: join; BAR2 and doorbells to the VMM
            # Ours before the memory table is read: a set_mem_table meanwhile tells us too.
            device.vmm = vmm
            vmm.devices[device_id] = device
            for vector, fd in sorted(device.channels.fds.items()):
                if vmm.by_message:
                    device.channels.start_reading(vector)  # it is the reader from now on
                else:
                    await self._tell_vmm(vmm, SetIrqFd(device_id, vector), [fd])
            if vmm.regions:
                await self._tell_device(device, SetMemTable(vmm.regions), vmm.memory)
        # Reply fds are closed once sent: the VMM gets duplicates, the hub keeps the kicks.
        state = Attached(
            device.info, _table_image(device.msix), device.msix.control, vmm.by_message
        )
        return state, [] if vmm.by_message else [fd.dup() for fd in device.kicks]

    async def detach(self, peer: Peer, request: Request) -> Message:
        device = self._owned_device(peer, request.body.device)  # type: ignore[attr-defined]
        await self._release(device, self._vmm_of(peer))
        return Empty()

    async def _release(self, device: Device, vmm: Vmm) -> None:
        """``vmm`` lets go: mask the function (pending bits accumulate for the next VMM).

        Shielded, like the route changes it makes: a VMM that vanishes during its detach
        must not leave the device half released (its daemon holding that VMM's memory)."""
        with trio.CancelScope(shield=True):
            async with device.lock:
                if device.vmm is not vmm:
                    return  # released already (a detach and the VMM's departure)
                # Still this VMM's while the hub reads the last counts and masks the function:
                # deliveries among those counts, and every other one still unsent, go back
                # to pending (for the next VMM) instead of to nobody, counted delivered.
                device.channels.drain_all()
                transition = device.msix.write_control(device.msix.control | FUNCTION_MASK)
                self._take_back_unsent(device, vmm, transition.masked)
                vmm.devices.pop(device.id, None)
                device.vmm = None
                await self._apply_transition(device, transition)
                await self._tell_device(device, SetMemTable([]))
                await self.ivshmem.detached(device)

    async def _vmm_gone(self, vmm: Vmm) -> None:
        self.vmms.pop(vmm.peer, None)
        async with trio.open_nursery() as nursery:  # one hung daemon must not hold the rest
            for device in list(vmm.devices.values()):
                nursery.start_soon(self._release, device, vmm)
        async with vmm.memory_lock:  # a set_mem_table of its own may still be telling
            close_all(vmm.memory)

    async def set_mem_table(self, peer: Peer, request: Request) -> Message:
        vmm = self._vmm_of(peer)
        regions: list[Region] = request.body.regions  # type: ignore[attr-defined]
        _check_takes_fds(peer, "a VMM that shares guest memory")
        _check_regions(regions, request.fds)
        async with vmm.memory_lock:
            old = vmm.memory
            vmm.regions = list(regions)
            vmm.memory = [OwnedFd(fd.detach(), "guest-memory") for fd in request.fds]
            try:
                for device in list(vmm.devices.values()):
                    async with device.lock:
                        if device.vmm is vmm:  # not released meanwhile
                            await self._tell_device(device, SetMemTable(vmm.regions), vmm.memory)
            finally:  # the VMM may vanish meanwhile (we are cancelled): the old fds go anyway
                close_all(old)
        return Empty()

    async def mmio_read(self, peer: Peer, request: Request) -> Message:
        body: MmioRead = request.body  # type: ignore[assignment]
        device = self._owned_device(peer, body.device)
        _check_bar_access(device.info, body.bar, body.offset, body.size)
        region = device.msix_region(body.bar, body.offset, body.size)
        layout = device.info.msix
        if region == "table":
            return Value(device.msix.table_read(body.offset - layout.table_offset, body.size))
        if region == "pba":
            device.channels.drain_all()  # a PBA read must see counts still in the eventfds
            return Value(device.msix.pba_read(body.offset - layout.pba_offset, body.size))
        reply = await self._forward(device, BarRead(body.bar, body.offset, body.size))
        return reply

    async def mmio_write(self, peer: Peer, request: Request) -> Message:
        body: MmioWrite = request.body  # type: ignore[assignment]
        device = self._owned_device(peer, body.device)
        _check_bar_access(device.info, body.bar, body.offset, body.size)
        region = device.msix_region(body.bar, body.offset, body.size)
        layout = device.info.msix
        if region == "table":
            offset = body.offset - layout.table_offset
            async with device.lock:
                self._owned_device(peer, body.device)  # still ours, now that we hold it
                device.channels.drain(
                    offset // ENTRY_SIZE
                )  # counts become pending before an unmask
                transition = device.msix.table_write(offset, body.size, body.value)
                await self._apply_transition(device, transition)
            return Empty()
        if region == "pba":
            device.msix.pba_write(body.offset - layout.pba_offset, body.size, body.value)
            return Empty()
        if self.ivshmem.doorbell(device, body):  # a live ivshmem peer the VMM cannot ring yet
            return Empty()
        await self._forward(device, BarWrite(body.bar, body.offset, body.size, body.value))
        return Empty()

    async def _forward(self, device: Device, body: Message) -> Message:
        """A guest register access, answered by the daemon (waiting a little if it restarts)."""
        with trio.move_on_after(DEVICE_WAIT):
            await device.up.wait()
        if device.peer is None:
            raise MessageError(ErrorCode.BAD_STATE, f"device {device.id!r} has no running daemon")
        return await device.peer.call(body)

    async def msix_control_read(self, peer: Peer, request: Request) -> Message:
        device = self._owned_device(peer, request.body.device)  # type: ignore[attr-defined]
        return Value(device.msix.control)

    async def msix_control_write(self, peer: Peer, request: Request) -> Message:
        body: MsixControlWrite = request.body  # type: ignore[assignment]
        device = self._owned_device(peer, body.device)
        async with device.lock:
            self._owned_device(peer, body.device)  # still ours, now that we hold it
            was_enabled = device.msix.enabled
            device.channels.drain_all()
            await self._apply_transition(device, device.msix.write_control(body.value))
            if device.msix.enabled:
                self._set_intx(device, False)  # INTx is not used while MSI-X is enabled
            if device.msix.enabled != was_enabled:
                await self._tell_device(device, SetMsixEnabled(device.msix.enabled))
        return Empty()

    # --- status ----------------------------------------------------------------------------

    async def status(self, peer: Peer, request: Request) -> Message:
        return StatusReport(Opaque(self.report()))

    def report(self) -> dict[str, object]:
        return build_report(self) | {"ivshmem": self.ivshmem.report()}

    async def aclose(self) -> None:
        """Close every fd the hub owns (each exactly once)."""
        for device in self.devices.values():
            device.channels.close_all()
            device.msix.release()
            close_all(device.kicks)
            if device.inflight is not None:
                device.inflight.close()
        for vmm in self.vmms.values():
            close_all(vmm.memory)
        self.ivshmem.close()


def _irq(device: Device, vector: int, count: int) -> Irq:
    """``count`` coalesced deliveries to ``vector``, with the address and data the table holds
    *now*, not at the first delivery: an MSI-X function reads the entry when it sends the
    message, and this is when it is sent. (A guest reprograms an entry masked, as the spec
    requires; a message that waited meanwhile goes where the guest now says, as it would
    have from the eventfd the VMM reads with its current routing.)"""
    base = vector * ENTRY_SIZE
    address = device.msix.table_read(base, 8)
    data = device.msix.table_read(base + 8, 4)
    return Irq(device.id, vector, address, data, count)


def _table_image(msix: MsixCapability) -> bytes:
    """The MSI-X table as the guest reads it, 16 bytes per entry."""
    size = msix.num_vectors * ENTRY_SIZE
    return b"".join(
        msix.table_read(offset, 4).to_bytes(4, "little") for offset in range(0, size, 4)
    )


async def _tell(peer: Peer, who: str, body: Message, fds: Iterable[OwnedFd]) -> None:
    """Hand a peer an fd or a table while holding a device's lock: a peer that does not
    answer within TELL_TIMEOUT is hung, and is disconnected, so that it stalls that device
    once, not once per message (its departure releases what it held)."""
    try:
        await peer.call(body, [fd.fileno() for fd in fds], timeout=TELL_TIMEOUT)
    except trio.TooSlowError:
        log.warning(
            "%s did not answer %s in %g s: disconnecting it", who, type(body).__name__, TELL_TIMEOUT
        )
        await peer.aclose(f"did not answer {type(body).__name__} in time")
    except FdPassingUnsupported as exc:
        # Nothing was sent (a peer on TCP); the caller goes on without it, as after a refusal.
        log.error("refused to send %s to %s: %s", type(body).__name__, who, exc)
    except (RemoteError, ConnectionClosed, MessageError) as exc:
        # MessageError: a reply that did not decode, or more fds than the peer takes.
        log.warning("%s did not take %s: %s", who, type(body).__name__, exc)


def _takes_fds(peer: Peer) -> bool:
    connection = peer.connection
    return connection.fd_passing and connection.send_max_fds > 0


def _hub_reads_all(device: Device) -> bool:
    """The hub reads every vector eventfd of a device whose VMM takes interrupts by message."""
    return device.vmm is not None and device.vmm.by_message


def _check_takes_fds(peer: Peer, who: str) -> None:
    """Refuse, before anything changes, a peer that cannot take the fds its role needs (on
    TCP, or one that said it takes none): the hub would have nothing to hand it later."""
    if not _takes_fds(peer):
        raise FdPassingUnsupported(
            f"{who} needs fd passing (eventfds, guest memory); connect over the unix socket"
        )


def _check_layout(info: DeviceInfo) -> None:
    bars = {bar.index: bar.size for bar in info.bars}
    if len(bars) != len(info.bars):
        raise MessageError(ErrorCode.BAD_FIELD, "a BAR is listed twice")
    layout = info.msix
    if layout.bar not in bars:
        raise MessageError(ErrorCode.BAD_FIELD, f"MSI-X BAR {layout.bar} is not among the BARs")
    table = (layout.table_offset, info.num_vectors * ENTRY_SIZE)
    pba = (layout.pba_offset, ((info.num_vectors + 63) // 64) * 8)
    for what, (start, length) in (("table", table), ("PBA", pba)):
        if start % 8 or start + length > bars[layout.bar]:
            raise MessageError(
                ErrorCode.BAD_RANGE, f"MSI-X {what} does not fit BAR {layout.bar} aligned"
            )
    if table[0] < pba[0] + pba[1] and pba[0] < table[0] + table[1]:
        raise MessageError(ErrorCode.BAD_RANGE, "MSI-X table and PBA overlap")


def _check_bar_access(info: DeviceInfo, bar: int, offset: int, size: int) -> None:
    """A guest access must fall inside one of the device's BARs; no other reaches the daemon."""
    bar_size = next((b.size for b in info.bars if b.index == bar), None)
    if bar_size is None:
        raise MessageError(ErrorCode.BAD_RANGE, f"{info.device} has no BAR {bar}")
    if offset + size > bar_size:
        raise MessageError(
            ErrorCode.BAD_RANGE,
            f"{size}-byte access at {offset:#x} is past BAR {bar} ({bar_size:#x} bytes)",
        )


def _same_device(old: DeviceInfo, new: DeviceInfo) -> bool:
    return (old.kind, old.num_vectors, old.num_queues, old.msix, old.intx) == (
        new.kind,
        new.num_vectors,
        new.num_queues,
        new.msix,
        new.intx,
    ) and (old.shared_memory, old.shared_size) == (new.shared_memory, new.shared_size)


def _check_regions(regions: list[Region], fds: list[OwnedFd]) -> None:
    spans = sorted((r.gpa, r.gpa + r.size) for r in regions)
    for region, fd in zip(regions, fds, strict=True):
        if region.size == 0:
            raise MessageError(ErrorCode.BAD_RANGE, f"region at {region.gpa:#x} has size 0")
        if region.gpa + region.size > 1 << 64:
            raise MessageError(
                ErrorCode.BAD_RANGE, f"region at {region.gpa:#x} wraps the address space"
            )
        info = os.fstat(fd.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise MessageError(
                ErrorCode.BAD_FIELD, "guest memory must be a memfd or a regular file"
            )
        if region.offset + region.size > info.st_size:
            raise MessageError(
                ErrorCode.BAD_RANGE,
                f"region at {region.gpa:#x} needs {region.offset + region.size} bytes, its fd has {info.st_size}",
            )
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise MessageError(ErrorCode.BAD_RANGE, f"memory regions overlap at {start:#x}")


def _peer_pid(peer: Peer) -> int | None:
    credentials = peer.transport.peer_credentials()
    return credentials[0] if credentials else None


_HANDLERS = {
    ("device", "register_device"): Hub.register_device,
    ("device", "use"): Hub.use,
    ("device", "unuse"): Hub.unuse,
    ("device", "deassert"): Hub.deassert,
    ("vmm", "attach"): Hub.attach,
    ("vmm", "detach"): Hub.detach,
    ("vmm", "set_mem_table"): Hub.set_mem_table,
    ("vmm", "mmio_read"): Hub.mmio_read,
    ("vmm", "mmio_write"): Hub.mmio_write,
    ("vmm", "msix_control_read"): Hub.msix_control_read,
    ("vmm", "msix_control_write"): Hub.msix_control_write,
    ("any", "status"): Hub.status,
    ("any", "ping"): lambda hub, peer, request: _empty(),
}


async def _empty() -> Message:
    return Empty()
