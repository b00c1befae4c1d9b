"""A VMM's outbox: the bounded queue of notices the hub originates for one VMM, in which
interrupts coalesce per (device, vector) while they wait, as an eventfd counter does.

Pure (no I/O, no trio): the hub posts, its drain task pops and sends.

An eventfd adds up the writes its reader has not read yet, so a device that notifies faster
than the VMM reads costs a counter, not memory. Interrupts the hub delivers by message (the
direct path, a pending vector delivered on unmask, a count the hub read) get the same: the
first delivery to a vector puts one slot in the queue, later ones before it is sent only add
to its count, and the slot is sent as one ``Irq(..., count)``. The queue thus holds at most
one interrupt per vector, and can fill only with control notices (INTx, device state): the
limit counts notices alone, and an interrupt is never refused, as an eventfd write is not
(its slots are bounded by the vectors anyway). A delivery the model has counted always has
a place to go, to be sent or taken back.

Order: a slot keeps the place of the first delivery it carries; a delivery made after the
slot was popped opens a new slot at the back.

Retraction: a slot not yet popped can be taken back whole (``retract``: the guest masked its
vector, and what has not left the hub must become pending instead). A popped slot is on its
way and cannot be. A retracted slot stays in the queue as an empty husk that ``pop`` skips
(the queue is compacted once husks are half of it), so taking a slot back costs O(1)
whatever its place in a long queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

from msixhub.protocol.schema import Message

__all__ = ["CoalescedIrq", "Outbox"]

K = TypeVar("K", bound=Hashable)


class CoalescedIrq(Generic[K]):
    """``count`` deliveries to the vector ``key`` names, not yet sent (0: retracted)."""

    __slots__ = ("count", "key")

    def __init__(self, key: K, count: int) -> None:
        self.key = key
        self.count = count

    def __repr__(self) -> str:
        return f"CoalescedIrq({self.key!r}, count={self.count})"


class Outbox(Generic[K]):
    """At most ``limit`` notices, and one :class:`CoalescedIrq` per vector."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"an outbox needs room for at least one notice, not {limit}")
        self.limit = limit
        self._items: deque[Message | CoalescedIrq[K]] = deque()
        self._unsent: dict[K, CoalescedIrq[K]] = {}
        self._notices = 0  # Messages in _items
        self._husks = 0  # retracted slots still in _items

    def __len__(self) -> int:
        """Items waiting: notices and unsent interrupt slots."""
        return len(self._items) - self._husks

    def post(self, message: Message) -> bool:
        """Queue ``message``; False (and nothing queued) when ``limit`` notices wait already."""
        if self._notices >= self.limit:
            return False
        self._items.append(message)
        self._notices += 1
        return True

    def post_irq(self, key: K, count: int = 1) -> None:
        """``count`` more deliveries to the vector ``key``: merged into its unsent slot if there
        is one, else a new slot at the back."""
        slot = self._unsent.get(key)
        if slot is not None:
            slot.count += count
            return
        slot = self._unsent[key] = CoalescedIrq(key, count)
        self._items.append(slot)

    def retract(self, key: K) -> int:
        """Take back the unsent slot of ``key``; the deliveries it carried (0: none unsent).
        What was popped already is not affected: it is on its way."""
        slot = self._unsent.pop(key, None)
        if slot is None:
            return 0
        count, slot.count = slot.count, 0
        self._husks += 1
        if self._husks > len(self._items) // 2:
            self._items = deque(item for item in self._items if not _is_husk(item))
            self._husks = 0
        return count

    def unsent(self, key: K) -> int:
        """Deliveries to ``key`` waiting to be sent."""
        slot = self._unsent.get(key)
        return slot.count if slot is not None else 0

    def pop(self) -> Message | CoalescedIrq[K] | None:
        """The oldest item, None when empty. A slot popped is final: later deliveries to its
        vector open a new one."""
        items = self._items
        while items:
            item = items.popleft()
            if isinstance(item, CoalescedIrq):
                if not item.count:
                    self._husks -= 1
                    continue
                del self._unsent[item.key]
            else:
                self._notices -= 1
            return item
        return None


def _is_husk(item: object) -> bool:
    return isinstance(item, CoalescedIrq) and not item.count
