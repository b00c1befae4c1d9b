"""The driver side of a split virtqueue, laid out in guest memory the way Linux does it.

Pure: no I/O besides guest-memory stores, no trio. :mod:`msixhub.client.virtio_driver`
programs the device registers and waits for interrupts around it.

Layout (Linux ``vring_init``): one allocation, descriptor table first, the available ring
right after it, the used ring at the next ``align`` boundary (``SMP_CACHE_BYTES`` = 64 for
virtio-pci modern). Free descriptors are linked through a private copy of the ``next``
fields (the device can write the table; our bookkeeping must not depend on it). A chain
of more than one buffer goes into an indirect table when VIRTIO_F_INDIRECT_DESC is
negotiated, as Linux does; each head owns one preallocated indirect table.

The queue keeps views of its areas (rings and indirect tables, each inside one region of
guest memory) for its life; :meth:`DriverVirtqueue.close` lets them go. Indices and event
fields shared with the device are items of ``memoryview.cast("H")`` views: one 2-byte
load or store each (see :mod:`msixhub.devices.virtio.ring`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from functools import cache
from typing import NamedTuple

from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.constants import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from msixhub.devices.virtio.ring import (
    DESC,
    USED_ELEM,
    RingLayout,
    full_barrier,
    vring_need_event,
)

Buffer = tuple[int, int]  # (guest-physical address, length)


class AllocatorExhausted(ValueError):
    """The guest RAM handed to the allocator is used up."""


class QueueFull(ValueError):
    """Not enough free descriptors for the chain."""


class DeviceMisbehaved(ValueError):
    """The device returned something impossible on the used ring."""


class GuestAllocator:
    """A bump allocator over a range of guest RAM (the toolkit never frees)."""

    def __init__(self, base: int, size: int) -> None:
        if base < 0 or size <= 0:
            raise ValueError(f"bad allocator range {base:#x}+{size:#x}")
        self._next = base
        self._end = base + size

    def alloc(self, size: int, align: int = 8) -> int:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation size={size} align={align}")
        start = -(-self._next // align) * align
        if start + size > self._end:
            raise AllocatorExhausted(f"{size} bytes aligned {align} do not fit")
        self._next = start + size
        return start


class Used(NamedTuple):
    """One harvested used-ring entry (a named tuple: one is built per request)."""

    token: object
    length: int


_DESC_BYTES = DESC.size
_NEXT_WRITE = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE


@cache
def _table_struct(count: int) -> struct.Struct:
    """``count`` descriptors packed in one call (an indirect table is written whole)."""
    return struct.Struct("<" + "QIHH" * count)


def ring_bytes(size: int, align: int) -> tuple[int, int, int]:
    """(avail offset, used offset, total bytes) of a Linux-style ring allocation."""
    avail = 16 * size
    used = -(-(avail + 6 + 2 * size) // align) * align
    return avail, used, used + 6 + 8 * size


class DriverVirtqueue:
    """One queue as a driver sees it: add chains, decide kicks, harvest used entries."""

    def __init__(
        self,
        memory: GuestMemory,
        allocator: GuestAllocator,
        size: int,
        *,
        event_idx: bool,
        indirect: bool,
        max_indirect: int = 64,
        align: int = 64,
    ) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_indirect = max_indirect
        avail, used, total = ring_bytes(size, align)
        base = allocator.alloc(total, 4096)
        memory.fill(base, total)
        self.layout = RingLayout(size, base, base + avail, base + used)
        self.layout.check()
        self._indirect_base = (
            allocator.alloc(size * max_indirect * DESC.size, 16) if indirect else 0
        )
        layout = self.layout
        self._desc = memory.translate(layout.desc, layout.desc_bytes)
        self._avail16 = memory.translate(layout.avail, layout.avail_bytes).cast("H")
        self._used = memory.translate(layout.used, layout.used_bytes)
        self._used16 = self._used.cast("H")
        self._indirect = (
            memory.translate(self._indirect_base, size * max_indirect * DESC.size)
            if indirect
            else None
        )
        self._next = [(i + 1) % size for i in range(size)]
        self._free_head = 0
        self.num_free = size
        self._tokens: list[object | None] = [None] * size
        self._chain_descs = [0] * size
        self._avail_idx = 0
        self._num_added = 0
        self._last_used = 0
        self._interrupts_off = False

    # -- submit ---------------------------------------------------------------------------

    def add(
        self,
        out: Sequence[Buffer],
        in_: Sequence[Buffer],
        token: object,
        *,
        use_indirect: bool | None = None,
        publish: bool = True,
    ) -> int:
        """Put a chain on the ring: device-readable ``out`` buffers then device-writable
        ``in_``. ``token`` (not None) comes back from :meth:`get_used`; returns the head.

        ``publish=False`` leaves the avail idx where it is, so a batch of chains becomes
        visible to the device with one store (:meth:`publish`, or :meth:`kick_prepare`)."""
        if token is None:
            raise ValueError("token must not be None")
        count = len(out) + len(in_)
        if not count:
            raise ValueError("a chain needs at least one buffer")
        if use_indirect is None:
            use_indirect = self.indirect and 1 < count <= self.max_indirect
        if use_indirect and (not self.indirect or count > self.max_indirect):
            raise ValueError(f"cannot put {count} buffers in an indirect table")
        needed = 1 if use_indirect else count
        if needed > self.num_free:
            raise QueueFull(f"{needed} descriptors wanted, {self.num_free} free")
        head = self._free_head
        if use_indirect:  # every request of a block driver: kept lean
            assert self._indirect is not None
            first = _DESC_BYTES * head * self.max_indirect  # the head's own table
            fields: list[int] = []
            number = 0
            for addr, length in out:
                number += 1
                fields += (addr, length, VIRTQ_DESC_F_NEXT, number)
            for addr, length in in_:
                number += 1
                fields += (addr, length, _NEXT_WRITE, number)
            fields[-2] &= ~VIRTQ_DESC_F_NEXT
            fields[-1] = 0
            _table_struct(count).pack_into(self._indirect, first, *fields)
            DESC.pack_into(
                self._desc,
                _DESC_BYTES * head,
                self._indirect_base + first,
                _DESC_BYTES * count,
                VIRTQ_DESC_F_INDIRECT,
                0,
            )
            self._free_head = self._next[head]
        else:
            buffers = [(addr, length, 0) for addr, length in out]
            buffers += [(addr, length, VIRTQ_DESC_F_WRITE) for addr, length in in_]
            positions = [head]
            for _ in buffers[1:]:
                positions.append(self._next[positions[-1]])
            self._write_chain(self._desc, positions, buffers)
            self._free_head = self._next[positions[-1]]
        self.num_free -= needed
        self._chain_descs[head] = needed
        self._tokens[head] = token
        avail_idx = self._avail_idx
        self._avail16[2 + avail_idx % self.size] = head
        self._avail_idx = avail_idx = (avail_idx + 1) & 0xFFFF
        self._num_added += 1
        if publish:
            self._avail16[1] = avail_idx  # ring entry before idx (x86 TSO)
        return head

    def publish(self) -> None:
        """Make every chain added so far visible to the device: one avail idx store."""
        self._avail16[1] = self._avail_idx

    @staticmethod
    def _write_chain(
        table: memoryview,
        positions: list[int],
        buffers: list[tuple[int, int, int]],
        base: int = 0,
    ) -> None:
        """Write ``buffers`` as one chain into ``table`` entries ``positions``, in order;
        ``next`` fields count from entry ``base`` (an indirect table inside the area of all).
        The device reads none of them before the chain is published."""
        last = len(buffers) - 1
        for number, (addr, length, flags) in enumerate(buffers):
            if number < last:
                flags |= VIRTQ_DESC_F_NEXT
                next_index = positions[number + 1] - base
            else:
                next_index = 0
            DESC.pack_into(table, DESC.size * positions[number], addr, length, flags, next_index)

    def kick_prepare(self) -> bool:
        """Publish what was added, and whether the device wants a notification for what was
        added since the last call."""
        self._avail16[1] = self._avail_idx
        full_barrier()
        old, new = (self._avail_idx - self._num_added) & 0xFFFF, self._avail_idx
        self._num_added = 0
        if self.event_idx:
            return vring_need_event(self._used16[2 + 4 * self.size], new, old)  # avail_event
        return not self._used16[0] & VIRTQ_USED_F_NO_NOTIFY

    # -- harvest --------------------------------------------------------------------------

    def get_used(self) -> Used | None:
        """The next used entry, or None. Validates what the device wrote."""
        used_idx: int = self._used16[1]
        if used_idx == self._last_used:
            return None
        used = self._take_used(used_idx)
        if self.event_idx and not self._interrupts_off:
            self._avail16[2 + self.size] = self._last_used  # used_event
            full_barrier()  # the next used idx load must not pass that store (Linux: store_mb)
        return used

    def harvest(self, deliver: Callable[[object, int], None]) -> int:
        """Hand every used entry waiting to ``deliver(token, length)``, as an interrupt
        handler takes them; returns how many. The used event is written once for the batch,
        then the used idx is read again (after a barrier), so an entry the device published
        before it could see the new used event is taken too, never left without an
        interrupt. Entries before one the device got wrong are delivered, then that one
        raises :class:`DeviceMisbehaved`."""
        taken = 0
        while True:
            used_idx: int = self._used16[1]
            if used_idx == self._last_used:
                return taken
            while used_idx != self._last_used:
                token, length = self._take_used(used_idx)
                taken += 1
                deliver(token, length)
            if not self.event_idx or self._interrupts_off:
                return taken
            self._avail16[2 + self.size] = self._last_used  # used_event
            full_barrier()

    def _take_used(self, used_idx: int) -> Used:
        """Take the entry at ``_last_used`` (the device says ``used_idx`` is past it)."""
        pending = (used_idx - self._last_used) & 0xFFFF
        if pending > self.size:
            raise DeviceMisbehaved(f"used idx {used_idx} is {pending} past {self._last_used}")
        head, length = USED_ELEM.unpack_from(self._used, 4 + 8 * (self._last_used % self.size))
        if head >= self.size or self._tokens[head] is None:
            raise DeviceMisbehaved(f"used ring returns head {head}, which is not in flight")
        token, self._tokens[head] = self._tokens[head], None
        tail = head
        for _ in range(self._chain_descs[head] - 1):
            tail = self._next[tail]
        self._next[tail] = self._free_head
        self._free_head = head
        self.num_free += self._chain_descs[head]
        self._last_used = (self._last_used + 1) & 0xFFFF
        return Used(token, length)

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (a hint, like Linux ``virtqueue_disable_cb``)."""
        self._interrupts_off = True
        if not self.event_idx:
            self._avail16[0] = VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Re-enable interrupts; False if used entries are already waiting (poll again)."""
        self._interrupts_off = False
        if self.event_idx:
            self._avail16[2 + self.size] = self._last_used
        else:
            self._avail16[0] = 0
        full_barrier()
        return bool(self._used16[1] == self._last_used)

    def close(self) -> None:
        """Let go of the views of the queue's areas (the queue is unusable after)."""
        views = [self._avail16, self._used16, self._desc, self._used]
        for view in [*views, *([self._indirect] if self._indirect is not None else [])]:
            view.release()
