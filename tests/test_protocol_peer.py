"""The trio peer over real sockets: ids, concurrency, timeouts, refusals, a peer that stops
reading, a peer that speaks another version or breaks the framing, and TCP's lack of fds."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from msixhub.protocol.connection import PROTOCOL_VERSION, Closing, Connection, Notice, Request
from msixhub.protocol.errors import (
    ConnectionClosed,
    ErrorCode,
    FdPassingUnsupported,
    MessageError,
    ProtocolError,
    RemoteError,
    VersionMismatch,
)
from msixhub.protocol.fds import OwnedFd, close_all, eventfd, eventfd_read, eventfd_write
from msixhub.protocol.frame import DEFAULT_MAX_FRAME, HEADER
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
    SetCallFd,
    Value,
)
from msixhub.protocol.ops import Empty
from msixhub.protocol.peer import Peer, connect_tcp, handshake, open_peer
from msixhub.protocol.schema import Message
from msixhub.protocol.transport import Transport
from protocol_helpers import (
    no_fd_leak,
    peer_pair,
    raw_frame,
    raw_handshake,
    read_envelopes,
    read_until_closed,
    scm_rights,
)

INFO = DeviceInfo("blk0", "virtio-blk", 4, 2, [Bar(1, 4096)], MsixLayout(1, 0, 2048))


async def echo(peer: Peer, request: Request) -> Message:
    return request.body


# --- requests and replies ----------------------------------------------------------------------


@pytest.mark.parametrize("inline", [False, True])
async def test_request_and_reply(inline: bool) -> None:
    async with peer_pair({"on_request": echo, "inline_requests": inline}) as (client, _):
        with trio.fail_after(5):
            assert await client.call(Echo(b"abc")) == Echo(b"abc")


async def test_many_requests_in_flight_are_matched_by_id() -> None:
    """50 requests at once, answered in reverse order: each caller gets its own reply."""
    count = 50
    arrived: list[int] = []
    gates: dict[int, trio.Event] = {}
    all_arrived = trio.Event()

    async def held(peer: Peer, request: Request) -> Message:
        assert isinstance(request.body, BarRead)
        offset = request.body.offset
        gates[offset] = trio.Event()
        arrived.append(offset)
        if len(arrived) == count:
            all_arrived.set()
        await gates[offset].wait()
        return Value(offset * 3)

    results: dict[int, int] = {}

    async def ask(client: Peer, offset: int) -> None:
        reply = await client.call(BarRead(0, offset, 4))
        assert isinstance(reply, Value)
        results[offset] = reply.value

    async with peer_pair({"on_request": held}) as (client, _):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for offset in range(count):
                    nursery.start_soon(ask, client, offset)
                await all_arrived.wait()
                assert client.connection.outstanding == count
                for offset in reversed(range(count)):
                    gates[offset].set()
                    await trio.testing.wait_all_tasks_blocked()
    assert results == {offset: offset * 3 for offset in range(count)}


async def test_errors_are_structured_and_the_connection_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def picky(peer: Peer, request: Request) -> Message:
        if isinstance(request.body, BarRead):
            raise MessageError(ErrorCode.NOT_FOUND, "no such register")
        if isinstance(request.body, Echo):
            raise KeyError("a bug in the handler")
        return Empty()

    async with peer_pair({"on_request": picky}) as (client, _):
        with trio.fail_after(5):
            with pytest.raises(RemoteError) as caught:
                await client.call(BarRead(0, 0, 4))
            assert (caught.value.code, caught.value.message) == ("not-found", "no such register")
            with pytest.raises(RemoteError) as caught:
                await client.call(Echo(b""))
            assert caught.value.code == ErrorCode.INTERNAL
            assert "KeyError" in caught.value.message
            assert await client.call(Ping()) == Empty()
    assert "request handler failed on echo" in caplog.text


async def test_a_peer_that_serves_nothing_refuses_politely() -> None:
    async with peer_pair() as (client, _):
        with trio.fail_after(5), pytest.raises(RemoteError, match="unknown-op"):
            await client.call(Ping())


async def test_notices_arrive_in_order() -> None:
    got: list[int] = []
    three = trio.Event()

    async def on_notice(peer: Peer, notice: Notice) -> None:
        assert isinstance(notice.body, Irq)
        got.append(notice.body.vector)
        if len(got) == 3:
            three.set()

    async with peer_pair({"on_notice": on_notice}) as (client, _):
        with trio.fail_after(5):
            for vector in (5, 1, 9):
                await client.notify(Irq("blk0", vector, 0xFEE0_0000, vector))
            await three.wait()
    assert got == [5, 1, 9]


async def test_reply_fds_reach_the_caller_and_request_fds_stay_the_callers() -> None:
    async def attach(peer: Peer, request: Request) -> tuple[Message, list[OwnedFd]]:
        if isinstance(request.body, SetCallFd):
            eventfd_write(request.fds[0].fileno(), 7)  # then the peer closes its copy
            return Empty(), []
        return Attached(INFO), [eventfd(1), eventfd(2)]

    with no_fd_leak():
        async with peer_pair({"on_request": attach}) as (client, _):
            with trio.fail_after(5):
                reply, kicks = await client.request(Attach("blk0"))
                assert reply == Attached(INFO)
                assert [eventfd_read(fd.fileno()) for fd in kicks] == [1, 2]
                close_all(kicks)
                with eventfd() as call:
                    await client.call(SetCallFd(3), [call.fileno()])
                    assert eventfd_read(call.fileno()) == 7


async def test_an_inline_handler_cannot_wait_on_its_own_peer() -> None:
    async def calls_back(peer: Peer, request: Request) -> Message:
        await peer.call(Ping())
        return Empty()

    async with peer_pair({"on_request": calls_back, "inline_requests": True}) as (client, _):
        with trio.fail_after(5), pytest.raises(RemoteError, match="internal"):
            await client.call(Ping())


async def test_a_handler_may_call_back_when_not_inline() -> None:
    async def calls_back(peer: Peer, request: Request) -> Message:
        assert await peer.call(Echo(b"back")) == Echo(b"back")
        return Empty()

    async with peer_pair({"on_request": calls_back}, {"on_request": echo}) as (client, _):
        with trio.fail_after(5):
            assert await client.call(Ping()) == Empty()


# --- timeouts -----------------------------------------------------------------------------------


async def test_a_request_times_out_and_its_late_reply_is_dropped_with_its_fds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    entered = trio.Event()

    async def slow_attach(peer: Peer, request: Request) -> Message | tuple[Message, list[OwnedFd]]:
        if isinstance(request.body, Ping):
            return Empty()
        entered.set()
        await gate.wait()  # inline: the server reads nothing meanwhile
        return Attached(INFO), [eventfd(), eventfd()]

    with no_fd_leak():
        async with peer_pair({"on_request": slow_attach, "inline_requests": True}) as (client, _):
            with trio.fail_after(60):
                start = trio.current_time()
                with pytest.raises(trio.TooSlowError):
                    await client.request(Attach("blk0"), timeout=2)
                assert trio.current_time() - start == pytest.approx(2)
                assert client.connection.outstanding == 0
                await entered.wait()
                gate.set()
                # Served in order: when the ping's reply is here, the late reply was handled.
                assert await client.call(Ping()) == Empty()
                assert client.connection.held_fds == 0
                assert client.is_open


async def test_the_default_request_timeout_applies(autojump_clock: trio.testing.MockClock) -> None:
    async def never(peer: Peer, request: Request) -> Message:
        await trio.sleep_forever()
        raise AssertionError

    async with peer_pair({"on_request": never}, {"request_timeout": 3}) as (client, _):
        with trio.fail_after(60):
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await client.call(Ping())
            assert trio.current_time() - start == pytest.approx(3)
            assert client.is_open


async def test_a_peer_nobody_serves_still_times_out(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ta, tb = Transport(a), Transport(b)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake, tb, "device")
            connection = await handshake(ta, "vmm")
        peer = Peer(ta, connection, request_timeout=1)  # serve() never runs
        with pytest.raises(trio.TooSlowError):
            await peer.call(Ping())
        await peer.aclose()
        await tb.aclose()


async def test_a_peer_that_stops_reading_is_disconnected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The send times out, the connection closes, and only that connection suffers."""
    sock, stuck = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw_handshake, stuck)
            transport = Transport(sock)
            async with (
                open_peer(transport, "vmm", send_timeout=2, request_timeout=30) as client,
                peer_pair({"on_request": echo}) as (other, _),
            ):
                big = Echo(b"x" * (DEFAULT_MAX_FRAME - 1024))
                failures: list[BaseException] = []

                async def flood() -> None:
                    try:
                        while True:
                            await client.call(big)
                    except ConnectionClosed as exc:
                        failures.append(exc)

                async with trio.open_nursery() as flooders:
                    for _ in range(4):
                        flooders.start_soon(flood)
                    # The other connection is served while this one is stuck.
                    assert await other.call(Echo(b"alive")) == Echo(b"alive")
                assert len(failures) == 4
                assert "peer stopped reading" in client.close_reason
                assert not client.is_open
        stuck.close()


# --- sends are never torn -------------------------------------------------------------------


async def test_a_cancelled_sender_still_finishes_its_frame() -> None:
    gate = trio.Event()

    async def gated(peer: Peer, request: Request) -> Message:
        if isinstance(request.body, Ping):
            await gate.wait()  # inline: the server stops reading until the gate opens
        return request.body if isinstance(request.body, Echo) else Empty()

    async with peer_pair({"on_request": gated, "inline_requests": True}) as (client, _):
        # A small send buffer, so that the big frame below cannot go out at once.
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.call, Ping())
                await trio.testing.wait_all_tasks_blocked()
                with trio.CancelScope() as scope:

                    async def cancel_when_stuck() -> None:
                        await trio.testing.wait_all_tasks_blocked()
                        assert client._send_lock.locked()  # mid-frame, the socket full
                        scope.cancel()
                        await trio.testing.wait_all_tasks_blocked()
                        gate.set()

                    nursery.start_soon(cancel_when_stuck)
                    await client.call(Echo(b"y" * 900_000))
                assert scope.cancelled_caught
            assert await client.call(Echo(b"after")) == Echo(b"after")
            assert client.is_open


# --- a broken or foreign peer ------------------------------------------------------------------


@asynccontextmanager
async def raw_peer(**options: object) -> AsyncIterator[tuple[trio.socket.SocketType, Peer]]:
    """Our Peer on one end, a hand-driven socket (already past the handshake) on the other."""
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(raw_handshake, theirs)
        async with open_peer(Transport(ours), "vmm", **options) as peer:  # type: ignore[arg-type]
            yield theirs, peer
        theirs.close()


async def test_version_mismatch_is_explained_to_both_sides() -> None:
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    newer = Hello(PROTOCOL_VERSION + 1, "device", DEFAULT_MAX_FRAME, 64, ["fd-passing"])
    with trio.fail_after(5):
        await theirs.send(raw_frame([0, newer.to_wire()]))
        with pytest.raises(VersionMismatch) as caught:
            async with open_peer(Transport(ours), "vmm"):
                raise AssertionError("the handshake must fail")
        message = str(caught.value)
        assert f"we speak {PROTOCOL_VERSION}" in message
        assert f"peer sent {PROTOCOL_VERSION + 1}" in message
        events = await read_until_closed(theirs, Connection("device"))
    assert isinstance(events[-1], Closing) and message in events[-1].reason
    theirs.close()


async def test_an_oversize_frame_closes_the_connection_with_a_reason() -> None:
    async with raw_peer() as (theirs, peer):
        with trio.fail_after(5):
            await theirs.send(HEADER.pack(b"MX", 0, 0, DEFAULT_MAX_FRAME + 1))
            await peer.closed.wait()
            assert "exceeds the maximum" in peer.close_reason
            events = await read_until_closed(theirs, _opened_reader())
            assert isinstance(events[-1], Closing)
            assert "exceeds the maximum" in events[-1].reason
            with pytest.raises(ConnectionClosed):
                await peer.call(Ping())


def _opened_reader() -> Connection:
    """A sans-IO reader already past the handshake (the hello was read by raw_handshake)."""
    reader = Connection("device")
    reader.receive_data(Connection("vmm").hello())
    reader.next_event()
    return reader


async def test_an_fd_count_mismatch_closes_the_connection_and_the_fds() -> None:
    with no_fd_leak():
        async with raw_peer() as (theirs, peer):
            with trio.fail_after(5), eventfd() as one, eventfd() as two:
                frame = raw_frame([1, 1, "set_call_fd", {"vector": 1}], 1)
                await theirs.sendmsg([frame], scm_rights([one.fileno(), two.fileno()]))
                await peer.closed.wait()
                assert "protocol error" in peer.close_reason
                events = await read_until_closed(theirs, _opened_reader())
                assert isinstance(events[-1], Closing) and "no frame claims" in events[-1].reason


@pytest.mark.parametrize("inline", [False, True])
async def test_an_unknown_operation_is_answered_and_the_connection_stays(inline: bool) -> None:
    with no_fd_leak():
        async with raw_peer(on_request=echo, inline_requests=inline) as (theirs, peer):
            with trio.fail_after(5), eventfd() as fd:
                await theirs.sendmsg([raw_frame([1, 5, "bogus", {}], 1)], scm_rights([fd.fileno()]))
                (error,) = await read_envelopes(theirs, 1)
                assert error[:3] == [3, 5, "unknown-op"] and "bogus" in error[3]
                await theirs.send(raw_frame([1, 6, "echo", {"payload": 3}]))
                (error,) = await read_envelopes(theirs, 1)
                assert error[:3] == [3, 6, "bad-field"] and "expected bytes" in error[3]
                await theirs.send(raw_frame([1, 7, "echo", {"payload": b"still here"}]))
                assert await read_envelopes(theirs, 1) == [[2, 7, {"payload": b"still here"}]]
                assert peer.is_open


# --- TCP ----------------------------------------------------------------------------------------


async def test_tcp_cannot_carry_fds_but_stays_usable() -> None:
    async def attach(peer: Peer, request: Request) -> Message | tuple[Message, list[OwnedFd]]:
        if isinstance(request.body, Attach):
            return Attached(INFO), [eventfd(), eventfd()]
        return request.body if isinstance(request.body, Echo) else Empty()

    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with no_fd_leak(), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            served = trio.Event()

            async def serve_one() -> None:
                sock, _ = await listener.accept()
                async with open_peer(Transport(sock), "device", on_request=attach) as server:
                    assert not server.connection.fd_passing
                    await served.wait()

            nursery.start_soon(serve_one)
            async with open_peer(await connect_tcp("127.0.0.1", port), "vmm") as client:
                assert "fd-passing" not in client.peer_hello.features
                with eventfd() as call:
                    with pytest.raises(FdPassingUnsupported) as caught:
                        await client.call(SetCallFd(1), [call.fileno()])
                    assert isinstance(caught.value, MessageError)
                    assert caught.value.code == "unsupported"
                with pytest.raises(RemoteError, match="unsupported"):
                    await client.request(Attach("blk0"))  # the reply would need fds
                assert await client.call(Echo(b"tcp")) == Echo(b"tcp")
                served.set()
    listener.close()


async def test_closing_tells_the_other_side_why() -> None:
    async with peer_pair() as (client, server):
        with trio.fail_after(5):
            await client.aclose("maintenance")
            await server.closed.wait()
    assert server.close_reason == "peer closed: maintenance"


async def test_waiting_requests_fail_when_the_connection_closes() -> None:
    started = trio.Event()

    async def never(peer: Peer, request: Request) -> Message:
        started.set()
        await trio.sleep_forever()
        raise AssertionError

    async with peer_pair({"on_request": never}) as (client, server):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    with pytest.raises(ConnectionClosed):
                        await client.call(Ping())

                nursery.start_soon(ask)
                await started.wait()
                await server.aclose("going away")
    assert "going away" in client.close_reason


async def test_handshake_refuses_a_stream_that_is_not_msixhub() -> None:
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport = Transport(ours)
    with trio.fail_after(5):
        await theirs.send(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(ProtocolError, match="bad frame magic"):
            await handshake(transport, "vmm")
        await transport.aclose()
        events = await read_until_closed(theirs, Connection("device"))
    assert isinstance(events[-1], Closing) and "bad frame magic" in events[-1].reason
    theirs.close()
