"""The VMM outbox (server/outbox.py): interrupts coalesce per vector like an eventfd counter,
in the order of their first delivery, and only control notices can fill it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msixhub.protocol.errors import ErrorCode, MessageError
from msixhub.protocol.messages import DeviceState, Intx, Irq
from msixhub.protocol.schema import Message
from msixhub.server.hub import _irq
from msixhub.server.msix import MsixCapability
from msixhub.server.outbox import CoalescedIrq, Outbox
from msixhub.server.routes import RoutePolicy, RouteTable

Key = tuple[str, int]


def drain(outbox: Outbox[Key]) -> list[Message | tuple[Key, int]]:
    items: list[Message | tuple[Key, int]] = []
    while (item := outbox.pop()) is not None:
        items.append((item.key, item.count) if isinstance(item, CoalescedIrq) else item)
    return items


def test_deliveries_merge_into_the_slot_of_the_first_in_its_place() -> None:
    outbox: Outbox[Key] = Outbox(8)
    a, b = ("dev0", 0), ("dev0", 1)
    down = DeviceState("dev0", "down")
    outbox.post_irq(a)
    assert outbox.post(down)
    outbox.post_irq(b)
    outbox.post_irq(a)
    assert outbox.post(Intx("dev0", True))
    outbox.post_irq(a)
    assert (len(outbox), outbox.unsent(a), outbox.unsent(b)) == (4, 3, 1)
    assert drain(outbox) == [(a, 3), down, (b, 1), Intx("dev0", True)]
    assert outbox.unsent(a) == 0


def test_a_delivery_after_its_slot_was_popped_opens_a_new_slot_at_the_back() -> None:
    outbox: Outbox[Key] = Outbox(8)
    a, b = ("dev0", 0), ("dev1", 0)
    outbox.post_irq(a)
    outbox.post_irq(b)
    popped = outbox.pop()
    assert isinstance(popped, CoalescedIrq) and (popped.key, popped.count) == (a, 1)
    outbox.post_irq(a)  # the popped slot is final: being sent
    outbox.post_irq(a)
    assert popped.count == 1
    assert drain(outbox) == [(b, 1), (a, 2)]


def test_only_control_notices_fill_it_and_a_refusal_changes_nothing() -> None:
    """The limit counts notices; an interrupt is never refused (it is counted delivered
    already), and its slots are bounded by the vectors."""
    outbox: Outbox[Key] = Outbox(2)
    a, b, c = ("dev0", 0), ("dev0", 1), ("dev0", 2)
    outbox.post_irq(a)
    assert outbox.post(Intx("dev0", True))
    for _ in range(100_000):
        outbox.post_irq(a)
    assert outbox.post(DeviceState("dev0", "down"))
    assert not outbox.post(Intx("dev0", False))  # two notices wait: full
    outbox.post_irq(b)  # full of notices, and a new vector still has its slot
    assert not outbox.post(Intx("dev0", False))
    assert (len(outbox), outbox.unsent(b), outbox.unsent(c)) == (4, 1, 0)
    assert drain(outbox) == [
        (a, 100_001),
        Intx("dev0", True),
        DeviceState("dev0", "down"),
        (b, 1),
    ]
    assert outbox.post(Intx("dev0", False))  # popped notices free their room


def test_a_retracted_slot_is_never_sent() -> None:
    outbox: Outbox[Key] = Outbox(3)
    a, b = ("dev0", 0), ("dev0", 1)
    outbox.post_irq(a, 3)
    assert outbox.post(DeviceState("dev0", "down"))
    outbox.post_irq(b)
    assert outbox.retract(a) == 3
    assert (len(outbox), outbox.unsent(a), outbox.retract(a)) == (2, 0, 0)
    outbox.post_irq(a)  # a new slot, at the back
    assert drain(outbox) == [DeviceState("dev0", "down"), (b, 1), (a, 1)]
    assert len(outbox) == 0


def test_a_popped_slot_is_on_its_way_and_cannot_be_retracted() -> None:
    outbox: Outbox[Key] = Outbox(8)
    a = ("dev0", 0)
    outbox.post_irq(a, 2)
    popped = outbox.pop()
    assert outbox.retract(a) == 0
    assert isinstance(popped, CoalescedIrq) and popped.count == 2


def test_many_retractions_in_a_long_queue_keep_it_in_order_and_small() -> None:
    outbox: Outbox[int] = Outbox(10_000)
    for key in range(5000):
        outbox.post_irq(key)
    for key in range(0, 5000, 2):
        assert outbox.retract(key) == 1
    assert len(outbox) == 2500
    assert len(outbox._items) <= 5000  # compacted as husks became half of it
    keys = []
    while (item := outbox.pop()) is not None:
        assert isinstance(item, CoalescedIrq)
        keys.append(item.key)
    assert keys == list(range(1, 5000, 2))


def test_an_outbox_without_room_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one notice"):
        Outbox(0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 3),
            st.just("pop"),
            st.tuples(st.just("retract"), st.integers(0, 3)),
        ),
        max_size=60,
    )
)
def test_every_delivery_is_sent_or_retracted_exactly_once_in_first_delivery_order(
    script: list[int | str | tuple[str, int]],
) -> None:
    """Against a model: per vector, the counts sent plus the counts retracted add up to the
    deliveries posted, and the slots leave in the order a FIFO of first-unsent deliveries
    says, without the retracted ones."""
    outbox: Outbox[int] = Outbox(4096)
    posted = [0] * 4
    sent = [0] * 4
    retracted = [0] * 4
    model: list[list[int]] = []  # [vector, count] per queued slot, in order
    for step in script:
        if isinstance(step, tuple):
            vector = step[1]
            slot = next((s for s in model if s[0] == vector), None)
            expected = slot[1] if slot is not None else 0
            if slot is not None:
                model.remove(slot)
            assert outbox.retract(vector) == expected
            retracted[vector] += expected
        elif step == "pop":
            item = outbox.pop()
            if not model:
                assert item is None
                continue
            vector, count = model.pop(0)
            assert isinstance(item, CoalescedIrq) and (item.key, item.count) == (vector, count)
            sent[vector] += count
        else:
            assert isinstance(step, int)
            outbox.post_irq(step)
            posted[step] += 1
            slot = next((s for s in model if s[0] == step), None)
            if slot is None:
                model.append([step, 1])
            else:
                slot[1] += 1
        assert len(outbox) == len(model)
    while (item := outbox.pop()) is not None:
        assert isinstance(item, CoalescedIrq)
        sent[item.key] += item.count
    assert [s + r for s, r in zip(sent, retracted, strict=True)] == posted


def test_the_irq_carries_the_message_the_table_holds_when_it_is_sent() -> None:
    """An MSI-X function reads the entry when it sends: a slot that waited while the guest
    reprogrammed the entry goes with the new address and data."""
    msix = MsixCapability(2, RouteTable(RoutePolicy.DIRECT, 16), owner="dev0")
    msix.table_write(16 + 0, 8, 0x1_FEE0_1000)  # vector 1: address low and high
    msix.table_write(16 + 8, 4, 0x41)
    device = SimpleNamespace(id="dev0", msix=msix)
    assert _irq(device, 1, 7) == Irq("dev0", 1, 0x1_FEE0_1000, 0x41, 7)  # type: ignore[arg-type]
    msix.table_write(16 + 8, 4, 0x42)
    assert _irq(device, 1, 1) == Irq("dev0", 1, 0x1_FEE0_1000, 0x42)  # type: ignore[arg-type]


def test_an_irq_count_is_bounded_like_an_eventfd_counter_and_defaults_to_one() -> None:
    wire = {"device": "dev0", "vector": 1, "address": 0xFEE0_0000, "data": 0x41}
    assert Irq.from_wire(wire).count == 1  # a sender that does not coalesce
    assert Irq.from_wire(wire | {"count": 0xFFFF_FFFF_FFFF_FFFE}).count == 0xFFFF_FFFF_FFFF_FFFE
    for bad in (0, 0xFFFF_FFFF_FFFF_FFFF, -1):
        with pytest.raises(MessageError) as caught:
            Irq.from_wire(wire | {"count": bad})
        assert caught.value.code == ErrorCode.BAD_RANGE
