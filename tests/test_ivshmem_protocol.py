"""QEMU's ivshmem protocol, sans-IO: server-side messages and outbox, client-side decoder."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msixhub.devices.ivshmem.domain import IvshmemDomain, JoinResult, PeerJoined, PeerLeft
from msixhub.devices.ivshmem.qemu_protocol import (
    NEED_DATA,
    ClientDecoder,
    ClientEvent,
    MessageKind,
    OwnVector,
    PeerGone,
    PeerOutbox,
    PeerVector,
    ServerClosed,
    ServerMessage,
    SharedMemory,
    Welcome,
    announcement,
    encode,
    greeting,
    receive_all,
)
from msixhub.protocol.errors import ProtocolError, VersionMismatch
from msixhub.protocol.fds import OwnedFd, eventfd, eventfd_read, eventfd_write, memfd

Wire = list[tuple[bytes, OwnedFd | None]]  # what the server puts on the socket, message by message


class Inbox:
    def __init__(self) -> None:
        self.events: list[PeerJoined | PeerLeft] = []

    def announce(self, event: PeerJoined | PeerLeft) -> None:
        self.events.append(event)


@pytest.fixture
def domain() -> Iterator[IvshmemDomain]:
    d = IvshmemDomain("proto", memfd(1 << 20), 2)
    yield d
    d.close()


def to_wire(messages: Sequence[ServerMessage]) -> Wire:
    """What the kernel delivers: the bytes, and a new fd (a dup) for each message's fd."""
    return [(m.payload, m.fd.dup() if m.fd is not None else None) for m in messages]


def raw(*values: int | tuple[int, OwnedFd]) -> Wire:
    return [(encode(v), None) if isinstance(v, int) else (encode(v[0]), v[1]) for v in values]


def feed(decoder: ClientDecoder, wire: Wire, cuts: Sequence[int] = ()) -> list[ClientEvent]:
    """Feed ``wire`` in chunks ending at the byte offsets ``cuts`` (plus the end of every
    message that carries an fd and the end of the stream), collecting events as they come."""
    stream = b"".join(payload for payload, _ in wire)
    fd_at = {8 * i: fd for i, (_, fd) in enumerate(wire) if fd is not None}
    boundaries = sorted({*cuts, *(start + 1 for start in fd_at), len(stream)} - {0})
    events: list[ClientEvent] = []
    start = 0
    for end in boundaries:
        fds = [fd for offset, fd in fd_at.items() if start <= offset < end]
        decoder.receive_data(stream[start:end], fds)
        events.extend(receive_all(decoder))
        start = end
    return events


def same_file(a: OwnedFd, b: OwnedFd) -> bool:
    """Eventfds share one anonymous inode, so test identity by ringing one and reading the other."""
    eventfd_write(a.fileno())
    return eventfd_read(b.fileno()) == 1


def close_events(events: Sequence[ClientEvent]) -> None:
    for event in events:
        fd = getattr(event, "fd", None)
        if fd is not None:
            fd.close()


def three_peer_stream(domain: IvshmemDomain) -> tuple[Wire, list[ClientEvent]]:
    """The wire the third peer of ``domain`` receives: greeting, a fourth joins, the first
    leaves; and the events it must decode to (fds left out: compare with ``strip``)."""
    domain.join(Inbox())
    domain.join(Inbox())
    me = domain.join(Inbox())
    fourth = domain.join(Inbox())
    messages = greeting(me, domain.shm) + announcement(PeerJoined(3, fourth.vectors))
    messages += announcement(PeerLeft(0))
    expected: list[ClientEvent] = [
        Welcome(2),
        SharedMemory(domain.shm),
        *(PeerVector(p, v, domain.vector_fd(p, v)) for p in (0, 1) for v in (0, 1)),  # type: ignore[arg-type]
        *(OwnVector(v, me.vectors[v]) for v in (0, 1)),
        *(PeerVector(3, v, fourth.vectors[v]) for v in (0, 1)),
        PeerGone(0),
    ]
    return to_wire(messages), expected


def check_events(got: Sequence[ClientEvent], expected: Sequence[ClientEvent]) -> None:
    assert [strip(e) for e in got] == [strip(e) for e in expected]
    for mine, theirs in zip(got, expected, strict=True):
        fd, original = getattr(mine, "fd", None), getattr(theirs, "fd", None)
        if isinstance(fd, OwnedFd) and isinstance(theirs, PeerVector | OwnVector):
            assert original is not None and same_file(fd, original)


def strip(event: ClientEvent) -> object:
    if isinstance(event, PeerVector):
        return ("peer-vector", event.peer_id, event.vector)
    if isinstance(event, OwnVector):
        return ("own-vector", event.vector)
    if isinstance(event, SharedMemory):
        return ("shm", os.fstat(event.fd.fileno()).st_size)
    return event


def test_encode_is_little_endian_signed_64() -> None:
    assert encode(0) == bytes(8)
    assert encode(-1) == b"\xff" * 8
    assert encode(0x0102) == b"\x02\x01" + bytes(6)


def test_greeting_follows_the_spec_order(domain: IvshmemDomain) -> None:
    first = domain.join(Inbox())
    me = domain.join(Inbox())
    messages = greeting(me, domain.shm)
    assert [(m.kind, m.value) for m in messages] == [
        (MessageKind.VERSION, 0),
        (MessageKind.PEER_ID, 1),
        (MessageKind.SHARED_MEMORY, -1),
        (MessageKind.PEER_VECTOR, 0),
        (MessageKind.PEER_VECTOR, 0),
        (MessageKind.OWN_VECTOR, 1),
        (MessageKind.OWN_VECTOR, 1),
    ]
    assert [m.fd for m in messages] == [None, None, domain.shm, *first.vectors, *me.vectors]


def test_round_trip_one_message_per_read(domain: IvshmemDomain) -> None:
    wire, expected = three_peer_stream(domain)
    decoder = ClientDecoder()
    got = feed(decoder, wire, cuts=range(8, 8 * len(wire), 8))
    try:
        check_events(got, expected)
        assert decoder.peer_id == 2
        decoder.receive_data(b"")
        assert list(receive_all(decoder)) == [ServerClosed()]
    finally:
        close_events(got)


def test_round_trip_byte_at_a_time(domain: IvshmemDomain) -> None:
    wire, expected = three_peer_stream(domain)
    decoder = ClientDecoder()
    got = feed(decoder, wire, cuts=range(1, 8 * len(wire)))
    try:
        check_events(got, expected)
    finally:
        close_events(got)


def test_round_trip_as_the_kernel_coalesces(domain: IvshmemDomain) -> None:
    """No cuts but the forced ones: messages without fds ride along with the next fd message."""
    wire, expected = three_peer_stream(domain)
    decoder = ClientDecoder()
    got = feed(decoder, wire)
    try:
        check_events(got, expected)
    finally:
        close_events(got)


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_round_trip_any_chunking(data: st.DataObject) -> None:
    domain = IvshmemDomain("proto", memfd(1 << 20), 2)
    try:
        wire, expected = three_peer_stream(domain)
        cuts = data.draw(st.sets(st.integers(1, 8 * len(wire) - 1)))
        decoder = ClientDecoder()
        got = feed(decoder, wire, cuts=sorted(cuts))
        try:
            check_events(got, expected)
        finally:
            close_events(got)
    finally:
        domain.close()


def test_need_data_until_a_whole_message() -> None:
    decoder = ClientDecoder()
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(encode(0)[:5])
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(encode(0)[5:] + encode(7))
    assert decoder.next_event() == Welcome(7)
    assert decoder.next_event() is NEED_DATA


def decoder_after_greeting(peer_id: int = 1) -> tuple[ClientDecoder, OwnedFd]:
    decoder = ClientDecoder()
    shm = memfd(4096)
    events = feed(decoder, raw(0, peer_id, (-1, shm)))
    assert [strip(e) for e in events] == [Welcome(peer_id), ("shm", 4096)]
    return decoder, shm


def broken(decoder: ClientDecoder, wire: Wire, error: type[ProtocolError] = ProtocolError) -> None:
    """Feeding ``wire`` raises ``error``; every fd fed is closed; the decoder stays broken."""
    fds = [fd for _, fd in wire if fd is not None]
    with pytest.raises(error):
        feed(decoder, wire)
    assert all(fd.closed for fd in fds)
    with pytest.raises(error):
        decoder.next_event()
    with pytest.raises(error):
        decoder.receive_data(encode(0))


def test_version_mismatch() -> None:
    broken(ClientDecoder(), raw(1, 0), VersionMismatch)


def test_fd_with_version_or_id() -> None:
    broken(ClientDecoder(), raw((0, eventfd())))
    broken(ClientDecoder(), raw(0, (3, eventfd())))


@pytest.mark.parametrize("third", [-1, 5])
def test_shared_memory_must_be_minus_one_with_an_fd(third: int) -> None:
    wire = raw(0, 1, third) if third == -1 else raw(0, 1, (third, eventfd()))
    broken(ClientDecoder(), wire)


@pytest.mark.parametrize("bad_id", [-1, -2, 0x10000, 1 << 40])
def test_peer_id_out_of_range(bad_id: int) -> None:
    broken(ClientDecoder(), raw(0, bad_id))
    decoder, shm = decoder_after_greeting()
    broken(decoder, raw((bad_id, eventfd())))
    shm.close()


def test_departure_of_unknown_peer_or_of_ourselves() -> None:
    decoder, shm = decoder_after_greeting(1)
    broken(decoder, raw(4))
    decoder, shm2 = decoder_after_greeting(1)
    feed(decoder, raw((1, eventfd())))[0].fd.close()  # type: ignore[union-attr]
    broken(decoder, raw(1))
    shm.close()
    shm2.close()


def test_peer_vectors_count_per_peer_and_restart_after_departure() -> None:
    decoder, shm = decoder_after_greeting(1)
    wire = raw((0, eventfd()), (0, eventfd()), (2, eventfd()), 0, (0, eventfd()))
    events = feed(decoder, wire)
    assert [strip(e) for e in events] == [
        ("peer-vector", 0, 0),
        ("peer-vector", 0, 1),
        ("peer-vector", 2, 0),
        PeerGone(0),
        ("peer-vector", 0, 0),
    ]
    close_events(events)
    shm.close()


def test_fds_in_the_middle_of_a_message() -> None:
    decoder = ClientDecoder()
    decoder.receive_data(encode(0)[:3])
    fd = eventfd()
    with pytest.raises(ProtocolError, match="middle"):
        decoder.receive_data(encode(0)[3:6], [fd])
    assert fd.closed


def test_two_fds_for_one_message() -> None:
    decoder, shm = decoder_after_greeting()
    fds = [eventfd(), eventfd()]
    decoder.receive_data(encode(0), fds)
    with pytest.raises(ProtocolError, match="2 fds"):
        decoder.next_event()
    assert all(fd.closed for fd in fds)
    shm.close()


def test_fds_held_for_an_unfinished_message_are_closed() -> None:
    decoder, shm = decoder_after_greeting()
    fd = eventfd()
    decoder.receive_data(encode(0)[:4], [fd])
    assert decoder.next_event() is NEED_DATA
    decoder.close()
    assert fd.closed
    shm.close()


def test_end_of_stream() -> None:
    decoder = ClientDecoder()
    decoder.receive_data(encode(0) + encode(1)[:3])
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError, match="inside a message"):
        list(receive_all(decoder))
    decoder = ClientDecoder()
    decoder.receive_data(b"")
    assert decoder.next_event() == ServerClosed()
    with pytest.raises(ProtocolError, match="after end"):
        decoder.receive_data(encode(0))
    fd = eventfd()
    with pytest.raises(ProtocolError):
        ClientDecoder().receive_data(b"", [fd])
    assert fd.closed


# --------------------------------------------------------------------------- outbox


def drain(outbox: PeerOutbox) -> list[tuple[MessageKind, int]]:
    sent = []
    while (message := outbox.next_message()) is not None:
        sent.append((message.kind, message.value))
    return sent


def greeted_then_joined(domain: IvshmemDomain) -> tuple[int, JoinResult, PeerOutbox]:
    """An outbox that greeted a new peer and then queued the join of another: the greeting's
    length, the other peer, the outbox."""
    me = domain.join(Inbox())
    other = domain.join(Inbox())
    outbox = PeerOutbox(max_backlog=8)
    welcome = greeting(me, domain.shm)
    outbox.greet(welcome)
    outbox.announce(PeerJoined(other.peer_id, other.vectors))
    return len(welcome), other, outbox


def test_outbox_sends_greeting_then_announcements(domain: IvshmemDomain) -> None:
    _, other, outbox = greeted_then_joined(domain)
    outbox.announce(PeerLeft(other.peer_id))
    assert drain(outbox) == [
        (MessageKind.VERSION, 0),
        (MessageKind.PEER_ID, 0),
        (MessageKind.SHARED_MEMORY, -1),
        (MessageKind.OWN_VECTOR, 0),
        (MessageKind.OWN_VECTOR, 0),
        (MessageKind.PEER_VECTOR, 1),
        (MessageKind.PEER_VECTOR, 1),
        (MessageKind.PEER_GONE, 1),
    ]
    assert outbox.failure is None


def test_outbox_drops_a_join_whose_peer_left_and_its_departure(domain: IvshmemDomain) -> None:
    _, other, outbox = greeted_then_joined(domain)
    domain.leave(other.peer_id)  # closes the queued fds
    outbox.announce(PeerLeft(other.peer_id))
    kinds = [kind for kind, _ in drain(outbox)]
    assert MessageKind.PEER_VECTOR not in kinds and MessageKind.PEER_GONE not in kinds
    assert outbox.failure is None


def test_outbox_retracts_a_partly_sent_join(domain: IvshmemDomain) -> None:
    greeting_length, other, outbox = greeted_then_joined(domain)
    sent = [outbox.next_message() for _ in range(greeting_length + 1)]
    assert sent[-1] is not None and sent[-1].kind is MessageKind.PEER_VECTOR
    domain.leave(other.peer_id)
    outbox.announce(PeerLeft(other.peer_id))
    assert drain(outbox) == [(MessageKind.PEER_GONE, other.peer_id)]


def test_outbox_backlog_bound_excludes_the_greeting(domain: IvshmemDomain) -> None:
    me = domain.join(Inbox())
    outbox = PeerOutbox(max_backlog=3)
    outbox.greet(greeting(me, domain.shm))  # 5 messages, over the bound on its own
    assert outbox.backlog == 0
    outbox.announce(PeerLeft(9))
    outbox.announce(PeerJoined(10, me.vectors))  # 3 waiting: at the bound
    assert outbox.failure is None and outbox.backlog == 3
    outbox.announce(PeerLeft(11))
    assert outbox.failure == "backlog over 3 messages"
    assert outbox.next_message() is None
    outbox.announce(PeerLeft(12))  # a failed outbox takes nothing more
    assert outbox.backlog == 0


def test_outbox_fails_if_its_own_fds_are_closed() -> None:
    shm = memfd(4096)
    outbox = PeerOutbox(max_backlog=4)
    outbox.greet([ServerMessage(MessageKind.SHARED_MEMORY, -1, shm)])
    shm.close()
    assert outbox.next_message() is None
    assert outbox.failure is not None and "shared-memory" in outbox.failure


def test_outbox_greeting_comes_first() -> None:
    outbox = PeerOutbox(max_backlog=4)
    outbox.announce(PeerLeft(1))
    with pytest.raises(ProtocolError):
        outbox.greet([ServerMessage(MessageKind.VERSION, 0)])
    with pytest.raises(ValueError):
        PeerOutbox(max_backlog=0)
