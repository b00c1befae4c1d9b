"""The fault proxy at the wire: a client sends real msixhub frames through it to a recorder
that keeps every byte and fd it gets, so each fault is observed where it lands: the frame
that is missing, doubled, late, out of order, cut short or damaged, and the fds that went
with it (each copy owned once: a pipe's read end sees EOF only when every copy is closed)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import trio
from msixhub.protocol.connection import Connection
from msixhub.protocol.errors import ConnectionClosed
from msixhub.protocol.fds import OwnedFd, close_all
from msixhub.protocol.frame import HEADER, MAX_FDS_LIMIT, Frame, FrameDecoder
from msixhub.protocol.messages import Notify, Ping, Region, SetMemTable, StatusQuery
from msixhub.protocol.peer import connect_unix
from msixhub.protocol.transport import Transport
from msixhub.server.serve import bind_unix
from msixhub.testing.proxy import (
    CloseAfter,
    Corrupt,
    Delay,
    Drop,
    Duplicate,
    FaultProxy,
    FaultRule,
    FaultRuleError,
    Reorder,
    Truncate,
    classify,
    fault_proxy,
)

TIMEOUT = 10.0


@dataclass
class Recording:
    """What the upstream end received, until the stream ended."""

    frames: list[Frame] = field(default_factory=list)
    ended_inside_frame: bool = False
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def ops(self) -> list[str | None]:
        return [classify(frame.body).op for frame in self.frames]


async def _record(listener: trio.socket.SocketType, recording: Recording) -> None:
    sock, _ = await listener.accept()
    transport = Transport(sock)
    decoder = FrameDecoder(1 << 20, MAX_FDS_LIMIT)
    try:
        while True:
            data, fds = await transport.receive()
            decoder.feed(data, fds)
            while (frame := decoder.next_frame()) is not None:
                recording.frames.append(frame)
            if not data:
                recording.ended_inside_frame = decoder.buffered > 0
                return
    except ConnectionClosed:
        return
    finally:
        decoder.close()
        await transport.aclose()
        recording.done.set()


@dataclass
class Wire:
    proxy: FaultProxy
    recording: Recording
    client: Transport
    connection: Connection

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        await self.client.send(data, fds)

    async def finish(self) -> Recording:
        """Close the client's end and wait until the recorder saw the end of the stream."""
        await self.client.aclose()
        with trio.fail_after(TIMEOUT):
            await self.recording.done.wait()
        return self.recording


@asynccontextmanager
async def wire(tmp_path: Path, rules: Sequence[FaultRule], seed: int = 1) -> AsyncIterator[Wire]:
    recording = Recording()
    listener = await bind_unix(str(tmp_path / "upstream.sock"))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_record, listener, recording)
            async with fault_proxy(
                tmp_path / "upstream.sock", tmp_path / "proxy.sock", rules, seed=seed
            ) as proxy:
                client = await connect_unix(proxy.path)
                try:
                    yield Wire(proxy, recording, client, Connection("device"))
                finally:
                    await client.aclose()
                    for frame in recording.frames:
                        close_all(frame.fds)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()


def notify(connection: Connection, vector: int) -> bytes:
    return connection.send_notice(Notify(vector))


def pipe() -> tuple[OwnedFd, OwnedFd]:
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return OwnedFd(read, "pipe-r"), OwnedFd(write, "pipe-w")


def at_eof(read_end: OwnedFd) -> bool:
    """True once every write end of the pipe is closed (nothing was written to it)."""
    try:
        return os.read(read_end.fileno(), 1) == b""
    except BlockingIOError:
        return False


def mem_table_request(connection: Connection, fd: OwnedFd) -> bytes:
    _, data = connection.send_request(SetMemTable([Region(0, 4096, 0)]), [fd.fileno()])
    return data


# --- frames and fds pass unchanged -------------------------------------------------------------


async def test_frames_and_fds_pass_through_unchanged(tmp_path: Path) -> None:
    read_end, write_end = pipe()
    async with wire(tmp_path, []) as w:
        sent = [w.connection.hello(), mem_table_request(w.connection, write_end)]
        _, ping = w.connection.send_request(Ping())
        sent.append(ping)
        await w.send(sent[0])
        await w.send(sent[1], [write_end.fileno()])
        await w.send(sent[2])
        write_end.close()
        recording = await w.finish()
        received = [
            HEADER.pack(b"MX", 0, len(f.fds), len(f.body)) + f.body for f in recording.frames
        ]
        assert received == sent
        assert recording.ops == ["hello", "set_mem_table", "ping"]
        (passed,) = recording.frames[1].fds
        os.write(passed.fileno(), b"x")  # the fd that arrived is the pipe we sent
        assert os.read(read_end.fileno(), 1) == b"x"
        assert w.proxy.events == []
        assert w.proxy.seen[("to_hub", "set_mem_table")] == 1
        passed.close()
        assert at_eof(read_end)  # the proxy kept no copy
    read_end.close()


# --- each fault, seen from the receiving end --------------------------------------------------


async def test_drop_loses_the_frame_and_closes_its_fds(tmp_path: Path) -> None:
    read_end, write_end = pipe()
    rules = [FaultRule(Drop(), op="set_mem_table")]
    async with wire(tmp_path, rules) as w:
        await w.send(mem_table_request(w.connection, write_end), [write_end.fileno()])
        write_end.close()
        (event,) = await w.proxy.wait_for("drop")
        assert (event.op, event.kind, event.nfds, event.direction) == (
            "set_mem_table",
            "request",
            1,
            "to_hub",
        )
        assert at_eof(read_end)  # no copy of the write end is left anywhere
        await w.send(notify(w.connection, 3))
        recording = await w.finish()
        assert recording.ops == ["notify"]
    read_end.close()


async def test_duplicate_sends_twice_each_copy_with_its_own_fds(tmp_path: Path) -> None:
    read_end, write_end = pipe()
    rules = [FaultRule(Duplicate(), op="set_mem_table")]
    async with wire(tmp_path, rules) as w:
        data = mem_table_request(w.connection, write_end)
        await w.send(data, [write_end.fileno()])
        write_end.close()
        recording = await w.finish()
        first, second = recording.frames
        assert first.body == second.body == data[HEADER.size :]
        (fd1,), (fd2,) = first.fds, second.fds
        assert fd1.fileno() != fd2.fileno()
        assert os.fstat(fd1.fileno()).st_ino == os.fstat(fd2.fileno()).st_ino
        fd1.close()
        assert not at_eof(read_end)  # the second copy is still open
        fd2.close()
        assert at_eof(read_end)  # and there was no third
        assert [e.action for e in w.proxy.events] == ["duplicate"]
    read_end.close()


async def test_reorder_sends_the_frame_after_the_next_one(tmp_path: Path) -> None:
    rules = [FaultRule(Reorder(), op="notify", times=1)]
    async with wire(tmp_path, rules) as w:
        for vector in (0, 1, 2):
            await w.send(notify(w.connection, vector))
        recording = await w.finish()
    assert [_notify_vector(f) for f in recording.frames] == [1, 0, 2]
    (held,) = w.proxy.events
    assert (held.action, held.frame, held.detail) == ("reorder", 0, "held")


async def test_reorder_releases_a_held_frame_when_none_follows(tmp_path: Path) -> None:
    rules = [FaultRule(Reorder(hold=0.05), op="notify")]
    async with wire(tmp_path, rules) as w:
        await w.send(notify(w.connection, 7))
        released = await w.proxy.wait_for("reorder", count=2)
        assert released[1].detail == "released: no frame followed"
        recording = await w.finish()
    assert [_notify_vector(f) for f in recording.frames] == [7]


async def test_delay_holds_the_frame_and_those_behind_it(tmp_path: Path) -> None:
    rules = [FaultRule(Delay(0.3), op="notify", times=1)]
    async with wire(tmp_path, rules) as w:
        start = trio.current_time()
        await w.send(notify(w.connection, 0))
        await w.send(notify(w.connection, 1))
        recording = await w.finish()
        assert trio.current_time() - start >= 0.3
    assert [_notify_vector(f) for f in recording.frames] == [0, 1]  # order is kept
    assert [e.detail for e in w.proxy.events] == ["0.3s"]


async def test_truncate_cuts_the_frame_and_ends_the_stream(tmp_path: Path) -> None:
    rules = [FaultRule(Truncate(), op="status")]
    async with wire(tmp_path, rules) as w:
        await w.send(notify(w.connection, 0))
        _, data = w.connection.send_request(StatusQuery())
        await w.send(data)
        with trio.fail_after(TIMEOUT):
            await w.recording.done.wait()
        with pytest.raises(ConnectionClosed):  # the proxy closed the client's side too
            with trio.fail_after(TIMEOUT):
                while True:
                    await w.send(notify(w.connection, 1))
        recording = w.recording
    assert recording.ops == ["notify"]
    assert recording.ended_inside_frame
    (event,) = w.proxy.events
    assert event.action == "truncate" and event.op == "status"


@pytest.mark.parametrize("bits", [1, 5])
async def test_corrupt_flips_exactly_the_bits_it_says(tmp_path: Path, bits: int) -> None:
    rules = [FaultRule(Corrupt(bits=bits), op="notify", after=1, times=1)]
    async with wire(tmp_path, rules, seed=bits) as w:
        originals = [notify(w.connection, v) for v in (0, 1, 2)]
        for data in originals:
            await w.send(data)
        recording = await w.finish()
    received = [HEADER.pack(b"MX", 0, 0, len(f.body)) + f.body for f in recording.frames]
    assert received[0] == originals[0] and received[2] == originals[2]
    flipped = sum(bin(a ^ b).count("1") for a, b in zip(originals[1], received[1], strict=True))
    (event,) = w.proxy.events
    # Two flips of one bit cancel out; the event names every flip.
    assert flipped <= bits and flipped % 2 == bits % 2
    assert received[1][: HEADER.size] == originals[1][: HEADER.size]  # body only by default
    assert event.detail.startswith("flipped bits")


async def test_close_after_n_frames(tmp_path: Path) -> None:
    rules = [FaultRule(CloseAfter(2), op="notify")]
    async with wire(tmp_path, rules) as w:
        await w.send(w.connection.hello())
        for vector in range(2):
            await w.send(notify(w.connection, vector))
        with trio.fail_after(TIMEOUT):
            await w.recording.done.wait()
        recording = w.recording
        assert recording.ops == ["hello", "notify", "notify"]
        assert not recording.ended_inside_frame
        (event,) = w.proxy.events
        assert event.action == "close" and event.frame == 2


# --- rules ------------------------------------------------------------------------------------


async def test_probability_after_and_times_are_reproducible_from_the_seed(
    tmp_path: Path,
) -> None:
    async def dropped(seed: int, directory: Path) -> list[int]:
        directory.mkdir()
        rules = [FaultRule(Drop(), op="notify", probability=0.5, after=2, times=5)]
        async with wire(directory, rules, seed=seed) as w:
            for vector in range(40):
                await w.send(notify(w.connection, vector))
            recording = await w.finish()
        kept = {_notify_vector(f) for f in recording.frames}
        return sorted(set(range(40)) - kept)

    first = await dropped(11, tmp_path / "a")
    assert first == await dropped(11, tmp_path / "b")
    assert len(first) == 5 and min(first) >= 2
    assert first != await dropped(12, tmp_path / "c")


def test_rules_refuse_impossible_settings() -> None:
    for bad in (
        lambda: FaultRule(Drop(), probability=1.5),
        lambda: FaultRule(Drop(), direction="sideways"),  # type: ignore[arg-type]
        lambda: FaultRule(Drop(), times=0),
        lambda: FaultRule(Delay(-1)),
        lambda: FaultRule(CloseAfter(0)),
        lambda: FaultRule(Corrupt(bits=0)),
        lambda: FaultRule(Reorder(hold=0)),
    ):
        with pytest.raises(FaultRuleError):
            bad()


def test_classify_names_frames() -> None:
    connection = Connection("vmm")
    assert classify(connection.hello()[HEADER.size :]).kind == "hello"
    _, data = connection.send_request(Ping())
    info = classify(data[HEADER.size :])
    assert (info.kind, info.op, info.request_id) == ("request", "ping", 1)
    assert classify(b"\xc1").kind == "unknown"


def _notify_vector(frame: Frame) -> int:
    envelope = msgpack.unpackb(frame.body)
    return int(envelope[2]["vector"])
