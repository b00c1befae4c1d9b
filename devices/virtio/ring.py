"""The device side of a split virtqueue, read and written in place in guest memory.

Byte layout (virtio 1.x 2.7, all little-endian), for a queue of ``size`` entries::

    descriptor table  16*size      {le64 addr; le32 len; le16 flags; le16 next}   align 16
    available ring    6 + 2*size   {le16 flags; le16 idx; le16 ring[size]; le16 used_event}  align 2
    used ring         6 + 8*size   {le16 flags; le16 idx; {le32 id; le32 len} ring[size];
                                    le16 avail_event}                                        align 4

The guest is not trusted. Everything that breaks the rules raises :class:`VirtqueueError`
and leaves this object's state unchanged; the transport answers by stopping the queue and
setting DEVICE_NEEDS_RESET. The rules enforced on each chain:

* the avail index moves at most ``size`` entries past the last one taken;
* head and next indices are inside their table; a head is not taken twice while in flight;
* a chain holds at most ``size`` buffers, indirect ones included (2.7.5.3.1), which also
  bounds a looping ``next``;
* INDIRECT only when negotiated, never together with NEXT, never inside an indirect table,
  and the table length a non-zero multiple of 16;
* every buffer lies in guest memory and is non-empty;
* device-readable buffers come before device-writable ones (2.7.4.2, a driver MUST).

Memory ordering. The guest side runs concurrently in another process. The ring indices
and event fields are read and written as items of ``memoryview.cast("H")`` views: one
2-byte load or store each (never ``struct.pack_into``, which zeroes its destination before
it writes the value, so the other side can read a transient 0). x86-64 keeps stores
ordered with stores and loads with loads, which the write-barrier and read-barrier points
of the algorithm need. The one reordering x86-64
allows (a load passing an earlier store) matters at the two "store then check" points:
arming avail_event then re-reading avail idx, and publishing used idx then reading
used_event. There :func:`full_barrier` is used. x86-64 is the supported host.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from msixhub.devices.guestmem import GuestMemory, GuestMemoryError
from msixhub.devices.virtio.constants import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

if TYPE_CHECKING:
    from msixhub.devices.virtio.inflight import QueueInflight

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")


class VirtqueueError(ValueError):
    """The guest broke a virtqueue rule; the queue stops and the device needs a reset."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` passed ``event_idx`` (2.7.10)."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


_fence = threading.Lock()


def full_barrier() -> None:
    """A store-load fence: an uncontended lock round trip runs a locked read-modify-write."""
    with _fence:
        pass


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where the driver put the three areas of a queue of ``size`` entries."""

    size: int
    desc: int
    avail: int
    used: int

    @property
    def desc_bytes(self) -> int:
        return 16 * self.size

    @property
    def avail_bytes(self) -> int:
        return 6 + 2 * self.size

    @property
    def used_bytes(self) -> int:
        return 6 + 8 * self.size

    def check(self) -> None:
        if not 0 < self.size <= MAX_QUEUE_SIZE or self.size & (self.size - 1):
            raise VirtqueueError(f"queue size {self.size} is not a power of two <= 32768")
        for name, address, align in (
            ("desc", self.desc, 16),
            ("avail", self.avail, 2),
            ("used", self.used, 4),
        ):
            if address % align:
                raise VirtqueueError(f"{name} ring at {address:#x} is not {align}-byte aligned")


class Chain:
    """One descriptor chain: device-readable then device-writable views of guest memory.

    The views pin their mappings; :meth:`release` (or ``with chain:``) lets them go.
    """

    __slots__ = ("head", "read_len", "readable", "writable", "write_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        read_len: int | None = None,
        write_len: int | None = None,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = sum(map(len, readable)) if read_len is None else read_len
        self.write_len = sum(map(len, writable)) if write_len is None else write_len

    def release(self) -> None:
        for view in self.readable:
            view.release()
        for view in self.writable:
            view.release()

    def __enter__(self) -> Chain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, read_len={self.read_len}, write_len={self.write_len})"


def slice_views(views: list[memoryview], start: int, stop: int) -> list[memoryview]:
    """Sub-views covering bytes ``[start, stop)`` of the concatenation of ``views``."""
    out: list[memoryview] = []
    at = 0
    for view in views:
        end = at + len(view)
        if end > start and at < stop:
            out.append(view[max(start - at, 0) : min(stop, end) - at])
        at = end
    return out


def read_views(views: list[memoryview], length: int) -> bytes:
    """A copy of the first ``length`` bytes of the concatenation of ``views`` (or fewer)."""
    parts = []
    for view in slice_views(views, 0, length):
        with view:
            parts.append(view.tobytes())
    return b"".join(parts)


def write_views(views: list[memoryview], data: bytes) -> int:
    """Copy ``data`` into the concatenation of ``views``; returns the bytes copied."""
    done = 0
    for view in slice_views(views, 0, len(data)):
        with view:
            view[:] = data[done : done + len(view)]
            done += len(view)
    return done


class SplitVirtqueue:
    """Take chains from the available ring, give them back on the used ring.

    ``last_avail_idx`` and ``used_idx`` are free-running 16-bit counters; with an
    in-flight record attached, every take and completion is logged there first so a
    restarted daemon can :meth:`recover` (see :mod:`msixhub.devices.virtio.inflight`).
    """

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool,
        indirect: bool,
        inflight: QueueInflight | None = None,
        last_avail_idx: int = 0,
        used_idx: int = 0,
        in_flight_heads: Iterable[int] = (),
    ) -> None:
        layout.check()
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self.indirect = indirect
        self._inflight = inflight
        self._last_avail = last_avail_idx & 0xFFFF
        self._shadow_avail = self._last_avail  # the driver's avail idx as last read
        self._used = used_idx & 0xFFFF
        self._signalled_used: int | None = None  # unknown: the next check notifies
        self._in_use = bytearray(self.size)
        for head in in_flight_heads:
            self._in_use[head] = 1
        self._desc, self._avail, self._used_ring = self._map_areas(memory)
        self._avail16, self._used16 = self._avail.cast("H"), self._used_ring.cast("H")

    @classmethod
    def recover(
        cls,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool,
        indirect: bool,
        inflight: QueueInflight,
    ) -> tuple[SplitVirtqueue, list[Chain]]:
        """Rebuild a queue after a crash; returns it and the chains to execute again."""
        layout.check()
        try:
            guest_used = memory.read_u16(layout.used + 2)
        except GuestMemoryError as exc:
            raise VirtqueueError(f"used ring outside guest memory: {exc}") from exc
        state = inflight.recover(guest_used)
        heads = state.heads
        if any(head >= layout.size for head in heads):
            raise VirtqueueError("in-flight record names a head past the queue size")
        ring = cls(
            memory,
            layout,
            event_idx=event_idx,
            indirect=indirect,
            inflight=inflight,
            last_avail_idx=state.used_idx + len(heads),
            used_idx=state.used_idx,
            in_flight_heads=heads,
        )
        chains: list[Chain] = []
        try:
            for head in heads:
                chains.append(ring.chain_at(head))
        except VirtqueueError:
            for chain in chains:
                chain.release()
            ring.close()
            raise
        return ring, chains

    def _map_areas(self, memory: GuestMemory) -> tuple[memoryview, memoryview, memoryview]:
        layout = self.layout
        views: list[memoryview] = []
        try:
            for address, length in (
                (layout.desc, layout.desc_bytes),
                (layout.avail, layout.avail_bytes),
                (layout.used, layout.used_bytes),
            ):
                views.append(memory.translate(address, length))
        except GuestMemoryError as exc:
            for view in views:
                view.release()
            raise VirtqueueError(f"ring outside guest memory: {exc}") from exc
        return views[0], views[1], views[2]

    def remap(self, memory: GuestMemory) -> None:
        """Follow a new memory table (chains popped before keep their own views)."""
        areas = self._map_areas(memory)
        self.close()
        self._desc, self._avail, self._used_ring = areas
        self._avail16, self._used16 = self._avail.cast("H"), self._used_ring.cast("H")
        self.memory = memory

    def close(self) -> None:
        """Release the ring views (chains already popped keep their own)."""
        for view in (self._avail16, self._used16, self._desc, self._avail, self._used_ring):
            view.release()

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @property
    def used_idx(self) -> int:
        return self._used

    @property
    def in_flight(self) -> int:
        """Chains taken and not yet pushed back."""
        return (self._last_avail - self._used) & 0xFFFF

    # -- available side ---------------------------------------------------------------

    def _refresh_avail(self) -> bool:
        """Read the driver's avail idx; whether entries are waiting."""
        idx: int = self._avail16[1]
        pending = (idx - self._last_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"avail idx {idx} is {pending} entries past {self._last_avail} (size {self.size})"
            )
        self._shadow_avail = idx
        return pending != 0

    def pop(self) -> Chain | None:
        """The next available chain, or None after arming the driver's next kick."""
        # The avail idx is read again only once the entries seen last time are taken.
        if self._shadow_avail == self._last_avail and not self._refresh_avail():
            if self.event_idx:
                self._used16[2 + 4 * self.size] = self._last_avail  # avail_event
            full_barrier()
            if not self._refresh_avail():
                return None
        head: int = self._avail16[2 + self._last_avail % self.size]
        if head >= self.size:
            raise VirtqueueError(f"avail ring names head {head} >= queue size {self.size}")
        if self._in_use[head]:
            raise VirtqueueError(f"head {head} made available again while still in flight")
        chain = self.chain_at(head)
        if self._inflight is not None:
            self._inflight.take(head)
        self._in_use[head] = 1
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        return chain

    def chain_at(self, head: int) -> Chain:
        """Walk the chain that starts at descriptor ``head``, checking every rule.

        The hot path of every request: locals instead of attribute loads, and the lengths
        summed as the buffers are taken (a buffer's views cover exactly its length)."""
        table, entries, limit = self._desc, self.size, self.size
        unpack_from, gather = DESC.unpack_from, self.memory.gather
        indirect_view: memoryview | None = None
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        read_len = write_len = 0
        index, count = head, 0
        try:
            while True:
                if index >= entries:
                    raise VirtqueueError(f"descriptor index {index} outside a table of {entries}")
                addr, length, flags, next_index = unpack_from(table, index << 4)
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if not self.indirect:
                        raise VirtqueueError(
                            "indirect descriptor but VIRTIO_F_INDIRECT_DESC not negotiated"
                        )
                    if indirect_view is not None:
                        raise VirtqueueError("indirect descriptor inside an indirect table")
                    if flags & VIRTQ_DESC_F_NEXT:
                        raise VirtqueueError("descriptor has both INDIRECT and NEXT")
                    if length == 0 or length % 16:
                        raise VirtqueueError(
                            f"indirect table length {length} is not a multiple of 16"
                        )
                    try:
                        indirect_view = table = self.memory.translate(addr, length)
                    except GuestMemoryError as exc:
                        raise VirtqueueError(f"indirect table outside guest memory: {exc}") from exc
                    entries = length >> 4
                    index = 0
                    continue
                count += 1
                if count > limit:
                    raise VirtqueueError(f"chain at head {head} is longer than {limit} (loop?)")
                if not flags & VIRTQ_DESC_F_WRITE and writable:
                    raise VirtqueueError(f"chain at head {head}: readable buffer after writable")
                try:
                    views = gather(addr, length)
                except GuestMemoryError as exc:
                    raise VirtqueueError(f"buffer outside guest memory: {exc}") from exc
                if flags & VIRTQ_DESC_F_WRITE:
                    writable += views
                    write_len += length
                else:
                    readable += views
                    read_len += length
                if not flags & VIRTQ_DESC_F_NEXT:
                    return Chain(head, readable, writable, read_len, write_len)
                index = next_index
        except VirtqueueError:
            for view in readable:
                view.release()
            for view in writable:
                view.release()
            raise
        finally:
            if indirect_view is not None:
                indirect_view.release()

    # -- used side ----------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written into its writable buffers."""
        if not 0 <= head < self.size or not self._in_use[head]:
            raise ValueError(f"head {head} is not in flight")
        if not 0 <= written <= 0xFFFFFFFF:
            raise ValueError(f"written length {written} does not fit le32")
        if self._inflight is not None:
            self._inflight.begin_put(head)
        USED_ELEM.pack_into(self._used_ring, 4 + 8 * (self._used % self.size), head, written)
        new_used = (self._used + 1) & 0xFFFF
        self._used16[1] = new_used  # the commit point the guest sees
        self._used = new_used
        self._in_use[head] = 0
        if self._inflight is not None:
            self._inflight.end_put(head, new_used)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last check."""
        old, new = self._signalled_used, self._used
        self._signalled_used = new
        if old == new:
            return False
        full_barrier()
        if self.event_idx:
            if old is None:
                return True
            used_event: int = self._avail16[2 + self.size]
            return vring_need_event(used_event, new, old)
        flags: int = self._avail16[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
