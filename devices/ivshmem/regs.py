"""BAR0 of an ivshmem-doorbell device (PCI 1af4:1110), as a pure register model.

The layout is the one QEMU documents in docs/specs/ivshmem-spec.rst::

    offset  register     access       function
         0  IntrMask     read/write   INTx: asserted while (IntrStatus & IntrMask) != 0
         4  IntrStatus   read/write   bit 0 set when a peer rings us in INTx mode; a read clears it
         8  IVPosition   read-only    our own peer id
        12  Doorbell     write-only   bits 16..31 peer id, bits 0..15 vector: ring that peer
    16..255 reserved     reads 0, writes ignored

BAR1 (MSI-X table and PBA) belongs to the hub and BAR2 is the shared memory; neither is here.

Access rules are QEMU's (7.2, checked against a real QEMU by ``msixhub.testing.qemu_interop``):
accesses of 1, 2 or 4 naturally aligned bytes. QEMU's device sees every access as one to a
whole 32-bit register, at the offset the guest used and with the value unshifted, so: a
narrow access at a register's first byte reads the register's low bytes (a read of IntrStatus
of any width clears all of it); a narrow read that starts inside a register matches no
register and returns 0, with no side effect; a narrow write stores its value, unshifted and
zero-extended, into the register it falls in, with no read-modify-write. Wider or unaligned
accesses, or offsets outside the 256-byte BAR, are a ``RegisterAccessError`` and change
nothing (QEMU drops them).

One difference from QEMU, on purpose: the Doorbell vector is bits 0..15 as the spec says (QEMU
looks at bits 0..7 only, so its vector 0x100 rings vector 0; here it is a vector that does not
exist). A doorbell to a peer or vector that does not exist is counted and ignored, never an error:
the guest cannot know who is connected, and must not be able to hurt its own device by guessing.

INTx, the other difference: when our MSI-X is disabled a peer's ring sets IntrStatus to 1
instead of delivering a vector, and the INTx line is the level ``intx_asserted``, as QEMU's
ivshmem without MSI (``ivshmem-plain``'s registers, the legacy device with ``msi=off``) does.
QEMU's ``ivshmem-doorbell`` always has MSI-X and drops a ring that arrives while the guest has
it disabled; a guest that never enables MSI-X gets interrupts here, and no guest that does can
tell the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

BAR0_SIZE = 256
ACCESS_SIZES = (1, 2, 4)
MAX_PEER_ID = 0xFFFF


class Register(IntEnum):
    INTR_MASK = 0
    INTR_STATUS = 4
    IV_POSITION = 8
    DOORBELL = 12


class RegisterAccessError(ValueError):
    """An access BAR0 cannot take (bad size, alignment or offset); nothing changed."""


@dataclass(frozen=True, slots=True)
class Doorbell:
    """A decoded Doorbell write: ring ``vector`` of peer ``peer``."""

    peer: int
    vector: int

    @classmethod
    def decode(cls, value: int) -> Doorbell:
        return cls(peer=(value >> 16) & 0xFFFF, vector=value & 0xFFFF)

    def encode(self) -> int:
        if not (0 <= self.peer <= MAX_PEER_ID and 0 <= self.vector <= 0xFFFF):
            raise ValueError(f"doorbell out of range: peer {self.peer}, vector {self.vector}")
        return self.peer << 16 | self.vector


@dataclass(frozen=True, slots=True)
class RegisterStats:
    """Counters since creation: doorbells that rang a vector, those ignored because the peer
    or its vector does not exist, and peer rings that raised INTx."""

    doorbells_rung: int
    doorbells_no_peer: int
    doorbells_no_vector: int
    intx_raised: int


PeerVectors = Callable[[int], int]
"""How many vectors peer ``id`` has connected (0 if there is no such peer); a domain's
``vector_count``."""


class IvshmemRegisters:
    """The BAR0 state of one peer's device. ``write`` returns the ``Doorbell`` to deliver, if any:
    delivering it (an eventfd write, or the hub's pending bit) is the caller's job."""

    __slots__ = (
        "_intx_raised",
        "_no_peer",
        "_no_vector",
        "_peer_vectors",
        "_rung",
        "intr_mask",
        "intr_status",
        "peer_id",
    )

    def __init__(self, peer_id: int, peer_vectors: PeerVectors) -> None:
        if not 0 <= peer_id <= MAX_PEER_ID:
            raise ValueError(f"peer id {peer_id} outside 0..{MAX_PEER_ID}")
        self.peer_id = peer_id
        self._peer_vectors = peer_vectors
        self.intr_mask = 0
        self.intr_status = 0
        self._rung = self._no_peer = self._no_vector = self._intx_raised = 0

    @property
    def intx_asserted(self) -> bool:
        return self.intr_status & self.intr_mask != 0

    def read(self, offset: int, size: int = 4) -> int:
        self._check(offset, size)
        if offset == Register.INTR_MASK:
            value = self.intr_mask
        elif offset == Register.INTR_STATUS:
            value, self.intr_status = self.intr_status, 0
        elif offset == Register.IV_POSITION:
            value = self.peer_id
        else:  # inside a register, the write-only Doorbell, or reserved
            value = 0
        return value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, value: int, size: int = 4) -> Doorbell | None:
        self._check(offset, size)
        if not 0 <= value < 1 << (8 * size):
            raise RegisterAccessError(f"value {value:#x} does not fit in {size} bytes")
        word = value  # unshifted, whichever byte of the register the access starts at
        register = offset & ~3
        if register == Register.INTR_MASK:
            self.intr_mask = word
        elif register == Register.INTR_STATUS:
            self.intr_status = word
        elif register == Register.DOORBELL:
            return self._doorbell(Doorbell.decode(word))
        return None  # IVPosition is read-only; the rest is reserved

    def raise_intx(self) -> None:
        """A peer rang us while our MSI-X is disabled."""
        self.intr_status = 1
        self._intx_raised += 1

    def statistics(self) -> RegisterStats:
        return RegisterStats(self._rung, self._no_peer, self._no_vector, self._intx_raised)

    def _doorbell(self, doorbell: Doorbell) -> Doorbell | None:
        vectors = self._peer_vectors(doorbell.peer)
        if vectors == 0:
            self._no_peer += 1
            return None
        if doorbell.vector >= vectors:
            self._no_vector += 1
            return None
        self._rung += 1
        return doorbell

    @staticmethod
    def _check(offset: int, size: int) -> None:
        """Refuse an access QEMU would drop."""
        if size not in ACCESS_SIZES:
            raise RegisterAccessError(f"BAR0 access of {size} bytes (1, 2 or 4 only)")
        if not 0 <= offset <= BAR0_SIZE - size:
            raise RegisterAccessError(f"BAR0 offset {offset:#x}+{size} outside the 256-byte BAR")
        if offset % size:
            raise RegisterAccessError(
                f"BAR0 access of {size} bytes at unaligned offset {offset:#x}"
            )
