"""Every operation of the msixhub protocol, by who sends it.

Naming follows vhost-user where the idea is the same: a *call fd* is the eventfd a device
writes to signal a vector (the hub or the VMM reads it), a *kick fd* the eventfd a VMM writes
to notify a queue (the device reads it), an *irq fd* the VMM's end of a call fd.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msixhub.protocol.ops import Empty, notice, request
from msixhub.protocol.schema import U32, U64, MaxLen, Message, Name, Opaque, Range, message

MAX_VECTORS = 2048
MAX_QUEUES = 1024
MAX_REGIONS = 32

Vector = Annotated[int, Range(0, MAX_VECTORS - 1)]
Queue = Annotated[int, Range(0, MAX_QUEUES - 1)]
DeviceId = Annotated[str, MaxLen(64)]
IrqCount = Annotated[int, Range(1, 0xFFFF_FFFF_FFFF_FFFE)]  # an eventfd counter's maximum
BarIndex = Annotated[int, Range(0, 5)]
AccessSize = Literal[1, 2, 4, 8]
Role = Literal["device", "vmm", "admin"]


@message
class Hello(Message):
    """First frame on every connection, from both sides."""

    version: U32
    role: Role
    max_frame: U32
    max_fds: Annotated[int, Range(0, 253)]
    features: Annotated[list[Name], MaxLen(64)]
    name: Name = ""


@message
class Value(Message):
    value: U64


# --- any role ------------------------------------------------------------------------------


@request("ping", reply=Empty)
@message
class Ping(Message):
    pass


@request("echo", reply="self")
@message
class Echo(Message):
    """Carries a payload back and forth (the protocol benchmark's round trip)."""

    payload: bytes


@message
class StatusReport(Message):
    report: Opaque


@request("status", reply=StatusReport)
@message
class StatusQuery(Message):
    pass


# --- guest memory --------------------------------------------------------------------------


@message
class Region(Message):
    """``size`` bytes of guest-physical memory at ``gpa``, backed by ``offset`` in one fd."""

    gpa: U64
    size: U64
    offset: U64


@request("set_mem_table", fds=lambda m: len(m.regions))
@message
class SetMemTable(Message):
    """VMM -> hub, and hub -> device: the whole memory table, one fd per region, in order."""

    regions: Annotated[list[Region], MaxLen(MAX_REGIONS)]


# --- device daemons ------------------------------------------------------------------------


@message
class Bar(Message):
    index: BarIndex
    size: U64


@message
class MsixLayout(Message):
    bar: BarIndex
    table_offset: U32
    pba_offset: U32


@message
class DeviceInfo(Message):
    device: DeviceId
    kind: Name
    num_vectors: Annotated[int, Range(1, MAX_VECTORS)]
    num_queues: Annotated[int, Range(0, MAX_QUEUES)]
    bars: Annotated[list[Bar], MaxLen(6)]
    msix: MsixLayout
    intx: bool = True
    pci_id: U32 = 0
    inflight_size: Annotated[int, Range(0, 1 << 20)] = 0
    shared_memory: Name = ""  # ivshmem: the name of the shared region this device joins
    shared_size: U64 = 0


@message
class Registered(Message):
    restarted: bool
    has_inflight: bool


@request("register_device", reply=Registered, reply_fds=lambda r: int(r.has_inflight))
@message
class RegisterDevice(Message):
    """Device -> hub. Registering an id whose daemon died is a restart: state comes back."""

    info: DeviceInfo


@request("use")
@message
class Use(Message):
    """Device -> hub: the device will signal ``vector`` (refcounted). May fail ``no-route``."""

    vector: Vector


@request("unuse")
@message
class Unuse(Message):
    vector: Vector


@request("deassert")
@message
class Deassert(Message):
    """Device -> hub: the reason for ``vector``'s interrupt is gone; clear its pending bit."""

    vector: Vector


@notice("notify")
@message
class Notify(Message):
    """Device -> hub: signal ``vector`` by message (it has no call fd, or the path is direct)."""

    vector: Vector


@notice("set_intx")
@message
class SetIntx(Message):
    """Device -> hub: the level of the device's INTx line (virtio ISR, ivshmem IntrStatus)."""

    level: bool


@request("set_call_fd", fds=1)
@message
class SetCallFd(Message):
    """Hub -> device: signal ``vector`` by writing this eventfd from now on."""

    vector: Vector


@request("clear_call_fd")
@message
class ClearCallFd(Message):
    """Hub -> device: close ``vector``'s call fd and signal it by message (route gone)."""

    vector: Vector


@request("set_msix_enabled")
@message
class SetMsixEnabled(Message):
    """Hub -> device: the guest turned MSI-X on or off. A device whose interrupts fall back to
    INTx with its own status register (virtio's ISR) must know which one the guest uses."""

    enabled: bool


@request("set_kick_fd", fds=1)
@message
class SetKickFd(Message):
    """Hub -> device: the VMM writes this eventfd to notify ``queue``."""

    queue: Queue


@request("bar_read", reply=Value)
@message
class BarRead(Message):
    """Hub -> device: a guest read of a device register (never the MSI-X table or PBA)."""

    bar: BarIndex
    offset: U64
    size: AccessSize


@request("bar_write")
@message
class BarWrite(Message):
    bar: BarIndex
    offset: U64
    size: AccessSize
    value: U64


# --- VMM clients ---------------------------------------------------------------------------


@message
class Attached(Message):
    """The device, and the MSI-X state the hub kept for it (the guest view starts from it).

    ``by_message``: the VMM cannot take fds (TCP): every interrupt comes as ``Irq``, kicks go
    as ``Kick`` notices, and the reply carries no kick fds."""

    info: DeviceInfo
    table: Annotated[bytes, MaxLen(MAX_VECTORS * 16)] = b""
    control: Annotated[int, Range(0, 0xFFFF)] = 0
    by_message: bool = False


@request("attach", reply=Attached, reply_fds=lambda r: 0 if r.by_message else r.info.num_queues)
@message
class Attach(Message):
    """VMM -> hub: take ``device``; the reply carries one kick fd per queue, in queue order
    (none when the VMM cannot take fds: see ``Attached.by_message``)."""

    device: DeviceId


@notice("kick")
@message
class Kick(Message):
    """VMM -> hub: notify ``device``'s ``queue``, for a VMM without kick fds (TCP); the hub
    writes the queue's kick eventfd, which the daemon reads as it reads any kick."""

    device: DeviceId
    queue: Queue


@request("detach")
@message
class Detach(Message):
    device: DeviceId


@request("mmio_read", reply=Value)
@message
class MmioRead(Message):
    """VMM -> hub: a guest read of one of the device's BARs (MSI-X table/PBA or register)."""

    device: DeviceId
    bar: BarIndex
    offset: U64
    size: AccessSize


@request("mmio_write")
@message
class MmioWrite(Message):
    device: DeviceId
    bar: BarIndex
    offset: U64
    size: AccessSize
    value: U64


@request("msix_control_read", reply=Value)
@message
class MsixControlRead(Message):
    """VMM -> hub: the MSI-X capability's Message Control (bit 15 enable, 14 function mask)."""

    device: DeviceId


@request("msix_control_write")
@message
class MsixControlWrite(Message):
    device: DeviceId
    value: Annotated[int, Range(0, 0xFFFF)]


@request("set_irq_fd", fds=1)
@message
class SetIrqFd(Message):
    """Hub -> VMM: read this eventfd for ``device``'s ``vector`` while the guest has it unmasked."""

    device: DeviceId
    vector: Vector


@request("clear_irq_fd")
@message
class ClearIrqFd(Message):
    """Hub -> VMM: the route is gone; deliver what the fd still holds, then close it."""

    device: DeviceId
    vector: Vector


@request("set_ioeventfd", fds=1)
@message
class SetIoeventfd(Message):
    """Hub -> VMM: a guest write of ``size`` bytes of ``datamatch`` (any value if None) to
    ``device``'s ``bar`` at ``offset`` is an eventfd write on this fd, done by the VMM without
    asking anyone (KVM's ioeventfd; a write of another width does not match). ivshmem
    doorbells ring peers this way, the hub off the path."""

    device: DeviceId
    bar: BarIndex
    offset: U64
    datamatch: U64 | None = None
    size: AccessSize = 4


@request("clear_ioeventfd")
@message
class ClearIoeventfd(Message):
    device: DeviceId
    bar: BarIndex
    offset: U64
    datamatch: U64 | None = None
    size: AccessSize = 4


@request("set_bar_memory", fds=1)
@message
class SetBarMemory(Message):
    """Hub -> VMM: ``device``'s ``bar`` is memory backed by this fd (ivshmem's shared region)."""

    device: DeviceId
    bar: BarIndex
    size: U64


@notice("irq")
@message
class Irq(Message):
    """Hub -> VMM: an interrupt the hub delivers (the direct path, a pending vector on unmask),
    as an MSI message. ``count`` notifications coalesced while it waited to be sent, as an
    eventfd counter adds up the writes its reader has not read yet."""

    device: DeviceId
    vector: Vector
    address: U64
    data: U32
    count: IrqCount = 1


@notice("intx")
@message
class Intx(Message):
    """Hub -> VMM: ``device``'s INTx line changed level."""

    device: DeviceId
    level: bool


@notice("device_state")
@message
class DeviceState(Message):
    """Hub -> VMM: ``device``'s daemon went away or came back (its MSI-X state is kept)."""

    device: DeviceId
    state: Literal["up", "down"]


# --- ivshmem -------------------------------------------------------------------------------

PeerId = Annotated[int, Range(0, 0xFFFF)]


@notice("ivshmem_position")
@message
class IvshmemPosition(Message):
    """Hub -> ivshmem device: its peer id in its domain (the IVPosition register), or -1
    while it is not a member (as QEMU's device before the server's greeting). Resets the
    device's view of the domain to itself; ``IvshmemPeer`` notices follow for the others."""

    peer_id: Annotated[int, Range(-1, 0xFFFF)]


@notice("ivshmem_peer")
@message
class IvshmemPeer(Message):
    """Hub -> VMM and ivshmem device: peer ``peer_id`` joined or left the shared-memory
    domain of ``device``. A VMM hears of a join after its doorbell ioeventfds are set."""

    device: DeviceId
    peer_id: PeerId
    joined: bool


@notice("ivshmem_intx")
@message
class IvshmemIntx(Message):
    """Hub -> ivshmem device: a peer rang ``vector`` while the device's MSI-X is disabled,
    so IntrStatus gets its bit (INTx mode)."""

    vector: Vector


__all__ = [name for name, obj in globals().items() if isinstance(obj, type)]
