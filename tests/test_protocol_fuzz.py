"""Hostile input never raises anything but ProtocolError, and every fd handed to the
connection ends closed exactly once (by it, or by whoever took the event that carried it)."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msixhub.protocol.connection import NEED_DATA, Closing, Connection, State
from msixhub.protocol.errors import ConnectionClosed, ProtocolError
from msixhub.protocol.fds import close_all
from msixhub.protocol.frame import HEADER, MAGIC
from msixhub.protocol.messages import Echo, Irq, Ping, Region, SetCallFd, SetMemTable
from msixhub.protocol.ops import OPS
from protocol_helpers import is_open, raw_frame

# MSIXHUB_FUZZ_EXAMPLES=100000 for a long hunt; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("MSIXHUB_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _valid_stream() -> tuple[bytes, dict[int, int]]:
    """A peer's frames from its hello on, and where each frame starts -> its fd count."""
    a = Connection("vmm")
    a.receive_data(Connection("device").hello())
    a.next_event()
    frames = [
        (a.hello(), 0),
        (a.send_request(Ping())[1], 0),
        (a.send_request(SetCallFd(3), [0])[1], 1),
        (a.send_notice(Irq("blk0", 1, 0xFEE0_0000, 0x41)), 0),
        (a.send_request(SetMemTable([Region(0, 4096, 0), Region(8192, 4096, 0)]), [0, 1])[1], 2),
        (a.send_request(Echo(b"payload"))[1], 0),
    ]
    starts, offset = {}, 0
    for data, nfds in frames:
        starts[offset] = nfds
        offset += len(data)
    return b"".join(data for data, _ in frames), starts


VALID, VALID_STARTS = _valid_stream()


def _run(chunks: list[tuple[bytes, int]]) -> None:
    """Feed hostile chunks (each with that many fresh fds); only ProtocolError may escape,
    and no fd may be left open afterwards."""
    connection = Connection("device")
    given_fds: list[int] = []
    try:
        for data, nfds in chunks:
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
            given_fds.extend(fds)
            connection.receive_data(data, fds)
            while connection.state is not State.CLOSED:
                event = connection.next_event()
                if event is NEED_DATA:
                    break
                close_all(list(getattr(event, "fds", [])))  # the taker's duty
                if isinstance(event, Closing):
                    break
    except ProtocolError:
        assert connection.state is State.CLOSED
        with pytest.raises(ConnectionClosed):
            connection.next_event()
    finally:
        connection.close()
    assert not [fd for fd in given_fds if is_open(fd)], "an fd given to the connection is open"


@FUZZ
@given(data=st.binary(max_size=512), nfds=st.integers(0, 3))
def test_random_bytes(data: bytes, nfds: int) -> None:
    _run([(data, nfds)])


@FUZZ
@given(data=st.binary(max_size=256), nfds=st.integers(0, 3))
def test_random_bytes_after_a_valid_hello(data: bytes, nfds: int) -> None:
    hello_end = sorted(VALID_STARTS)[1]
    _run([(VALID[:hello_end], 0), (data, nfds)])


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.sampled_from([*OPS, "version", "role", "vector", "payload", "regions"]),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=10) | st.sampled_from(["vector", "payload"]), inner, max_size=5
        )
    ),
    max_leaves=12,
)
_envelopes = st.one_of(
    _msgpack_values,
    st.tuples(st.integers(-1, 7), st.integers(-2, 4)).flatmap(
        lambda head: st.lists(_msgpack_values, max_size=4).map(
            lambda rest: [head[0], head[1], *rest]
        )
    ),
    st.lists(_msgpack_values, max_size=4).map(lambda rest: [1, 1, *rest]),
)


@FUZZ
@given(envelopes=st.lists(st.tuples(_envelopes, st.integers(0, 2)), max_size=6))
def test_well_framed_random_envelopes(envelopes: list[tuple[Any, int]]) -> None:
    """Framing intact, bodies hostile: exercises everything past the frame decoder."""
    hello_end = sorted(VALID_STARTS)[1]
    chunks = [(VALID[:hello_end], 0)]
    chunks += [(raw_frame(envelope, nfds), nfds) for envelope, nfds in envelopes]
    _run(chunks)


@st.composite
def _mutated(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    stream = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(stream) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "header"]))
        if action == "flip":
            stream[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            stream[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del stream[at : at + draw(st.integers(1, 8))]
        elif action == "truncate":
            del stream[at:]
        else:  # a plausible header with hostile counts
            stream[at:at] = HEADER.pack(
                MAGIC, 0, draw(st.integers(0, 255)), draw(st.integers(0, 2**32 - 1))
            )
        if not stream:
            stream += b"\x00"
    cuts = sorted({0, len(stream), *draw(st.lists(st.integers(0, len(stream)), max_size=6))})
    chunks = []
    for lo, hi in itertools.pairwise(cuts):
        nfds = sum(n for start, n in VALID_STARTS.items() if lo <= start < hi)
        chunks.append((bytes(stream[lo:hi]), draw(st.sampled_from([nfds, nfds, 0, nfds + 1]))))
    return chunks


@FUZZ
@given(chunks=_mutated())
def test_mutated_valid_streams(chunks: list[tuple[bytes, int]]) -> None:
    _run(chunks)


def test_the_unmutated_stream_is_accepted_whole() -> None:
    """The fuzzers' seed really is valid: all of it decodes, with its fds."""
    connection = Connection("device")
    fds = [os.eventfd(0) for _ in range(sum(VALID_STARTS.values()))]
    connection.receive_data(VALID, fds)
    events = []
    while (event := connection.next_event()) is not NEED_DATA:
        events.append(event)
    assert len(events) == len(VALID_STARTS)
    for event in events:
        close_all(list(getattr(event, "fds", [])))
    assert not any(is_open(fd) for fd in fds)
