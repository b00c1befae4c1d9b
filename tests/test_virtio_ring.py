"""Split virtqueue conformance: hand-built rings, the toolkit's rings, event-idx counts,
every hostile-guest case, and Hypothesis-made descriptor tables."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msixhub.client.virtqueue import DeviceMisbehaved, DriverVirtqueue, GuestAllocator, QueueFull
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.constants import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from msixhub.devices.virtio.ring import (
    RingLayout,
    SplitVirtqueue,
    VirtqueueError,
    vring_need_event,
)
from msixhub.protocol.fds import memfd

MEM = 0x10000
SIZE = 8
LAYOUT = RingLayout(SIZE, desc=0x1000, avail=0x2000, used=0x3000)
INDIRECT_TABLE = 0x4000
BUF = 0x8000
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with memfd(MEM, "ring-test") as fd, GuestMemory.from_memfd(fd, MEM) as mapped:
        yield mapped


# -- the driver's side, written byte by byte from the spec's structures ------------------


def put_desc(
    memory: GuestMemory,
    table: int,
    index: int,
    addr: int,
    length: int,
    flags: int = 0,
    next_index: int = 0,
) -> None:
    # struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
    memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, next_index))


def offer(memory: GuestMemory, *heads: int, start: int = 0) -> None:
    """Put heads in the avail ring from position ``start`` and publish avail idx."""
    for number, head in enumerate(heads):
        memory.write_u16(LAYOUT.avail + 4 + 2 * ((start + number) % SIZE), head)
    memory.write_u16(LAYOUT.avail + 2, (start + len(heads)) & 0xFFFF)


def ring(memory: GuestMemory, **kwargs: object) -> SplitVirtqueue:
    options: dict[str, object] = {"event_idx": True, "indirect": True} | kwargs
    return SplitVirtqueue(memory, LAYOUT, **options)  # type: ignore[arg-type]


def used_entries(memory: GuestMemory, count: int) -> list[tuple[int, int]]:
    raw = memory.read(LAYOUT.used + 4, 8 * count)
    return list(struct.iter_unpack("<II", raw))


# -- conformance --------------------------------------------------------------------------


def test_literal_descriptor_bytes_are_read_as_the_spec_lays_them_out(memory: GuestMemory) -> None:
    # addr 0x8000, len 0x10, flags NEXT, next 1 | addr 0x8100, len 0x20, flags WRITE, next 0
    memory.write(
        LAYOUT.desc,
        bytes.fromhex("0080000000000000100000000100010000810000000000002000000002000000"),
    )
    memory.write(0x8000, b"R" * 0x10)
    memory.write(0x8100, b"W" * 0x20)
    memory.write(LAYOUT.avail, bytes.fromhex("000001000000"))  # flags, idx 1, ring[0] = 0
    queue = ring(memory)
    chain = queue.pop()
    assert chain is not None
    assert (chain.head, chain.read_len, chain.write_len) == (0, 0x10, 0x20)
    assert bytes(chain.readable[0]) == b"R" * 0x10 and bytes(chain.writable[0]) == b"W" * 0x20
    chain.writable[0][:3] = b"out"
    queue.push(chain.head, 3)
    chain.release()
    # struct virtq_used { le16 flags; le16 idx; { le32 id; le32 len } ring[]; }
    assert memory.read(LAYOUT.used, 12) == bytes.fromhex("000001000000000003000000")
    assert memory.read(0x8100, 3) == b"out"


def test_indirect_chain(memory: GuestMemory) -> None:
    put_desc(memory, INDIRECT_TABLE, 0, BUF, 16, NEXT, 1)
    put_desc(memory, INDIRECT_TABLE, 1, BUF + 0x100, 512, NEXT | WRITE, 2)
    put_desc(memory, INDIRECT_TABLE, 2, BUF + 0x400, 1, WRITE)
    put_desc(memory, LAYOUT.desc, 5, INDIRECT_TABLE, 48, INDIRECT)
    offer(memory, 5)
    with ring(memory).pop() as chain:  # type: ignore[union-attr]
        assert (chain.head, chain.read_len, chain.write_len) == (5, 16, 513)
        assert [len(v) for v in chain.writable] == [512, 1]


def test_direct_then_indirect_in_one_chain(memory: GuestMemory) -> None:
    put_desc(memory, INDIRECT_TABLE, 0, BUF + 0x100, 8, WRITE)
    put_desc(memory, LAYOUT.desc, 0, BUF, 16, NEXT, 1)
    put_desc(memory, LAYOUT.desc, 1, INDIRECT_TABLE, 16, INDIRECT)
    offer(memory, 0)
    with ring(memory).pop() as chain:  # type: ignore[union-attr]
        assert (chain.read_len, chain.write_len) == (16, 8)


def test_indices_wrap_at_16_bits(memory: GuestMemory) -> None:
    for head in range(4):
        put_desc(memory, LAYOUT.desc, head, BUF + 0x100 * head, 8, WRITE)
    offer(memory, 0, 1, 2, 3, start=0xFFFE)
    queue = ring(memory, last_avail_idx=0xFFFE, used_idx=0xFFFE)
    heads = []
    while (chain := queue.pop()) is not None:
        heads.append(chain.head)
        queue.push(chain.head, 8)
    assert heads == [0, 1, 2, 3]
    assert (queue.last_avail_idx, queue.used_idx) == (2, 2)
    assert memory.read_u16(LAYOUT.used + 2) == 2


def test_empty_pop_arms_avail_event_or_leaves_flags(memory: GuestMemory) -> None:
    put_desc(memory, LAYOUT.desc, 0, BUF, 8, WRITE)
    offer(memory, 0, 0, start=0)
    queue = ring(memory, in_flight_heads=())
    assert queue.pop() is not None
    memory.write_u16(LAYOUT.avail + 4 + 2, 1)  # second entry: head 1 (not in flight)
    put_desc(memory, LAYOUT.desc, 1, BUF, 8, WRITE)
    assert queue.pop() is not None
    assert memory.read_u16(LAYOUT.used + 4 + 8 * SIZE) == 0  # not rearmed while busy
    assert queue.pop() is None
    assert memory.read_u16(LAYOUT.used + 4 + 8 * SIZE) == 2  # avail_event = last_avail_idx
    plain = SplitVirtqueue(memory, LAYOUT, event_idx=False, indirect=False, last_avail_idx=2)
    memory.write_u16(LAYOUT.used + 4 + 8 * SIZE, 0x5555)
    assert plain.pop() is None
    assert memory.read_u16(LAYOUT.used + 4 + 8 * SIZE) == 0x5555
    assert memory.read_u16(LAYOUT.used) == 0  # used flags untouched


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # passed exactly the event index
        (0, 2, 1, False),  # event index already behind old
        (5, 6, 0, True),
        (6, 6, 0, False),  # not yet reached
        (0xFFFF, 0, 0xFFFE, True),  # wraps
        (0xFFFF, 1, 0, False),
        (3, 3, 3, False),  # nothing new
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def _fill(memory: GuestMemory, count: int) -> SplitVirtqueue:
    for head in range(count):
        put_desc(memory, LAYOUT.desc, head, BUF + 0x100 * head, 8, WRITE)
    offer(memory, *range(count))
    return ring(memory)


def test_event_idx_suppression_counts(memory: GuestMemory) -> None:
    queue = _fill(memory, SIZE)
    chains = [queue.pop() for _ in range(SIZE)]
    used_event_at = LAYOUT.avail + 4 + 2 * SIZE
    memory.write_u16(used_event_at, 3)  # "interrupt me when used idx passes 3"
    notifications = []
    for chain in chains:
        assert chain is not None
        queue.push(chain.head, 8)
        notifications.append(queue.needs_notification())
    # the first check after construction always notifies (state unknown), then only at 4
    assert notifications == [True, False, False, True, False, False, False, False]
    assert queue.needs_notification() is False  # nothing new


def test_batched_completions_notify_once_when_event_inside_batch(memory: GuestMemory) -> None:
    queue = _fill(memory, 6)
    chains = [queue.pop() for _ in range(6)]
    queue.push(chains[0].head, 8)  # type: ignore[union-attr]
    assert queue.needs_notification()
    memory.write_u16(LAYOUT.avail + 4 + 2 * SIZE, 2)
    for chain in chains[1:]:
        queue.push(chain.head, 8)  # type: ignore[union-attr]
    assert queue.needs_notification() is True  # 1 -> 6 passed used_event 2
    memory.write_u16(LAYOUT.avail + 4 + 2 * SIZE, 1)  # stale
    assert queue.needs_notification() is False


def test_no_interrupt_flag_without_event_idx(memory: GuestMemory) -> None:
    for head in range(2):
        put_desc(memory, LAYOUT.desc, head, BUF, 8, WRITE)
    offer(memory, 0, 1)
    queue = ring(memory, event_idx=False)
    first, second = queue.pop(), queue.pop()
    queue.push(first.head, 8)  # type: ignore[union-attr]
    assert queue.needs_notification()
    memory.write_u16(LAYOUT.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)
    queue.push(second.head, 8)  # type: ignore[union-attr]
    assert not queue.needs_notification()


def test_push_refuses_what_is_not_in_flight(memory: GuestMemory) -> None:
    queue = _fill(memory, 1)
    with pytest.raises(ValueError, match="not in flight"):
        queue.push(0, 1)
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(ValueError, match="le32"):
        queue.push(0, 1 << 32)
    queue.push(0, 1)
    with pytest.raises(ValueError, match="not in flight"):
        queue.push(0, 1)


# -- hostile guests -------------------------------------------------------------------------


def _hostile_cases() -> dict[str, tuple[dict[str, bool], list[tuple[int, ...]], list[int], str]]:
    """name -> (ring options, descriptors (table, index, addr, len, flags, next), heads, error)"""
    main, ind = LAYOUT.desc, INDIRECT_TABLE
    return {
        "addr outside memory": (
            {},
            [(main, 0, MEM + 0x1000, 8, 0, 0)],
            [0],
            "outside guest memory",
        ),
        "len past memory end": ({}, [(main, 0, MEM - 4, 8, 0, 0)], [0], "outside guest memory"),
        "addr wraps 2**64": ({}, [(main, 0, (1 << 64) - 4, 8, 0, 0)], [0], "outside guest"),
        "zero length": ({}, [(main, 0, BUF, 0, 0, 0)], [0], "outside guest memory"),
        "head past size": ({}, [], [SIZE], "head 8 >= queue size"),
        "next past size": ({}, [(main, 0, BUF, 8, NEXT, SIZE)], [0], "outside a table"),
        "loop": ({}, [(main, 0, BUF, 8, NEXT, 1), (main, 1, BUF, 8, NEXT, 0)], [0], "loop"),
        "longer than size": (
            {},
            [(main, 0, ind, 16 * (SIZE + 1), INDIRECT, 0)]
            + [(ind, i, BUF, 8, NEXT, i + 1) for i in range(SIZE)]
            + [(ind, SIZE, BUF, 8, 0, 0)],
            [0],
            "longer than 8",
        ),
        "indirect loop": (
            {},
            [(main, 0, ind, 32, INDIRECT, 0), (ind, 0, BUF, 8, NEXT, 1), (ind, 1, BUF, 8, NEXT, 0)],
            [0],
            "longer than",
        ),
        "indirect in indirect": (
            {},
            [(main, 0, ind, 16, INDIRECT, 0), (ind, 0, ind, 16, INDIRECT, 0)],
            [0],
            "inside an indirect table",
        ),
        "indirect not negotiated": (
            {"indirect": False},
            [(main, 0, ind, 16, INDIRECT, 0)],
            [0],
            "not negotiated",
        ),
        "indirect with next": (
            {},
            [(main, 0, ind, 16, INDIRECT | NEXT, 1)],
            [0],
            "both INDIRECT and NEXT",
        ),
        "indirect len not 16k": ({}, [(main, 0, ind, 24, INDIRECT, 0)], [0], "multiple of 16"),
        "indirect len zero": ({}, [(main, 0, ind, 0, INDIRECT, 0)], [0], "multiple of 16"),
        "indirect table outside": (
            {},
            [(main, 0, MEM - 8, 16, INDIRECT, 0)],
            [0],
            "table outside guest memory",
        ),
        "indirect next past table": (
            {},
            [(main, 0, ind, 16, INDIRECT, 0), (ind, 0, BUF, 8, NEXT, 1)],
            [0],
            "outside a table",
        ),
        "write before read": (
            {},
            [(main, 0, BUF, 8, WRITE | NEXT, 1), (main, 1, BUF, 8, 0, 0)],
            [0],
            "readable buffer after",
        ),
    }


@pytest.mark.parametrize("case", sorted(_hostile_cases()))
def test_hostile_chain_is_refused_and_state_unchanged(memory: GuestMemory, case: str) -> None:
    options, descs, heads, error = _hostile_cases()[case]
    for table, index, addr, length, flags, next_index in descs:
        put_desc(memory, table, index, addr, length, flags, next_index)
    offer(memory, *heads)
    queue = ring(memory, **options)
    with pytest.raises(VirtqueueError, match=error):
        queue.pop()
    assert (queue.last_avail_idx, queue.in_flight) == (0, 0)
    with pytest.raises(VirtqueueError, match=error):
        queue.pop()  # still refused: nothing moved


def test_avail_idx_jumping_more_than_size(memory: GuestMemory) -> None:
    memory.write_u16(LAYOUT.avail + 2, SIZE + 1)
    with pytest.raises(VirtqueueError, match="9 entries past 0"):
        ring(memory).pop()


def test_head_offered_twice_while_in_flight(memory: GuestMemory) -> None:
    put_desc(memory, LAYOUT.desc, 3, BUF, 8, WRITE)
    offer(memory, 3, 3)
    queue = ring(memory)
    assert queue.pop() is not None
    with pytest.raises(VirtqueueError, match="still in flight"):
        queue.pop()
    assert queue.last_avail_idx == 1


@pytest.mark.parametrize(
    ("layout", "error"),
    [
        (RingLayout(6, 0x1000, 0x2000, 0x3000), "power of two"),
        (RingLayout(0, 0x1000, 0x2000, 0x3000), "power of two"),
        (RingLayout(65536, 0x1000, 0x2000, 0x3000), "power of two"),
        (RingLayout(8, 0x1008, 0x2000, 0x3000), "desc ring .* not 16-byte"),
        (RingLayout(8, 0x1000, 0x2001, 0x3000), "avail ring .* not 2-byte"),
        (RingLayout(8, 0x1000, 0x2000, 0x3002), "used ring .* not 4-byte"),
        (RingLayout(8, MEM - 64, 0x2000, 0x3000), "outside guest memory"),
        (RingLayout(8, 0x1000, 0x2000, MEM - 8), "outside guest memory"),
    ],
)
def test_bad_ring_layouts(memory: GuestMemory, layout: RingLayout, error: str) -> None:
    with pytest.raises(VirtqueueError, match=error):
        SplitVirtqueue(memory, layout, event_idx=True, indirect=True)


_addresses = st.one_of(
    st.integers(BUF, MEM - 0x200),
    st.integers(BUF, MEM - 0x200),
    st.integers(BUF, MEM - 1),
    st.sampled_from([0, MEM - 16, MEM - 1, MEM, INDIRECT_TABLE, (1 << 64) - 8, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)
_descriptors = st.tuples(
    _addresses,
    st.one_of(st.integers(1, 0x200), st.sampled_from([0, 16, 32, 48, 0x10000, 0xFFFFFFFF])),
    st.one_of(st.integers(0, 3), st.integers(0, 7)),
    st.integers(0, SIZE + 1),
)


@settings(max_examples=300, deadline=None)
@given(
    main=st.lists(_descriptors, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(_descriptors, min_size=4, max_size=4),
    heads=st.lists(st.integers(0, SIZE), min_size=SIZE, max_size=SIZE),
    avail_idx=st.one_of(st.integers(1, SIZE), st.integers(0, 0xFFFF)),
    options=st.fixed_dictionaries({"event_idx": st.booleans(), "indirect": st.booleans()}),
)
def test_generated_tables_never_escape_memory_or_crash(
    main: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    options: dict[str, bool],
) -> None:
    with memfd(MEM, "ring-fuzz") as fd, GuestMemory.from_memfd(fd, MEM) as memory:
        for index, desc in enumerate(main):
            put_desc(memory, LAYOUT.desc, index, *desc)
        for index, desc in enumerate(indirect):
            put_desc(memory, INDIRECT_TABLE, index, *desc)
        for position, head in enumerate(heads):
            memory.write_u16(LAYOUT.avail + 4 + 2 * position, head)
        memory.write_u16(LAYOUT.avail + 2, avail_idx)
        before = memory.read(0, MEM)
        queue = SplitVirtqueue(memory, LAYOUT, **options)
        try:
            for _ in range(SIZE + 1):
                chain = queue.pop()
                if chain is None:
                    break
                with chain:
                    assert 0 < len(chain.readable) + len(chain.writable) <= SIZE
                    assert chain.read_len + chain.write_len <= SIZE * 0xFFFFFFFF
        except VirtqueueError:
            pass
        queue.close()
        after = memory.read(0, MEM)
        avail_event = LAYOUT.used + 4 + 8 * SIZE
        # the device wrote nothing but avail_event (the only store a pop makes)
        assert before[:avail_event] == after[:avail_event]
        assert before[avail_event + 2 :] == after[avail_event + 2 :]


# -- the toolkit's rings against the device's -----------------------------------------------


def _pair(
    memory: GuestMemory, *, event_idx: bool = True, indirect: bool = True
) -> tuple[DriverVirtqueue, SplitVirtqueue]:
    driver = DriverVirtqueue(
        memory,
        GuestAllocator(0x1000, 0x7000),
        SIZE,
        event_idx=event_idx,
        indirect=indirect,
        max_indirect=8,
    )
    device = SplitVirtqueue(memory, driver.layout, event_idx=event_idx, indirect=indirect)
    return driver, device


def test_toolkit_layout_is_linux_like(memory: GuestMemory) -> None:
    driver, _ = _pair(memory)
    layout = driver.layout
    assert layout.avail == layout.desc + 16 * SIZE
    assert layout.used % 64 == 0 and layout.used >= layout.avail + 6 + 2 * SIZE


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 3), st.integers(0, 3), st.booleans()),
            st.tuples(st.just("serve"), st.integers(1, SIZE), st.just(0), st.just(False)),
        ),
        max_size=60,
    ),
    event_idx=st.booleans(),
)
def test_toolkit_and_device_agree(ops: list[tuple[str, int, int, bool]], event_idx: bool) -> None:
    with memfd(MEM, "ring-pair") as fd, GuestMemory.from_memfd(fd, MEM) as memory:
        driver, device = _pair(memory, event_idx=event_idx)
        sent: dict[int, tuple[int, int]] = {}
        token = 0
        for op, outs, ins, use_indirect in ops:
            if op == "add":
                if outs + ins == 0:
                    continue
                out = [(BUF + 0x40 * i, 0x10) for i in range(outs)]
                in_ = [(BUF + 0x400 + 0x40 * i, 0x20) for i in range(ins)]
                try:
                    driver.add(out, in_, token, use_indirect=use_indirect and outs + ins > 1)
                except QueueFull:
                    continue
                sent[token] = (0x10 * outs, 0x20 * ins)
                token += 1
                continue
            for _ in range(outs):
                chain = device.pop()
                if chain is None:
                    break
                with chain:
                    device.push(chain.head, chain.write_len)
        while (chain := device.pop()) is not None:
            with chain:
                device.push(chain.head, chain.write_len)
        got = {}
        while (used := driver.get_used()) is not None:
            got[used.token] = used.length
        assert got == {t: lens[1] for t, lens in sent.items()}
        assert driver.num_free == SIZE


def test_kick_suppression_counts(memory: GuestMemory) -> None:
    driver, device = _pair(memory)
    assert device.pop() is None  # arms avail_event = 0
    driver.add([(BUF, 8)], [], "a")
    assert driver.kick_prepare() is True
    driver.add([(BUF, 8)], [], "b")
    assert driver.kick_prepare() is False  # the device has not caught up yet
    assert device.pop() is not None and device.pop() is not None
    assert device.pop() is None  # re-arms at 2
    driver.add([(BUF, 8)], [], "c")
    driver.add([(BUF, 8)], [], "d")
    assert driver.kick_prepare() is True  # one kick for the batch


def test_toolkit_interrupt_suppression(memory: GuestMemory) -> None:
    driver, device = _pair(memory)
    for name in "abc":
        driver.add([], [(BUF, 8)], name)
    chains = [device.pop() for _ in range(3)]
    device.push(chains[0].head, 8)  # type: ignore[union-attr]
    assert device.needs_notification() is True  # the first check is unconditional
    assert driver.get_used().token == "a"  # type: ignore[union-attr]  # used_event := 1
    driver.disable_interrupts()  # with event idx: used_event stops following
    device.push(chains[1].head, 8)  # type: ignore[union-attr]
    assert device.needs_notification() is True  # 1 -> 2 passes used_event 1
    assert driver.get_used().token == "b"  # type: ignore[union-attr]
    device.push(chains[2].head, 8)  # type: ignore[union-attr]
    assert device.needs_notification() is False  # used_event 1 is behind
    assert driver.enable_interrupts() is False  # "c" is already waiting: poll again
    assert driver.get_used().token == "c"  # type: ignore[union-attr]
    assert driver.enable_interrupts() is True


def test_toolkit_refuses_a_misbehaving_device(memory: GuestMemory) -> None:
    driver, _ = _pair(memory)
    driver.add([(BUF, 8)], [], "a")
    memory.write(driver.layout.used + 4, struct.pack("<II", 5, 0))
    memory.write_u16(driver.layout.used + 2, 1)
    with pytest.raises(DeviceMisbehaved, match="head 5"):
        driver.get_used()
    memory.write_u16(driver.layout.used + 2, SIZE + 1)
    with pytest.raises(DeviceMisbehaved, match="past"):
        driver.get_used()


def test_a_batch_becomes_visible_with_one_publish(memory: GuestMemory) -> None:
    driver, device = _pair(memory)
    for name in "abc":
        driver.add([(BUF, 8)], [(BUF + 0x100, 8)], name, publish=False)
    assert memory.read_u16(driver.layout.avail + 2) == 0  # avail idx: nothing published
    assert device.pop() is None
    driver.publish()
    assert memory.read_u16(driver.layout.avail + 2) == 3
    heads = []
    while (chain := device.pop()) is not None:
        with chain:
            heads.append(chain.head)
    assert len(heads) == 3
    driver.add([(BUF, 8)], [], "d", publish=False)
    assert driver.kick_prepare() is True  # publishes too: the device armed avail_event 3
    assert memory.read_u16(driver.layout.avail + 2) == 4


def test_harvest_takes_everything_with_one_used_event(memory: GuestMemory) -> None:
    driver, device = _pair(memory)
    for name in "abcd":
        driver.add([], [(BUF, 8)], name)
    chains = [device.pop() for _ in range(4)]
    for length, chain in enumerate(chains[:3], 1):
        assert chain is not None
        device.push(chain.head, length)
    got: list[tuple[object, int]] = []
    assert driver.harvest(lambda token, length: got.append((token, length))) == 3
    assert got == [("a", 1), ("b", 2), ("c", 3)]
    assert memory.read_u16(driver.layout.avail + 4 + 2 * SIZE) == 3  # used_event
    assert driver.harvest(lambda token, length: got.append((token, length))) == 0
    assert chains[3] is not None
    device.push(chains[3].head, 4)
    assert device.needs_notification() is True  # 3 -> 4 passes used_event 3


def test_harvest_takes_an_entry_published_while_it_runs(memory: GuestMemory) -> None:
    """The device publishes another entry between the driver's read of used idx and its
    used_event store: the same harvest must take it (the device may have seen the old
    used_event and sent no interrupt for it)."""
    driver, device = _pair(memory)
    for name in "ab":
        driver.add([], [(BUF, 8)], name)
    first, second = device.pop(), device.pop()
    assert first is not None and second is not None
    device.push(first.head, 8)
    got: list[object] = []

    def deliver(token: object, length: int) -> None:
        got.append(token)
        if token == "a":
            device.push(second.head, 8)

    assert driver.harvest(deliver) == 2
    assert got == ["a", "b"]
    assert memory.read_u16(driver.layout.avail + 4 + 2 * SIZE) == 2


def test_harvest_delivers_what_came_before_a_bad_entry(memory: GuestMemory) -> None:
    driver, device = _pair(memory)
    driver.add([], [(BUF, 8)], "a")
    chain = device.pop()
    assert chain is not None
    device.push(chain.head, 8)
    used = driver.layout.used
    memory.write(used + 4 + 8, struct.pack("<II", 7, 0))  # a second entry naming a free head
    memory.write_u16(used + 2, 2)
    got: list[object] = []
    with pytest.raises(DeviceMisbehaved, match="head 7"):
        driver.harvest(lambda token, length: got.append(token))
    assert got == ["a"]
