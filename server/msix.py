"""The MSI-X capability of one device: table, PBA, message control, per-vector resources.

Pure (no I/O, no trio): every guest access and device event is a method call that returns
what must happen next (a :class:`Delivery`, an :class:`Outcome`, a :class:`Transition`),
and the hub does the I/O. Semantics follow the PCI spec (6.8.2, MSI-X) and QEMU's
hw/pci/msix.c:

* a vector is *effectively masked* when its mask bit is set, the function mask is set, or
  MSI-X is disabled;
* ``notify`` on a masked vector sets its pending bit; unmasking (vector, function, or
  enable) delivers each pending vector that becomes deliverable, in vector order, and
  clears its bit;
* the device may withdraw a notification ("the reason is gone"): ``deassert`` clears the
  pending bit, and so does the last ``unuse``;
* ``notify`` on a vector nobody uses is dropped, as in QEMU; with MSI-X disabled, a device
  whose transport has INTx asserts INTx instead (virtio's fallback);
* a delivery the hub has not sent yet when its vector is masked is taken back
  (``undeliver``) and becomes pending, as if it had arrived after the mask.

Accounting: each ``notify`` lands in exactly one per-vector counter (``undeliver`` moves
some from ``delivered`` to ``coalesced``), or in the pending bit
until that bit is delivered (``delivered``) or withdrawn (``cleared``: by ``deassert``,
the last ``unuse``, ``reset`` or ``restore``), so at every moment, per vector::

    notifications sent == delivered + coalesced + dropped + intx + cleared + pending

Memory: the state lives in flat, exactly sized arrays indexed by vector (61 bytes per
vector plus a few array headers: the table in 13, the PBA in one bit, refcount and route
id in 8, five 64-bit counters in 40), not in one object per vector.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple

from msixhub.protocol.errors import ErrorCode, MessageError
from msixhub.server import msix_snapshot
from msixhub.server.msix_snapshot import MsixImage, SnapshotError
from msixhub.server.routes import NO_ROUTE, RoutePolicy, RouteTable

__all__ = [
    "CONTROL_ENABLE",
    "CONTROL_FUNCTION_MASK",
    "CONTROL_TABLE_SIZE",
    "ENTRY_SIZE",
    "MAX_VECTORS",
    "NO_TRANSITION",
    "VIRTIO_MSI_NO_VECTOR",
    "CapabilityStats",
    "Delivery",
    "MsixAccessError",
    "MsixCapability",
    "MsixStateError",
    "Outcome",
    "SnapshotError",
    "Transition",
    "VectorStats",
]

MAX_VECTORS: Final = 2048
ENTRY_SIZE: Final = 16
VIRTIO_MSI_NO_VECTOR: Final = 0xFFFF

# Message Control (PCI spec): bits 10:0 table size N-1 (read-only), 13:11 reserved.
CONTROL_ENABLE: Final = 0x8000
CONTROL_FUNCTION_MASK: Final = 0x4000
CONTROL_TABLE_SIZE: Final = 0x07FF

# Table entry layout: DWORD offsets within the 16-byte entry.
ENTRY_ADDRESS_LO: Final = 0
ENTRY_ADDRESS_HI: Final = 4
ENTRY_DATA: Final = 8
ENTRY_VECTOR_CONTROL: Final = 12

# Message Address bits 1:0 keep the address DWORD-aligned; the spec leaves writing them
# undefined and we read them as zero. Vector Control bits 31:1 are reserved (no TPH
# steering tags here) and read as zero; only the mask bit is writable.
_ADDRESS_LO_WRITABLE: Final = 0xFFFF_FFFC
_VECTOR_CONTROL_MASK_BIT: Final = 0x1
_MAX_REFCOUNT: Final = 0xFFFF_FFFF


class MsixAccessError(MessageError):
    """A bad table/PBA/control access or vector number; nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_RANGE, message)


class MsixStateError(MessageError):
    """A call that the capability's state does not allow (unbalanced unuse, use after
    release, refcount overflow); nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_STATE, message)


class Delivery(NamedTuple):
    """An MSI message to send now. ``route == -1``: the direct path (no route/eventfd)."""

    vector: int
    address: int
    data: int
    route: int


class Outcome(IntEnum):
    """What ``notify`` did when it did not produce a :class:`Delivery`."""

    DELIVERED = 0  # never returned: a Delivery is returned instead; named for statistics
    PENDING = 1  # masked: the pending bit is now set
    COALESCED = 2  # masked and already pending: merged into that pending notification
    DROPPED = 3  # nobody uses the vector
    INTX = 4  # MSI-X disabled and the transport has INTx: assert INTx instead


@dataclass(frozen=True, slots=True)
class Transition:
    """What one guest write did to the vectors' effective mask state."""

    masked: tuple[int, ...]  # vectors that became effectively masked, ascending
    unmasked: tuple[int, ...]  # vectors that became effectively unmasked, ascending
    deliveries: tuple[Delivery, ...]  # pending vectors delivered by this write, in order

    def __bool__(self) -> bool:
        return bool(self.masked or self.unmasked)


NO_TRANSITION: Final = Transition((), (), ())
"""Shared result of every write that changes no vector's effective mask state."""


@dataclass(frozen=True, slots=True)
class VectorStats:
    vector: int
    used: int  # refcount
    masked: bool  # effectively masked
    pending: bool
    address: int
    data: int
    route: int | None
    delivered: int
    coalesced: int
    dropped: int
    intx: int
    cleared: int  # pending notifications withdrawn before delivery


@dataclass(frozen=True, slots=True)
class CapabilityStats:
    num_vectors: int
    enabled: bool
    function_masked: bool
    vectors_in_use: int
    vectors_pending: int
    ignored_pba_writes: int


# Hot-path constants: module globals are cheaper to load than enum class attributes, and
# tuple.__new__ builds a NamedTuple without the Python-level __new__ frame.
_PENDING: Final = Outcome.PENDING
_COALESCED: Final = Outcome.COALESCED
_DROPPED: Final = Outcome.DROPPED
_INTX: Final = Outcome.INTX
_new_tuple = tuple.__new__


class MsixCapability:
    """One device's MSI-X capability, owning its share of the hub's route table."""

    __slots__ = (
        "_addr",
        "_all_masked",
        "_cleared",
        "_coalesced",
        "_data",
        "_delivered",
        "_dropped",
        "_enabled",
        "_function_masked",
        "_intx",
        "_intx_fallback",
        "_lazy",
        "_mask",
        "_pba",
        "_pba_writes",
        "_released",
        "_route",
        "_routes",
        "_static",
        "_used",
        "has_intx",
        "num_vectors",
        "owner",
    )

    def __init__(
        self, num_vectors: int, routes: RouteTable, *, owner: str, has_intx: bool = False
    ) -> None:
        if not _is_int(num_vectors):
            raise MsixAccessError(f"table size must be an int, not {type(num_vectors).__name__}")
        if not 1 <= num_vectors <= MAX_VECTORS:
            raise MsixAccessError(f"table size {num_vectors} is outside [1, {MAX_VECTORS}]")
        n = num_vectors
        self.num_vectors = n
        self.owner = owner
        self.has_intx = has_intx
        self._routes = routes
        self._static = routes.policy is RoutePolicy.STATIC
        self._lazy = routes.policy is RoutePolicy.LAZY
        self._route = routes.attach(owner, n)
        self._released = False
        self._addr = _zeros("Q", n)
        self._data = _zeros("I", n)
        self._mask = bytearray(b"\x01" * n)
        self._pba = bytearray(msix_snapshot.pba_size_bytes(n))
        self._used = _zeros("I", n)
        self._delivered = _zeros("Q", n)
        self._coalesced = _zeros("Q", n)
        self._dropped = _zeros("Q", n)
        self._intx = _zeros("Q", n)
        self._cleared = _zeros("Q", n)
        self._pba_writes = 0
        self._enabled = False
        self._function_masked = False
        self._all_masked = True
        self._intx_fallback = has_intx

    # -- geometry and control ------------------------------------------------------------

    @property
    def table_size_bytes(self) -> int:
        return self.num_vectors * ENTRY_SIZE

    @property
    def pba_size_bytes(self) -> int:
        return len(self._pba)

    @property
    def control(self) -> int:
        """PCI Message Control: bit 15 enable, bit 14 function mask, bits 10:0 size N-1."""
        return (
            (CONTROL_ENABLE if self._enabled else 0)
            | (CONTROL_FUNCTION_MASK if self._function_masked else 0)
            | (self.num_vectors - 1)
        )

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    def write_control(self, value: int) -> Transition:
        """A guest write of Message Control; the table-size and reserved bits are ignored."""
        if not _is_int(value) or not 0 <= value <= 0xFFFF:
            raise MsixAccessError(f"message control value {value!r} is not a 16-bit int")
        return self._set_control(bool(value & CONTROL_ENABLE), bool(value & CONTROL_FUNCTION_MASK))

    def is_masked(self, v: int) -> bool:
        """Effectively masked: mask bit, function mask, or MSI-X disabled."""
        self._check_vector(v)
        return self._all_masked or bool(self._mask[v])

    # -- MMIO ----------------------------------------------------------------------------

    def table_read(self, offset: int, size: int) -> int:
        _check_access("table", offset, size, self.table_size_bytes)
        v, word = divmod(offset, ENTRY_SIZE)
        value = self._read_word(v, word)
        if size == 8:
            value |= self._read_word(v, word + 4) << 32
        return value

    def table_write(self, offset: int, size: int, value: int) -> Transition:
        _check_write("table", offset, size, self.table_size_bytes, value)
        v, word = divmod(offset, ENTRY_SIZE)
        was_masked = self._mask[v]
        if size == 8:
            self._write_word(v, word, value & 0xFFFF_FFFF)
            self._write_word(v, word + 4, value >> 32)
        else:
            self._write_word(v, word, value)
        masked = self._mask[v]
        if masked == was_masked or self._all_masked:
            return NO_TRANSITION
        if masked:
            return Transition((v,), (), ())
        if self._pba[v >> 3] >> (v & 7) & 1:
            return Transition((), (v,), (self._deliver_pending(v),))
        return Transition((), (v,), ())

    def pba_read(self, offset: int, size: int) -> int:
        _check_access("PBA", offset, size, len(self._pba))
        return int.from_bytes(self._pba[offset : offset + size], "little")

    def pba_write(self, offset: int, size: int, value: int) -> None:
        """The PBA is read-only: a well-formed write is ignored and counted."""
        _check_write("PBA", offset, size, len(self._pba), value)
        self._pba_writes += 1

    # -- device side ---------------------------------------------------------------------

    def notify(self, v: int) -> Delivery | Outcome:
        """The device signals vector ``v``: deliver it, or say why not (the hot path)."""
        if not 0 <= v < self.num_vectors:
            raise self._bad_vector(v)
        if self._intx_fallback:
            self._intx[v] += 1
            return _INTX
        if not self._used[v]:
            self._dropped[v] += 1
            return _DROPPED
        if self._all_masked or self._mask[v]:
            pba = self._pba
            byte, bit = v >> 3, 1 << (v & 7)
            if pba[byte] & bit:
                self._coalesced[v] += 1
                return _COALESCED
            pba[byte] |= bit
            return _PENDING
        self._delivered[v] += 1
        route = self._route[v]
        if route < 0 or self._lazy:
            route = self._route_for_delivery(v, route)
        return _new_tuple(Delivery, (v, self._addr[v], self._data[v], route))

    def notify_many(self, v: int, count: int) -> Delivery | Outcome:
        """``count`` notifications of ``v`` at once (a count read from its eventfd), ending in
        exactly the state and counters of ``count`` calls of ``notify``, route statistics
        included. Returns what the first call would: the later ones follow from it (the same
        Delivery, each; COALESCED after PENDING; otherwise the same Outcome)."""
        if not 0 <= v < self.num_vectors:
            raise self._bad_vector(v)
        if not _is_int(count) or count < 1:
            raise MsixAccessError(f"notification count {count!r} is not a positive int")
        if self._intx_fallback:
            self._intx[v] += count
            return _INTX
        if not self._used[v]:
            self._dropped[v] += count
            return _DROPPED
        if self._all_masked or self._mask[v]:
            pba = self._pba
            byte, bit = v >> 3, 1 << (v & 7)
            if pba[byte] & bit:
                self._coalesced[v] += count
                return _COALESCED
            pba[byte] |= bit
            self._coalesced[v] += count - 1
            return _PENDING
        self._delivered[v] += count
        route = self._route[v]
        if route < 0 or self._lazy:
            route = self._route_for_delivery(v, route, deliveries=count)
        return _new_tuple(Delivery, (v, self._addr[v], self._data[v], route))

    def undeliver(self, v: int, count: int) -> None:
        """Take back ``count`` deliveries of ``v`` that never left the hub, now that ``v`` is
        masked (an unsent ``Irq`` the guest masked before it went out): they become ``v``'s
        pending notification, one pending and the rest coalesced into it -- what the same
        count unread in ``v``'s eventfd becomes when the hub reads it after a mask. Not
        after an MSI-X disable on a function with INTx, where that count would raise INTx:
        a message the function had queued stays an MSI-X message, pending for the enable.
        If ``v`` lost its last user meanwhile, that pending bit is withdrawn at once
        (``cleared``), as the last ``unuse`` withdraws one. Route statistics are left alone:
        they count routing decisions, and those were made.

        Refused (MsixStateError, nothing changed) while ``v`` is deliverable -- taking back
        a delivery only to deliver it again would count it twice -- or for more than its
        ``delivered``."""
        self._check_vector(v)
        if not _is_int(count) or not 1 <= count <= self._delivered[v]:
            raise MsixStateError(
                f"{self.owner} vector {v}: cannot take back {count!r} of its "
                f"{self._delivered[v]} deliveries"
            )
        if not (self._all_masked or self._mask[v]):
            raise MsixStateError(f"{self.owner} vector {v} is not masked: nothing to take back")
        self._delivered[v] -= count
        byte, bit = v >> 3, 1 << (v & 7)
        if self._pba[byte] & bit:
            self._coalesced[v] += count
            return
        self._coalesced[v] += count - 1
        if self._used[v]:
            self._pba[byte] |= bit
        else:
            self._cleared[v] += 1

    def deassert(self, v: int) -> bool:
        """The reason for ``v``'s interrupt is gone: withdraw it if pending."""
        self._check_vector(v)
        return self._clear_pending(v)

    def use(self, v: int) -> None:
        """Take a reference on ``v``; under ``static`` the first one reserves its route."""
        self._check_vector(v)
        self._check_live()
        if self._used[v] == _MAX_REFCOUNT:
            raise MsixStateError(f"{self.owner} vector {v}: use refcount would overflow")
        if self._static and not self._used[v]:
            self._routes.reserve(self.owner, [v])
        self._used[v] += 1

    def unuse(self, v: int) -> None:
        """Drop a reference on ``v``; the last one withdraws its pending bit and route."""
        self._check_vector(v)
        if not self._used[v]:
            raise MsixStateError(f"{self.owner} vector {v} is not in use")
        self._used[v] -= 1
        if not self._used[v]:
            self._forget(v)

    def use_all(self) -> None:
        """Take a reference on every vector, all or nothing (NoRouteError under static)."""
        self._check_live()
        used = self._used
        if _MAX_REFCOUNT in used:
            raise MsixStateError(f"{self.owner}: use refcount of a vector would overflow")
        if self._static:
            self._routes.reserve(self.owner, [v for v in range(self.num_vectors) if not used[v]])
        for v in range(self.num_vectors):
            used[v] += 1

    def unuse_all(self) -> None:
        """Forget every reference, as QEMU's msix_unuse_all_vectors does on device reset
        (not one reference per vector: a device that is reset holds no vectors)."""
        used = self._used
        for v in range(self.num_vectors):
            if used[v]:
                used[v] = 0
                self._forget(v)

    def release(self) -> None:
        """The device is gone for good: drop every reference and return every route."""
        if self._released:
            return
        self.unuse_all()
        self._routes.detach(self.owner)
        self._released = True

    # -- reset, statistics, snapshot -----------------------------------------------------

    def reset(self) -> Transition:
        """PCI reset: entries masked and zeroed, PBA clear, enable and function mask clear.

        Refcounts are the device model's (it calls ``unuse_all`` on its own reset, as
        virtio does); lazy routes are released because every message is now zero.
        """
        newly_masked = () if self._all_masked else self._vectors_where_mask_is(0)
        for v in self._pending_vectors():
            self._cleared[v] += 1
        n = self.num_vectors
        self._pba[:] = bytes(len(self._pba))
        self._addr[:] = _zeros("Q", n)
        self._data[:] = _zeros("I", n)
        self._mask[:] = b"\x01" * n
        self._enabled = self._function_masked = False
        self._all_masked = True
        self._intx_fallback = self.has_intx
        if self._lazy and not self._released:
            self._routes.release_all(self.owner)
        return Transition(newly_masked, (), ()) if newly_masked else NO_TRANSITION

    def vector_stats(self, v: int) -> VectorStats:
        self._check_vector(v)
        route = self._route[v]
        return VectorStats(
            vector=v,
            used=self._used[v],
            masked=self._all_masked or bool(self._mask[v]),
            pending=bool(self._pba[v >> 3] >> (v & 7) & 1),
            address=self._addr[v],
            data=self._data[v],
            route=None if route == NO_ROUTE else route,
            delivered=self._delivered[v],
            coalesced=self._coalesced[v],
            dropped=self._dropped[v],
            intx=self._intx[v],
            cleared=self._cleared[v],
        )

    def stats(self) -> CapabilityStats:
        return CapabilityStats(
            num_vectors=self.num_vectors,
            enabled=self._enabled,
            function_masked=self._function_masked,
            vectors_in_use=self.num_vectors - self._used.count(0),
            vectors_pending=sum(b.bit_count() for b in self._pba),
            ignored_pba_writes=self._pba_writes,
        )

    def snapshot(self) -> bytes:
        """Table, PBA, control and refcounts as a versioned msgpack blob."""
        return msix_snapshot.encode(
            MsixImage(
                addresses=self._addr,
                data=self._data,
                masks=bytes(self._mask),
                pba=bytes(self._pba),
                enabled=self._enabled,
                function_masked=self._function_masked,
                used=self._used,
            )
        )

    def restore(self, blob: bytes) -> Transition:
        """Load a snapshot; on any error (SnapshotError, NoRouteError) nothing changes.

        Routes are recomputed: under ``static`` the vectors in use keep or get one (all or
        nothing); under ``lazy`` this device's routes are dropped, to be taken again on
        delivery. Returns the vectors whose effective mask state changed, for the hub to
        hand their eventfd readers over; a valid image has nothing to deliver.
        """
        self._check_live()
        image = msix_snapshot.decode(blob, self.num_vectors)
        all_masked = not image.enabled or image.function_masked
        for v in _set_bits(image.pba):
            if not image.used[v]:
                raise SnapshotError(f"snapshot: vector {v} is pending but not in use")
            if not (all_masked or image.masks[v]):
                raise SnapshotError(f"snapshot: vector {v} is pending but not masked")
        if self._static:
            route = self._route
            self._routes.exchange(
                self.owner,
                release=[v for v in range(self.num_vectors) if not image.used[v] and route[v] >= 0],
                reserve=[v for v in range(self.num_vectors) if image.used[v]],
            )
        elif self._lazy:
            self._routes.release_all(self.owner)
        # Committed: nothing below can fail.
        before = self._effective_masks()
        for v in self._pending_vectors():
            if not image.pba[v >> 3] >> (v & 7) & 1:
                self._cleared[v] += 1
        self._addr[:] = image.addresses
        self._data[:] = image.data
        self._mask[:] = image.masks
        self._pba[:] = image.pba
        self._used[:] = image.used
        self._enabled, self._function_masked = image.enabled, image.function_masked
        self._all_masked = all_masked
        self._intx_fallback = not image.enabled and self.has_intx
        after = self._effective_masks()
        changed = [v for v in range(self.num_vectors) if before[v] != after[v]]
        if not changed:
            return NO_TRANSITION
        return Transition(
            tuple(v for v in changed if after[v]), tuple(v for v in changed if not after[v]), ()
        )

    # -- internals -----------------------------------------------------------------------

    def _route_for_delivery(self, v: int, route: int, protect: int = 0, deliveries: int = 1) -> int:
        """The route of a delivery that is not a plain static hit; counts direct ones.

        ``protect``: how many deliveries earlier in the same batch took a route; a lazy
        acquisition must not evict theirs, or their Delivery would name a route that
        already belongs to another vector (see RouteTable.acquire). ``deliveries``: that
        many to ``v`` in a row (``notify_many``), counted as that many single ones.
        """
        routes = self._routes
        if self._lazy and (self._addr[v] or self._data[v]):
            if route >= 0:
                routes.touch(route)
                return route
            route = routes.acquire(self.owner, v, protect=protect, attempts=deliveries)
            if route >= 0:
                return route
        routes.count_direct(deliveries)
        return NO_ROUTE

    def _deliver_pending(self, v: int, protect: int = 0) -> Delivery:
        self._pba[v >> 3] &= ~(1 << (v & 7))
        self._delivered[v] += 1
        route = self._route[v]
        if route < 0 or self._lazy:
            route = self._route_for_delivery(v, route, protect)
        return Delivery(v, self._addr[v], self._data[v], route)

    def _clear_pending(self, v: int) -> bool:
        byte, bit = v >> 3, 1 << (v & 7)
        if not self._pba[byte] & bit:
            return False
        self._pba[byte] &= ~bit
        self._cleared[v] += 1
        return True

    def _forget(self, v: int) -> None:
        """``v`` lost its last reference: withdraw its pending bit, return its route."""
        self._clear_pending(v)
        if self._route[v] != NO_ROUTE:
            self._routes.release(self.owner, v)

    def _set_control(self, enabled: bool, function_masked: bool) -> Transition:
        was_all_masked = self._all_masked
        self._enabled, self._function_masked = enabled, function_masked
        self._all_masked = not enabled or function_masked
        self._intx_fallback = not enabled and self.has_intx
        if self._all_masked == was_all_masked:
            return NO_TRANSITION
        affected = self._vectors_where_mask_is(0)
        if self._all_masked:
            return Transition(affected, (), ()) if affected else NO_TRANSITION
        if not affected:
            return NO_TRANSITION
        mask = self._mask
        deliveries: list[Delivery] = []
        routed = 0
        for v in list(self._pending_vectors()):
            if not mask[v]:
                delivery = self._deliver_pending(v, protect=routed)
                deliveries.append(delivery)
                routed += delivery.route >= 0
        return Transition((), affected, tuple(deliveries))

    def _vectors_where_mask_is(self, bit: int) -> tuple[int, ...]:
        return tuple(v for v, m in enumerate(self._mask) if m == bit)

    def _pending_vectors(self) -> Iterator[int]:
        return _set_bits(self._pba)

    def _effective_masks(self) -> bytes:
        return b"\x01" * self.num_vectors if self._all_masked else bytes(self._mask)

    def _read_word(self, v: int, word: int) -> int:
        if word == ENTRY_ADDRESS_LO:
            return self._addr[v] & 0xFFFF_FFFF
        if word == ENTRY_ADDRESS_HI:
            return self._addr[v] >> 32
        if word == ENTRY_DATA:
            return self._data[v]
        return self._mask[v]

    def _write_word(self, v: int, word: int, value: int) -> None:
        if word == ENTRY_ADDRESS_LO:
            self._addr[v] = self._addr[v] & ~0xFFFF_FFFF | value & _ADDRESS_LO_WRITABLE
        elif word == ENTRY_ADDRESS_HI:
            self._addr[v] = self._addr[v] & 0xFFFF_FFFF | value << 32
        elif word == ENTRY_DATA:
            self._data[v] = value
        else:
            self._mask[v] = value & _VECTOR_CONTROL_MASK_BIT

    def _check_vector(self, v: int) -> None:
        if not _is_int(v) or not 0 <= v < self.num_vectors:
            raise self._bad_vector(v)

    def _bad_vector(self, v: object) -> MsixAccessError:
        return MsixAccessError(
            f"{self.owner} has no vector {v!r} (its table has {self.num_vectors} entries)"
        )

    def _check_live(self) -> None:
        if self._released:
            raise MsixStateError(f"{self.owner}'s MSI-X capability has been released")

    def __repr__(self) -> str:
        return (
            f"MsixCapability({self.owner!r}, {self.num_vectors} vectors, "
            f"control={self.control:#06x}, policy={self._routes.policy})"
        )


def _check_access(region: str, offset: int, size: int, limit: int) -> None:
    """Aligned full DWORD or QWORD accesses only (PCI spec 6.8.2), inside the region."""
    if not _is_int(size) or size not in (4, 8):
        raise MsixAccessError(f"{region} access of size {size!r}: only 4 or 8 bytes are allowed")
    if not _is_int(offset):
        raise MsixAccessError(f"{region} offset {offset!r} is not an int")
    if offset % size:
        raise MsixAccessError(f"{region} {size}-byte access at {offset:#x} is misaligned")
    if not 0 <= offset <= limit - size:
        raise MsixAccessError(
            f"{region} {size}-byte access at {offset:#x} is outside its {limit} bytes"
        )


def _check_write(region: str, offset: int, size: int, limit: int, value: int) -> None:
    _check_access(region, offset, size, limit)
    if not (_is_int(value) and 0 <= value < 1 << (8 * size)):
        raise MsixAccessError(f"{region} {size}-byte write of {value!r}: not a {size}-byte value")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _zeros(typecode: str, n: int) -> array[int]:
    """An exactly sized array (building one from bytes over-allocates by ~6%)."""
    return array(typecode, [0]) * n


def _set_bits(bitmap: bytes | bytearray) -> Iterator[int]:
    """Indices of the set bits of a little-endian bitmap, ascending."""
    for index, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            yield index * 8 + low.bit_length() - 1
            byte ^= low
