"""The device-state region: what a restarted virtio daemon needs that guest memory does not hold.

The hub creates one zero-filled memfd per virtio device (size :meth:`DeviceStateRegion.size_for`)
and hands it to every incarnation of the device's daemon. Two things live there:

* the transport registers (features, status, vectors, queue addresses...), rewritten after
  every register write, so a daemon killed with SIGKILL comes back with the device as the
  driver left it, whatever its status: a driver may write registers while the status is 0
  (Linux rewrites queue_select and the vectors after its reset, in ``del_vqs``), and the
  device must go on reading them back;
* per queue, the in-flight log (the idea of vhost-user's inflight region): which descriptor
  heads were taken from the available ring and not yet returned on the used ring.

Layout (little-endian; version 1)::

    0    magic "MXDS", le16 version, le16 num_queues, le16 max_queue_size, 6 reserved
    16   transport: le64 driver_features, le16 config_msix_vector, u8 device_status,
                    u8 config_generation, le32 device_feature_select,
                    le32 driver_feature_select, le16 queue_select, u8 reset_pending,
                    9 reserved
    48   queue block q at 48 + q * (48 + 16 * max_queue_size):
         +0  le64 desc, le64 driver, le64 device, le16 size, le16 msix_vector,
             u8 enabled, u8 broken, u8 inflight_valid, u8 reserved,
         +32 le16 used_idx, le16 last_batch_head, le16 inflight_size, 10 reserved
         +48 entry[h] for each head h, 16 bytes: le64 counter, u8 inflight, 7 reserved

Write order, so that a kill between any two stores is recoverable:

* registers: a reset rewrites them all, so it sets ``reset_pending`` first and every save
  clears it last; a region where it is set (a reset cut short, or a blank region) restores
  as a reset device. Any other save changes one register, whose bytes are the only ones
  that differ.
* take(head), right after the chain at ``last_avail_idx`` was read and checked, and before
  the next one: ``counter`` then ``inflight = 1``. Takes are logged in avail order, so the
  taken heads are always exactly ``used_idx + (number of flags set)`` avail entries.
* completion: ``last_batch_head = head``; (used ring element; used ring idx, the commit the
  guest sees); ``inflight = 0``; ``used_idx = new``.

Recovery, given the used idx ``U`` read from guest memory and ``I`` = our ``used_idx``:

1. ``U == I + 1``: the kill fell between the guest-visible commit and the end of the
   completion; finish it: clear ``last_batch_head``'s flag, set ``used_idx = U``.
2. ``U == I``: consistent. A completion that did not reach the commit is still flagged
   and will be executed again, its used element rewritten (the guest never saw it).
3. anything else: the guest wrote its used idx; ours is authoritative.

Then ``last_avail_idx = used_idx + count(flags)``, and the flagged heads, in counter order
(the order they were taken), are executed again. Every request is thus completed exactly
once. Recovery only redoes idempotent stores, so a kill during recovery is recovered too.

A 2- or 8-byte field on the paths above is written with one store, as an item of a
``memoryview.cast`` view (never ``struct.pack_into``, which zeroes its destination first: a
kill between the two would leave a 0), and the flags are single bytes, so no field is ever
seen half-written. Multi-field records (the registers) are packed apart and copied in, so
their unchanged fields are never seen zeroed either.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

from msixhub.devices.virtio.constants import MAX_QUEUE_SIZE, VIRTIO_MSI_NO_VECTOR
from msixhub.protocol.fds import OwnedFd

MAGIC = b"MXDS"
VERSION = 1

_HEADER = struct.Struct("<4sHHH6x")
_TRANSPORT = struct.Struct("<QHBBIIH")
_QUEUE_REGS = struct.Struct("<QQQHHBB")  # stops before inflight_valid
_INFLIGHT_HEAD = struct.Struct("<HHH10x")
_ENTRY = struct.Struct("<QB7x")
_ENTRY_SIZE = _ENTRY.size

_TRANSPORT_AT = 16
_QUEUES_AT = 48
_QUEUE_HEADER = 48
_RESET_PENDING_AT = _TRANSPORT_AT + _TRANSPORT.size
_VALID_AT = 30  # inflight_valid inside a queue block
_USED_AT = 32
_LAST_BATCH_AT = 34


class DeviceStateError(ValueError):
    """The region is too small, or was formatted for another device shape."""


@dataclass(slots=True)
class QueueRegisters:
    """The per-queue transport registers, as the driver last wrote them."""

    size: int = 0
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enabled: bool = False
    broken: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0


@dataclass(slots=True)
class TransportState:
    """The whole-device transport registers plus one :class:`QueueRegisters` per queue."""

    driver_features: int = 0
    config_msix_vector: int = VIRTIO_MSI_NO_VECTOR
    status: int = 0
    config_generation: int = 0
    device_feature_select: int = 0
    driver_feature_select: int = 0
    queue_select: int = 0
    queues: list[QueueRegisters] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RecoveredQueue:
    """The result of :meth:`QueueInflight.recover`."""

    used_idx: int
    heads: list[int]  # in the order they were taken
    guest_used_idx_ok: bool  # False: the guest had written its used idx


class QueueInflight:
    """The in-flight log of one queue: a view on its block of the region."""

    def __init__(
        self, buffer: memoryview, u16: memoryview, u64: memoryview, offset: int, max_size: int
    ) -> None:
        self._buf = buffer
        self._u16 = u16  # the same bytes as 2- and 8-byte words, for single stores
        self._u64 = u64
        self._at = offset
        self._entries = offset + _QUEUE_HEADER
        self._last_batch_word = (offset + _LAST_BATCH_AT) // 2
        self._used_word = (offset + _USED_AT) // 2
        self._max = max_size
        self._next_counter = 1

    @property
    def valid(self) -> bool:
        return bool(self._buf[self._at + _VALID_AT])

    @property
    def size(self) -> int:
        size: int = _INFLIGHT_HEAD.unpack_from(self._buf, self._at + _USED_AT)[2]
        return size

    def start(self, size: int, used_idx: int) -> None:
        """Begin logging a queue that the driver just made live (nothing in flight)."""
        if not 0 < size <= self._max:
            raise DeviceStateError(f"queue size {size} exceeds the region's {self._max}")
        self._buf[self._at + _VALID_AT] = 0
        entries = self._at + _QUEUE_HEADER
        self._buf[entries : entries + _ENTRY.size * size] = bytes(_ENTRY.size * size)
        _INFLIGHT_HEAD.pack_into(self._buf, self._at + _USED_AT, used_idx & 0xFFFF, 0, size)
        self._next_counter = 1
        self._buf[self._at + _VALID_AT] = 1

    def invalidate(self) -> None:
        self._buf[self._at + _VALID_AT] = 0

    def _entry(self, head: int) -> int:
        return self._entries + _ENTRY_SIZE * head

    # take/begin_put/end_put run once per request: offsets precomputed, one store per field.

    def take(self, head: int) -> None:
        at = self._entries + _ENTRY_SIZE * head
        self._u64[at // 8] = self._next_counter
        self._buf[at + 8] = 1
        self._next_counter += 1

    def begin_put(self, head: int) -> None:
        self._u16[self._last_batch_word] = head

    def end_put(self, head: int, new_used_idx: int) -> None:
        self._buf[self._entries + _ENTRY_SIZE * head + 8] = 0
        self._u16[self._used_word] = new_used_idx

    def in_flight(self) -> list[int]:
        """Flagged heads in the order they were taken."""
        flagged = [
            (_ENTRY.unpack_from(self._buf, self._entry(head))[0], head)
            for head in range(self.size)
            if self._buf[self._entry(head) + 8]
        ]
        flagged.sort()
        return [head for _, head in flagged]

    def recover(self, guest_used_idx: int) -> RecoveredQueue:
        """Finish an interrupted completion and list what must be executed again."""
        if not self.valid:
            raise DeviceStateError("queue in-flight log is not valid")
        used, last_batch, size = _INFLIGHT_HEAD.unpack_from(self._buf, self._at + _USED_AT)
        if not 0 < size <= self._max:
            raise DeviceStateError(f"recorded queue size {size} is out of range")
        ok = guest_used_idx in (used, (used + 1) & 0xFFFF)
        if guest_used_idx == (used + 1) & 0xFFFF:
            if last_batch < size:
                self._buf[self._entry(last_batch) + 8] = 0
            self._u16[self._used_word] = guest_used_idx
            used = guest_used_idx
        heads = self.in_flight()
        counters = [_ENTRY.unpack_from(self._buf, self._entry(h))[0] for h in heads]
        self._next_counter = max(counters, default=0) + 1
        return RecoveredQueue(used, heads, ok)


class DeviceStateRegion:
    """Typed access to a device-state region held in a writable buffer (usually an mmap)."""

    def __init__(
        self, buffer: memoryview | mmap.mmap | bytearray, num_queues: int, max_queue_size: int
    ) -> None:
        if not 0 < num_queues <= 0xFFFF or not 0 < max_queue_size <= MAX_QUEUE_SIZE:
            raise DeviceStateError(f"bad shape: {num_queues} queues of {max_queue_size}")
        self._buf = memoryview(buffer).cast("B")
        length = len(self._buf)
        self._u16 = self._buf[: length - length % 2].cast("H")
        self._u64 = self._buf[: length - length % 8].cast("Q")
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self._block = _QUEUE_HEADER + _ENTRY.size * max_queue_size
        need = self.size_for(num_queues, max_queue_size)
        if len(self._buf) < need:
            raise DeviceStateError(f"region has {len(self._buf)} bytes, needs {need}")
        magic, version, queues, max_size = _HEADER.unpack_from(self._buf, 0)
        if magic == bytes(4):
            self._format()
        elif (magic, version, queues, max_size) != (MAGIC, VERSION, num_queues, max_queue_size):
            raise DeviceStateError(
                f"region holds {magic!r} v{version} for {queues}x{max_size}, "
                f"expected {MAGIC!r} v{VERSION} for {num_queues}x{max_queue_size}"
            )
        self._queues = [
            QueueInflight(self._buf, self._u16, self._u64, self._queue_at(q), max_queue_size)
            for q in range(num_queues)
        ]

    @staticmethod
    def size_for(num_queues: int, max_queue_size: int) -> int:
        return _QUEUES_AT + num_queues * (_QUEUE_HEADER + _ENTRY.size * max_queue_size)

    @classmethod
    def from_fd(cls, fd: OwnedFd | int, num_queues: int, max_queue_size: int) -> DeviceStateRegion:
        """Map the region the hub passed (MAP_SHARED); the fd stays the caller's."""
        number = fd if isinstance(fd, int) else fd.fileno()
        size = cls.size_for(num_queues, max_queue_size)
        try:
            mm = mmap.mmap(number, size, flags=mmap.MAP_SHARED)
        except (OSError, ValueError) as exc:
            raise DeviceStateError(f"cannot map device-state fd {number}: {exc}") from exc
        return cls(mm, num_queues, max_queue_size)

    def close(self) -> None:
        for view in (self._u16, self._u64, self._buf):
            view.release()

    def _format(self) -> None:
        _HEADER.pack_into(self._buf, 0, bytes(4), VERSION, self.num_queues, self.max_queue_size)
        self.save(TransportState(queues=[QueueRegisters() for _ in range(self.num_queues)]))
        self._buf[_RESET_PENDING_AT] = 1  # no driver wrote these: the device starts reset
        self._buf[0:4] = MAGIC  # last: a half-formatted region still reads as blank

    def _queue_at(self, q: int) -> int:
        return _QUEUES_AT + q * self._block

    def queue(self, q: int) -> QueueInflight:
        return self._queues[q]

    def load(self) -> TransportState:
        features, config_vector, status, generation, dselect, fselect, qselect = (
            _TRANSPORT.unpack_from(self._buf, _TRANSPORT_AT)
        )
        queues = []
        for q in range(self.num_queues):
            desc, driver, device, size, vector, enabled, broken = _QUEUE_REGS.unpack_from(
                self._buf, self._queue_at(q)
            )
            queues.append(
                QueueRegisters(size, vector, bool(enabled), bool(broken), desc, driver, device)
            )
        return TransportState(
            features, config_vector, status, generation, dselect, fselect, qselect, queues
        )

    @property
    def reset_pending(self) -> bool:
        """The saved registers are those of a reset cut short (or of a blank region): the
        device restores as reset, keeping only its configuration generation."""
        return bool(self._buf[_RESET_PENDING_AT])

    def save(self, state: TransportState, *, reset: bool = False) -> None:
        """Rewrite the registers. ``reset``: they all change, so :attr:`reset_pending` is
        set before the first store; every save clears it after the last."""
        if reset:
            self._buf[_RESET_PENDING_AT] = 1
        self._buf[_TRANSPORT_AT : _TRANSPORT_AT + _TRANSPORT.size] = _TRANSPORT.pack(
            state.driver_features,
            state.config_msix_vector,
            state.status,
            state.config_generation,
            state.device_feature_select,
            state.driver_feature_select,
            state.queue_select,
        )
        for q, regs in enumerate(state.queues):
            at = self._queue_at(q)
            self._buf[at : at + _QUEUE_REGS.size] = _QUEUE_REGS.pack(
                regs.desc,
                regs.driver,
                regs.device,
                regs.size,
                regs.msix_vector,
                regs.enabled,
                regs.broken,
            )
        self._buf[_RESET_PENDING_AT] = 0
