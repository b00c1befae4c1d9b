"""The sans-IO codec: every message round trips, every stream decodes the same however it is
cut, and every malformed input gets the answer the protocol promises (a structured error
with the connection still usable, or a ProtocolError that closes it), with every fd it was
given closed exactly once."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msixhub.protocol.connection import (
    MAX_FORGOTTEN,
    NEED_DATA,
    PROTOCOL_VERSION,
    Closing,
    Connection,
    ErrorReply,
    Notice,
    PeerHello,
    RejectedNotice,
    RejectedReply,
    RejectedRequest,
    Reply,
    Request,
    State,
)
from msixhub.protocol.errors import (
    ConnectionClosed,
    ErrorCode,
    FdPassingUnsupported,
    MessageError,
    ProtocolError,
    VersionMismatch,
)
from msixhub.protocol.fds import OwnedFd, close_all, eventfd
from msixhub.protocol.frame import (
    DEFAULT_MAX_FRAME,
    HEADER,
    MIN_MAX_FRAME,
    FrameDecoder,
)
from msixhub.protocol.messages import (
    Attach,
    Attached,
    Bar,
    BarRead,
    DeviceInfo,
    Echo,
    Hello,
    Irq,
    MsixLayout,
    Ping,
    Region,
    SetCallFd,
    SetMemTable,
    Use,
    Value,
)
from msixhub.protocol.ops import OPS, Empty
from msixhub.protocol.schema import Message
from protocol_helpers import (
    MESSAGE_TYPES,
    all_ops,
    connected_pair,
    drain,
    dup_all,
    is_open,
    message_strategy,
    no_fd_leak,
    raw_frame,
)

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def hello_wire(**overrides: Any) -> dict[str, Any]:
    body = Hello(PROTOCOL_VERSION, "vmm", DEFAULT_MAX_FRAME, 64, ["fd-passing"], "t").to_wire()
    body.update(overrides)
    return body


def opened(**options: Any) -> Connection:
    """A connection that has received a valid hello (ours is never sent: sans-IO)."""
    connection = Connection("admin", **options)
    connection.receive_data(raw_frame([0, hello_wire()]))
    assert isinstance(connection.next_event(), PeerHello)
    return connection


def info(num_queues: int = 2) -> DeviceInfo:
    return DeviceInfo("blk0", "virtio-blk", 4, num_queues, [Bar(1, 4096)], MsixLayout(1, 0, 2048))


# --- every message, every operation -------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
@FAST
@given(data=st.data())
def test_every_message_type_round_trips_through_msgpack(cls: type[Message], data: Any) -> None:
    message = data.draw(message_strategy(cls))
    wire = msgpack.unpackb(msgpack.packb(message.to_wire(), use_bin_type=True), raw=False)
    assert cls.from_wire(wire) == message


@pytest.mark.parametrize("op", all_ops())
@FAST
@given(data=st.data())
def test_every_operation_round_trips_with_its_fds(op: str, data: Any) -> None:
    spec = OPS[op]
    a, b = connected_pair()
    body = data.draw(message_strategy(spec.request))
    with no_fd_leak():
        sent = [eventfd() for _ in range(spec.expected_request_fds(body))]
        numbers = [fd.fileno() for fd in sent]
        if spec.oneway:
            wire = a.send_notice(body, numbers)
        else:
            request_id, wire = a.send_request(body, numbers)
        b.receive_data(wire, dup_all(numbers))
        (event,) = drain(b)
        assert type(event) is (Notice if spec.oneway else Request)
        assert event.body == body
        assert event.op == op
        assert len(event.fds) == len(sent)
        close_all(event.fds)
        if not spec.oneway:
            assert isinstance(event, Request)
            assert event.id == request_id
            reply = body if spec.reply is spec.request else data.draw(message_strategy(spec.reply))
            if spec.expected_reply_fds(reply) > b.send_max_fds:  # e.g. attach with 1024 queues
                with pytest.raises(MessageError, match="at most"):
                    b.send_reply(event, reply, list(range(spec.expected_reply_fds(reply))))
                close_all(sent)
                return
            reply_fds = [eventfd() for _ in range(spec.expected_reply_fds(reply))]
            numbers = [fd.fileno() for fd in reply_fds]
            a.receive_data(b.send_reply(event, reply, numbers), dup_all(numbers))
            (answer,) = drain(a)
            assert isinstance(answer, Reply)
            assert (answer.id, answer.body, len(answer.fds)) == (request_id, reply, len(numbers))
            assert a.outstanding == 0
            close_all(answer.fds)
            close_all(reply_fds)
        close_all(sent)


def test_replies_are_decoded_as_their_operation_reply_type() -> None:
    a, b = connected_pair()
    b.receive_data(a.send_request(Attach("blk0"))[1])
    (request,) = drain(b)
    with no_fd_leak():
        kicks = [eventfd(), eventfd()]
        a.receive_data(
            b.send_reply(request, Attached(info(2)), [fd.fileno() for fd in kicks]),
            dup_all([fd.fileno() for fd in kicks]),
        )
        (reply,) = drain(a)
        assert isinstance(reply, Reply) and reply.body == Attached(info(2))
        assert all(isinstance(fd, OwnedFd) and not fd.closed for fd in reply.fds)
        close_all(reply.fds)
        close_all(kicks)


# --- however the stream is cut ---------------------------------------------------------------


def _conversation() -> tuple[list[tuple[bytes, int]], list[Message]]:
    """A's frames as B receives them, from the hello on: (bytes, fds) each, and the bodies."""
    a = Connection("vmm", name="a")
    b = Connection("device", name="b")
    a.receive_data(b.hello())
    a.next_event()
    bodies: list[Message] = [
        Ping(),
        SetMemTable([Region(0, 4096, 0), Region(1 << 32, 8192, 4096)]),
        Irq("blk0", 3, 0xFEE0_0000, 0x4021),
        SetCallFd(7),
        Echo(b"\x00" * 300),
    ]
    frames = [(a.hello(), 0)]
    for body in bodies:
        nfds = 2 if isinstance(body, SetMemTable) else int(isinstance(body, SetCallFd))
        placeholders = list(range(nfds))
        if isinstance(body, Irq):
            frames.append((a.send_notice(body), 0))
        else:
            frames.append((a.send_request(body, placeholders)[1], nfds))
    return frames, bodies


def _feed(chunks: list[tuple[bytes, int]]) -> tuple[list[Any], Connection]:
    """Feed (bytes, nfds) chunks to a fresh receiver with fresh fds; the events it produced."""
    b = Connection("device", name="b")
    events: list[Any] = []
    for data, nfds in chunks:
        b.receive_data(data, [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)])
        events.extend(drain(b))
    return events, b


def _summary(events: list[Any]) -> list[tuple[str, Any, int]]:
    out = []
    for event in events:
        if isinstance(event, PeerHello):
            out.append(("hello", event.hello.role, 0))
        else:
            out.append((type(event).__name__, event.body, len(event.fds)))
            close_all(event.fds)
    return out


def _expected(bodies: list[Message]) -> list[tuple[str, Any, int]]:
    out: list[tuple[str, Any, int]] = [("hello", "vmm", 0)]
    for body in bodies:
        nfds = 2 if isinstance(body, SetMemTable) else int(isinstance(body, SetCallFd))
        out.append(("Notice" if isinstance(body, Irq) else "Request", body, nfds))
    return out


def test_stream_fed_whole() -> None:
    frames, bodies = _conversation()
    with no_fd_leak():
        whole = b"".join(data for data, _ in frames)
        events, _ = _feed([(whole, sum(n for _, n in frames))])
        assert _summary(events) == _expected(bodies)


def test_stream_fed_one_byte_at_a_time() -> None:
    frames, bodies = _conversation()
    with no_fd_leak():
        chunks = [
            (data[i : i + 1], nfds if i == 0 else 0)
            for data, nfds in frames
            for i in range(len(data))
        ]
        events, _ = _feed(chunks)
        assert _summary(events) == _expected(bodies)


def test_stream_with_trailing_data_keeps_the_partial_frame() -> None:
    frames, bodies = _conversation()
    with no_fd_leak():
        extra = Connection("vmm")
        extra.receive_data(Connection("device").hello())
        extra.next_event()
        tail = extra.send_request(Echo(b"tail"))[1]
        whole = b"".join(data for data, _ in frames)
        events, b = _feed([(whole + tail[:5], sum(n for _, n in frames))])
        assert _summary(events) == _expected(bodies)
        assert b.next_event() is NEED_DATA
        b.receive_data(tail[5:])
        (last,) = drain(b)
        assert isinstance(last, Request) and last.body == Echo(b"tail")
        b.close()


@FAST
@given(cuts=st.lists(st.integers(min_value=1), max_size=12))
def test_stream_cut_anywhere_decodes_the_same(cuts: list[int]) -> None:
    """Fds ride with the chunk holding their frame's first byte, as recvmsg delivers them."""
    frames, bodies = _conversation()
    whole = b"".join(data for data, _ in frames)
    starts: dict[int, int] = {}
    offset = 0
    for data, nfds in frames:
        starts[offset] = nfds
        offset += len(data)
    points = sorted({0, len(whole), *(cut % len(whole) for cut in cuts)})
    chunks = []
    for lo, hi in itertools.pairwise(points):
        chunks.append((whole[lo:hi], sum(n for s, n in starts.items() if lo <= s < hi)))
    with no_fd_leak():
        events, _ = _feed(chunks)
        assert _summary(events) == _expected(bodies)


# --- messages: bad ones are answered, the connection stays usable -----------------------------


@pytest.mark.parametrize(
    ("op", "body", "code"),
    [
        ("no_such_op", {}, ErrorCode.UNKNOWN_OP),
        ("notify", {"vector": 1}, ErrorCode.UNKNOWN_OP),  # a notice is not a request
        ("use", {}, ErrorCode.BAD_FIELD),
        ("use", {"vector": "1"}, ErrorCode.BAD_FIELD),
        ("use", {"vector": True}, ErrorCode.BAD_FIELD),
        ("use", {"vector": 1, "extra": 0}, ErrorCode.BAD_FIELD),
        ("use", {"vector": 2048}, ErrorCode.BAD_RANGE),
        ("use", {"vector": -1}, ErrorCode.BAD_RANGE),
        ("use", [1], ErrorCode.BAD_FIELD),
        ("bar_read", {"bar": 0, "offset": 0, "size": 3}, ErrorCode.BAD_RANGE),
        ("bar_read", {"bar": 0, "offset": 0, "size": 4.0}, ErrorCode.BAD_RANGE),
        ("bar_read", {"bar": 6, "offset": 0, "size": 4}, ErrorCode.BAD_RANGE),
        ("attach", {"device": "x" * 65}, ErrorCode.BAD_RANGE),
        ("echo", {"payload": "text, not bytes"}, ErrorCode.BAD_FIELD),
        ("set_mem_table", {"regions": [{"gpa": 0, "size": 1}]}, ErrorCode.BAD_FIELD),
        (
            "set_mem_table",
            {"regions": [{"gpa": 0, "size": 1, "offset": 0}] * 33},
            ErrorCode.BAD_RANGE,
        ),
        ("register_device", {"info": {"device": "d"}}, ErrorCode.BAD_FIELD),
    ],
)
def test_a_bad_request_gets_a_structured_error_and_the_connection_stays(
    op: str, body: Any, code: ErrorCode
) -> None:
    b = opened()
    b.receive_data(raw_frame([1, 9, op, body]))
    (event,) = drain(b)
    assert isinstance(event, RejectedRequest)
    assert (event.id, event.error.code) == (9, code)
    b.receive_data(raw_frame([1, 10, "ping", {}]))
    (after,) = drain(b)
    assert isinstance(after, Request) and after.id == 10
    assert b.state is State.OPEN


def test_a_rejected_requests_error_reply_reaches_the_requester() -> None:
    a, b = connected_pair()
    request_id, wire = a.send_request(Use(5))
    b.receive_data(wire)
    (request,) = drain(b)
    a.receive_data(b.send_error(request.id, MessageError(ErrorCode.NO_ROUTE, "budget spent")))
    (answer,) = drain(a)
    assert answer == ErrorReply(request_id, "no-route", "budget spent")
    assert a.outstanding == 0


def test_a_bad_notice_is_reported_not_fatal() -> None:
    b = opened()
    b.receive_data(raw_frame([4, "irq", {"device": "d"}]) + raw_frame([4, "nope", {}]))
    bad_fields, unknown = drain(b)
    assert isinstance(bad_fields, RejectedNotice) and bad_fields.error.code == "bad-field"
    assert isinstance(unknown, RejectedNotice) and unknown.error.code == "unknown-op"
    assert b.state is State.OPEN


def test_a_reply_of_the_wrong_shape_fails_its_request_only() -> None:
    a, _ = connected_pair()
    request_id, _ = a.send_request(BarRead(0, 0, 4))
    a.receive_data(raw_frame([2, request_id, {"value": -1}]))
    (event,) = drain(a)
    assert isinstance(event, RejectedReply) and event.error.code == "bad-range"
    assert a.state is State.OPEN and a.outstanding == 0


def test_fds_that_do_not_match_the_operation_are_closed_and_answered() -> None:
    b = opened()
    with no_fd_leak():
        fds = [os.eventfd(0), os.eventfd(0)]
        b.receive_data(raw_frame([1, 3, "set_call_fd", {"vector": 1}], 2), fds)  # wants 1
        (event,) = drain(b)
        assert isinstance(event, RejectedRequest) and event.error.code == "bad-field"
        assert not any(is_open(fd) for fd in fds)
        fds = [os.eventfd(0)]
        b.receive_data(raw_frame([1, 4, "no_such_op", {}], 1), fds)
        (event,) = drain(b)
        assert isinstance(event, RejectedRequest) and not is_open(fds[0])
    assert b.state is State.OPEN


# --- the stream: corruption closes the connection, with every fd -------------------------------


def _assert_fatal(connection: Connection, data: bytes, fds: list[int], match: str) -> None:
    connection.receive_data(data, fds)
    with pytest.raises(ProtocolError, match=match):
        drain(connection)
    assert connection.state is State.CLOSED
    assert not any(is_open(fd) for fd in fds)
    with pytest.raises(ConnectionClosed):
        connection.next_event()


@pytest.mark.parametrize(
    ("data", "nfds", "match"),
    [
        (raw_frame([1, 1, "ping", {}], magic=b"XM"), 0, "bad frame magic"),
        (raw_frame([1, 1, "ping", {}], flags=1), 0, "unknown frame flags"),
        (HEADER.pack(b"MX", 0, 0, DEFAULT_MAX_FRAME + 1), 0, "exceeds the maximum"),
        (HEADER.pack(b"MX", 0, 65, 10), 0, "more than the maximum of 64"),
        (raw_frame([1, 1, "set_call_fd", {"vector": 1}], 1), 0, "declares 1 fds but 0 arrived"),
        (raw_frame([1, 1, "ping", {}]), 1, "no frame claims"),
        (raw_frame([1, 1, "set_call_fd", {"vector": 1}], 1), 2, "no frame claims"),
        (HEADER.pack(b"MX", 0, 0, 1) + b"\xc1", 0, "undecodable"),
        (raw_frame({"not": "a list"}), 0, "not an msixhub envelope"),
        (raw_frame([]), 0, "not an msixhub envelope"),
        (raw_frame([9, 1]), 0, "unknown envelope kind"),
        (raw_frame([2]), 0, "unknown envelope kind"),
        (raw_frame([3, 1]), 0, "unknown envelope kind"),
        (raw_frame([0, hello_wire()]), 0, "unknown envelope kind"),  # a second hello
        (raw_frame([1, 0, "ping", {}]), 0, "bad request id"),
        (raw_frame([1, "1", "ping", {}]), 0, "bad request id"),
        (raw_frame([2, 77, {}]), 0, "reply to unknown request id 77"),
        (raw_frame([3, 77, "x", "y"]), 0, "error reply to unknown request id 77"),
        (raw_frame([3, 1, 2, "y"]), 0, "malformed error reply"),
        (raw_frame([1, 1, "ping", {}]) + bytes(8), 0, "bad frame magic"),
    ],
)
def test_framing_corruption_closes_the_connection_and_every_fd(
    data: bytes, nfds: int, match: str
) -> None:
    with no_fd_leak():
        _assert_fatal(opened(), data, [os.eventfd(0) for _ in range(nfds)], match)


def test_an_oversize_frame_is_refused_from_its_header_alone() -> None:
    """Nothing of the body is waited for (or allocated): the header is enough to refuse."""
    b = opened(max_frame=MIN_MAX_FRAME)
    _assert_fatal(b, HEADER.pack(b"MX", 0, 0, MIN_MAX_FRAME + 1), [], "exceeds the maximum")


def test_fds_must_arrive_with_the_first_byte_of_their_frame() -> None:
    with no_fd_leak():
        b = opened()
        frame = raw_frame([1, 1, "set_call_fd", {"vector": 1}], 1)
        b.receive_data(frame[:3])
        assert b.next_event() is NEED_DATA
        _assert_fatal(b, frame[3:], [os.eventfd(0)], "declares 1 fds but 0 arrived")


def test_fds_arriving_inside_a_frame_body_are_refused_at_once() -> None:
    """A peer cannot park fds in our process by trickling a large frame."""
    with no_fd_leak():
        b = opened()
        frame = raw_frame([1, 1, "echo", {"payload": b"x" * 1000}])
        b.receive_data(frame[:100])
        assert b.next_event() is NEED_DATA
        _assert_fatal(b, frame[100:200], [os.eventfd(0)], "no frame claims")


def test_fds_of_the_next_frame_may_come_with_the_end_of_this_one() -> None:
    """recvmsg may return an fd-less frame's bytes together with the next frame's fds."""
    with no_fd_leak():
        b = opened()
        first = raw_frame([1, 1, "ping", {}])
        second = raw_frame([1, 2, "set_call_fd", {"vector": 1}], 1)
        b.receive_data(first + second[:4], [os.eventfd(0)])
        (ping,) = drain(b)
        assert isinstance(ping, Request) and ping.id == 1
        b.receive_data(second[4:])
        (call,) = drain(b)
        assert isinstance(call, Request) and len(call.fds) == 1
        close_all(call.fds)


def test_end_of_stream() -> None:
    b = opened()
    b.receive_data(b"")
    assert drain(b) == [Closing("peer closed the connection")]
    assert b.state is State.CLOSED
    with no_fd_leak():
        b = opened()
        frame = raw_frame([1, 1, "set_call_fd", {"vector": 1}], 1)
        b.receive_data(frame[:-1], [os.eventfd(0)])
        assert b.next_event() is NEED_DATA
        _assert_fatal(b, b"", [], "in the middle of a frame")


def test_fds_given_to_a_closed_connection_are_closed() -> None:
    b = opened()
    b.close()
    with no_fd_leak():
        b.receive_data(b"anything", [os.eventfd(0)])


def test_closing_frame_carries_the_reason() -> None:
    a, b = connected_pair()
    b.receive_data(a.send_closing("shutting down"))
    assert drain(b) == [Closing("shutting down")]
    assert a.state is State.CLOSED and b.state is State.CLOSED
    with pytest.raises(ConnectionClosed):
        a.send_request(Ping())


def test_closing_can_be_sent_after_a_protocol_error() -> None:
    b = opened()
    b.receive_data(b"garbage!")
    with pytest.raises(ProtocolError) as caught:
        drain(b)
    a = opened()
    a.receive_data(b.send_closing(str(caught.value)))
    (closing,) = drain(a)
    assert isinstance(closing, Closing) and "bad frame magic" in closing.reason


# --- handshake ---------------------------------------------------------------------------------


def test_version_mismatch_names_both_versions() -> None:
    b = Connection("device")
    b.receive_data(raw_frame([0, hello_wire(version=PROTOCOL_VERSION + 1)]))
    with pytest.raises(VersionMismatch) as caught:
        b.next_event()
    assert (caught.value.ours, caught.value.theirs) == (PROTOCOL_VERSION, PROTOCOL_VERSION + 1)
    assert f"we speak {PROTOCOL_VERSION}" in str(caught.value)
    assert f"peer sent {PROTOCOL_VERSION + 1}" in str(caught.value)
    assert b.state is State.CLOSED


@pytest.mark.parametrize(
    ("data", "nfds", "match"),
    [
        (raw_frame([1, 1, "ping", {}]), 0, "first frame must be hello"),
        (raw_frame([0, hello_wire(role="guest")]), 0, "bad hello"),
        (raw_frame([0, hello_wire(max_fds=254)]), 0, "bad hello"),
        (raw_frame([0, hello_wire(max_frame=MIN_MAX_FRAME - 1)]), 0, "below the minimum"),
        (raw_frame([0, hello_wire(surprise=1)]), 0, "bad hello"),
        (raw_frame([0, {k: v for k, v in hello_wire().items() if k != "version"}]), 0, "bad hello"),
        (raw_frame([0, hello_wire(version=True)]), 0, "bad hello"),
        (raw_frame([0, "hello"]), 0, "bad hello"),
        (raw_frame([0, hello_wire()], 1), 1, "hello carries no fds"),
    ],
)
def test_a_bad_hello_is_a_protocol_error(data: bytes, nfds: int, match: str) -> None:
    with no_fd_leak():
        _assert_fatal(Connection("device"), data, [os.eventfd(0) for _ in range(nfds)], match)


def test_a_peer_may_refuse_us_before_its_hello() -> None:
    b = Connection("device")
    b.receive_data(raw_frame([5, "too many connections"]))
    assert drain(b) == [Closing("too many connections")]


def test_hello_negotiates_limits_down_never_up() -> None:
    a, b = connected_pair({"max_frame": 1 << 16, "max_fds": 8}, {"max_frame": 1 << 20})
    assert (a.send_max_frame, a.send_max_fds) == (1 << 16, 8)
    assert (b.send_max_frame, b.send_max_fds) == (1 << 16, 8)
    with pytest.raises(MessageError) as caught:
        b.send_request(Echo(b"x" * (1 << 16)))
    assert caught.value.code == "bad-range" and "exceeds the peer's maximum" in str(caught.value)
    a.receive_data(b.send_request(Echo(b"fits"))[1])  # still usable
    assert isinstance(drain(a)[0], Request)


def test_a_peer_without_fd_passing_gets_no_fds() -> None:
    a, b = connected_pair(b_options={"fd_passing": False})
    with pytest.raises(FdPassingUnsupported) as caught:
        a.send_request(SetCallFd(1), [0])
    assert isinstance(caught.value, MessageError) and caught.value.code == "unsupported"
    with pytest.raises(FdPassingUnsupported):
        b.send_request(SetCallFd(1), [0])
    a.send_request(Ping())  # still usable


def test_connection_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        Connection("vmm", max_frame=MIN_MAX_FRAME - 1)
    with pytest.raises(ValueError, match="max_fds"):
        Connection("vmm", max_fds=254)
    with pytest.raises(ValueError, match="role"):
        Connection("guest")  # type: ignore[arg-type]


# --- request ids -------------------------------------------------------------------------------


def test_replies_in_any_order_match_their_requests_by_id() -> None:
    a, b = connected_pair()
    ids = []
    for value in range(20):
        request_id, wire = a.send_request(BarRead(0, value * 8, 8))
        ids.append(request_id)
        b.receive_data(wire)
    requests = drain(b)
    for request in reversed(requests):
        assert isinstance(request.body, BarRead)
        a.receive_data(b.send_reply(request, Value(request.body.offset)))
    replies = drain(a)
    assert [r.id for r in replies] == list(reversed(ids))
    assert all(
        r.body.value == req.body.offset for r, req in zip(replies, reversed(requests), strict=True)
    )


def test_a_late_reply_to_a_forgotten_request_is_dropped_with_its_fds() -> None:
    a, b = connected_pair()
    request_id, wire = a.send_request(Attach("blk0"))
    b.receive_data(wire)
    (request,) = drain(b)
    a.forget(request_id)
    with no_fd_leak():
        kicks = [os.eventfd(0), os.eventfd(0)]
        a.receive_data(b.send_reply(request, Attached(info(2)), kicks), kicks)
        assert a.next_event() is NEED_DATA
        assert not any(is_open(fd) for fd in kicks)
    a.receive_data(raw_frame([3, request_id, "x", "y"]))  # only once: now it is unknown
    with pytest.raises(ProtocolError, match="unknown request id"):
        drain(a)


def test_a_late_error_reply_is_dropped_too() -> None:
    a, _ = connected_pair()
    request_id, _ = a.send_request(Ping())
    a.forget(request_id)
    a.receive_data(raw_frame([3, request_id, "timeout", "too late"]))
    assert a.next_event() is NEED_DATA
    assert a.state is State.OPEN


def test_only_the_most_recent_forgotten_ids_are_remembered() -> None:
    a, _ = connected_pair()
    ids = [a.send_request(Ping())[0] for _ in range(MAX_FORGOTTEN + 1)]
    for request_id in ids:
        a.forget(request_id)
    a.receive_data(raw_frame([2, ids[-1], {}]))
    assert a.next_event() is NEED_DATA
    a.receive_data(raw_frame([2, ids[0], {}]))
    with pytest.raises(ProtocolError, match="unknown request id"):
        a.next_event()


def test_an_error_not_tied_to_a_request_uses_id_zero() -> None:
    a = opened()
    a.receive_data(raw_frame([3, 0, "internal", "hub is shutting down"]))
    assert drain(a) == [ErrorReply(0, "internal", "hub is shutting down")]


# --- the sending side --------------------------------------------------------------------------


def test_sending_checks_kinds_and_fd_counts() -> None:
    a, b = connected_pair()
    with pytest.raises(TypeError, match="notice"):
        a.send_request(Irq("d", 1, 0, 0))
    with pytest.raises(TypeError, match="request"):
        a.send_notice(Ping())
    with pytest.raises(ValueError, match="carries 1 fds, 0 given"):
        a.send_request(SetCallFd(1))
    with pytest.raises(TypeError, match="not a registered"):
        a.send_request(Region(0, 0, 0))
    b.receive_data(a.send_request(Ping())[1])
    (request,) = drain(b)
    with pytest.raises(TypeError, match="replies with Empty"):
        b.send_reply(request, Ping())
    assert isinstance(b.send_reply(request, Empty()), bytes)


def test_too_many_fds_for_the_peer_is_refused_before_sending() -> None:
    a, _ = connected_pair(b_options={"max_fds": 1})
    with pytest.raises(MessageError, match="at most 1"):
        a.send_request(SetMemTable([Region(0, 1, 0), Region(1, 1, 0)]), [0, 1])


# --- the frame decoder alone ---------------------------------------------------------------


def test_decoder_close_closes_claimed_and_unclaimed_fds() -> None:
    with no_fd_leak():
        decoder = FrameDecoder()
        frame = raw_frame([1, 1, "set_call_fd", {"vector": 1}], 1)
        decoder.feed(frame[:10], [os.eventfd(0)])
        assert decoder.next_frame() is None
        assert decoder.held_fds == 1
        decoder.close()
        assert decoder.held_fds == 0


def test_the_codec_is_sans_io() -> None:
    """The core imports no event loop and no sockets: anything that moves bytes can drive it."""
    code = (
        "import sys, msixhub.protocol.connection, msixhub.protocol.messages;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'socket', 'select')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr
