"""A VMM's outbox: the bounded queue of notices the hub originates for one VMM, in which
interrupts coalesce per (device, vector) while they wait, as an eventfd counter does.

Pure (no I/O, no trio): the hub posts, its drain task pops and sends.

An eventfd adds up the writes its reader has not read yet, so a device that notifies faster
than the VMM reads costs a counter, not memory. Interrupts the hub delivers by message (the
direct path, a pending vector delivered on unmask, a count the hub read) get the same: the
first delivery to a vector puts one slot in the queue, later ones before it is sent only add
to its count, and the slot is sent as one ``Irq(..., count)``. The queue thus holds at most
one interrupt per vector, and can fill only with control notices (INTx, device state).

Order: a slot keeps the place of the first delivery it carries; a delivery made after the
slot was popped opens a new slot at the back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

from msixhub.protocol.schema import Message

__all__ = ["CoalescedIrq", "Outbox"]

K = TypeVar("K", bound=Hashable)


class CoalescedIrq(Generic[K]):
    """``count`` deliveries to the vector ``key`` names, not yet sent."""

    __slots__ = ("count", "key")

    def __init__(self, key: K) -> None:
        self.key = key
        self.count = 1

    def __repr__(self) -> str:
        return f"CoalescedIrq({self.key!r}, count={self.count})"


class Outbox(Generic[K]):
    """At most ``limit`` items: notices, and one :class:`CoalescedIrq` per vector."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"an outbox needs room for at least one item, not {limit}")
        self.limit = limit
        self._items: deque[Message | CoalescedIrq[K]] = deque()
        self._unsent: dict[K, CoalescedIrq[K]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def post(self, message: Message) -> bool:
        """Queue ``message``; False (and nothing queued) when the outbox is full."""
        if len(self._items) >= self.limit:
            return False
        self._items.append(message)
        return True

    def post_irq(self, key: K) -> bool:
        """One more delivery to the vector ``key``: merged into its unsent slot if there is
        one, else a new slot; False (and nothing changed) when that needs room there is not."""
        slot = self._unsent.get(key)
        if slot is not None:
            slot.count += 1
            return True
        if len(self._items) >= self.limit:
            return False
        slot = self._unsent[key] = CoalescedIrq(key)
        self._items.append(slot)
        return True

    def unsent(self, key: K) -> int:
        """Deliveries to ``key`` waiting to be sent."""
        slot = self._unsent.get(key)
        return slot.count if slot is not None else 0

    def pop(self) -> Message | CoalescedIrq[K] | None:
        """The oldest item, None when empty. A slot popped is final: later deliveries to its
        vector open a new one."""
        if not self._items:
            return None
        item = self._items.popleft()
        if isinstance(item, CoalescedIrq):
            del self._unsent[item.key]
        return item
