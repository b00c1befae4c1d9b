"""Shared helpers of the protocol tests: Hypothesis strategies derived from the message field
types (so a new message is covered the day it is declared), connected sans-IO pairs, and an
fd census."""

from __future__ import annotations

import array
import dataclasses
import os
import socket
import types
import typing
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgpack
import trio
from hypothesis import strategies as st
from msixhub.protocol import messages
from msixhub.protocol.connection import NEED_DATA, Closing, Connection, Event, PeerHello, State
from msixhub.protocol.errors import ConnectionClosed, ProtocolError
from msixhub.protocol.fds import close_all
from msixhub.protocol.frame import HEADER, MAGIC, FrameDecoder
from msixhub.protocol.messages import Role
from msixhub.protocol.ops import OPS, Empty
from msixhub.protocol.peer import Peer, open_peer
from msixhub.protocol.schema import MaxLen, Message, Opaque, Range
from msixhub.protocol.transport import Transport

MAX_ITEMS = 3  # keep generated lists short: the point is types and bounds, not volume

MESSAGE_TYPES: list[type[Message]] = sorted(
    {
        obj
        for obj in [Empty, *vars(messages).values()]
        if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message
    },
    key=lambda cls: cls.__name__,
)

_opaque_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """Values the wire may carry for a field declared ``hint`` (bounds included)."""
    bounds: list[Any] = []
    if get_origin(hint) is Annotated:
        hint, *bounds = get_args(hint)
    limit = next((b.limit for b in bounds if isinstance(b, MaxLen)), None)
    origin = get_origin(hint)
    if hint is bool:
        return st.booleans()
    if hint is int:
        rng = next((b for b in bounds if isinstance(b, Range)), None)
        return st.integers(rng.low, rng.high) if rng else st.integers(-(2**63), 2**64 - 1)
    if hint is float:
        return st.floats(allow_nan=False)
    if hint is str:
        return st.text(max_size=limit if limit is not None else 32)
    if hint is bytes:
        return st.binary(max_size=min(limit, 256) if limit is not None else 256)
    if hint is Opaque:
        return st.dictionaries(st.text(max_size=8), _opaque_values, max_size=4).map(Opaque)
    if origin is Literal:
        return st.sampled_from(get_args(hint))
    if origin is list:
        (item,) = get_args(hint)
        size = MAX_ITEMS if limit is None else min(limit, MAX_ITEMS)
        return st.lists(strategy_for(item), max_size=size)
    if origin in (Union, types.UnionType):
        (some,) = [a for a in get_args(hint) if a is not type(None)]
        return st.none() | strategy_for(some)
    if isinstance(hint, type) and issubclass(hint, Message):
        return message_strategy(hint)
    raise TypeError(f"no strategy for {hint!r}")


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return st.builds(cls, **fields)


def all_ops() -> list[str]:
    return sorted(OPS)


def connected_pair(
    a_options: dict[str, Any] | None = None, b_options: dict[str, Any] | None = None
) -> tuple[Connection, Connection]:
    """Two sans-IO connections past the handshake."""
    a = Connection("vmm", name="a", **(a_options or {}))
    b = Connection("device", name="b", **(b_options or {}))
    b.receive_data(a.hello())
    a.receive_data(b.hello())
    assert isinstance(a.next_event(), PeerHello)
    assert isinstance(b.next_event(), PeerHello)
    return a, b


def drain(connection: Connection) -> list[Event]:
    """Every event available without more data (up to a Closing, the last one)."""
    events: list[Event] = []
    while (event := connection.next_event()) is not NEED_DATA:
        events.append(event)  # type: ignore[arg-type]
        if isinstance(event, Closing):
            break
    return events


def open_fd_numbers() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextmanager
def no_fd_leak() -> Iterator[None]:
    """Fail if the block leaves more fds open than it found."""
    before = open_fd_numbers()
    yield
    leaked = open_fd_numbers() - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"


def dup_all(fds: list[int]) -> list[int]:
    """What the kernel does on receipt: new fd numbers for the same files."""
    return [os.dup(fd) for fd in fds]


def raw_frame(
    envelope: Any,
    nfds: int = 0,
    *,
    magic: bytes = MAGIC,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame built by hand, so tests can break any part of it."""
    body = msgpack.packb(envelope, use_bin_type=True)
    return HEADER.pack(magic, flags, nfds, len(body) if length is None else length) + body


@asynccontextmanager
async def peer_pair(
    server_options: dict[str, Any] | None = None, client_options: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Peer, Peer]]:
    """A client ("vmm") and a server ("device") Peer over a unix socketpair, both served."""
    client_sock, server_sock = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_ready: list[Peer] = []
    ready = trio.Event()

    async def run_server() -> None:
        async with open_peer(Transport(server_sock), "device", **(server_options or {})) as peer:
            server_ready.append(peer)
            ready.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        async with open_peer(Transport(client_sock), "vmm", **(client_options or {})) as client:
            with trio.fail_after(5):
                await ready.wait()
            yield client, server_ready[0]
        nursery.cancel_scope.cancel()


async def raw_handshake(sock: trio.socket.SocketType, role: Role = "device") -> Connection:
    """Play the other side by hand: send a hello, take the peer's, and return the sans-IO
    connection so the test can craft (or break) whatever comes next."""
    connection = Connection(role)
    await sock.send(connection.hello())
    while not isinstance(event := connection.next_event(), PeerHello):
        assert event is NEED_DATA
        connection.receive_data(await sock.recv(65536))
    return connection


async def read_until_closed(sock: trio.socket.SocketType, connection: Connection) -> list[Event]:
    """Everything the peer sends until it closes (the events, fds closed)."""
    events: list[Event] = []
    while True:
        try:
            new = drain(connection)
        except (ConnectionClosed, ProtocolError):
            return events
        for event in new:
            close_all(list(getattr(event, "fds", [])))
        events.extend(new)
        if connection.state is State.CLOSED:
            return events
        connection.receive_data(await sock.recv(65536))


async def read_envelopes(sock: trio.socket.SocketType, count: int) -> list[Any]:
    """The next ``count`` frames' envelopes as plain msgpack values (for a hand-driven side
    that cannot decode replies to requests it did not send through a Connection)."""
    decoder = FrameDecoder()
    envelopes: list[Any] = []
    while len(envelopes) < count:
        frame = decoder.next_frame()
        if frame is None:
            data = await sock.recv(65536)
            assert data, "the peer closed the connection"
            decoder.feed(data)
            continue
        close_all(frame.fds)
        envelopes.append(msgpack.unpackb(frame.body))
    decoder.close()
    return envelopes


def scm_rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
