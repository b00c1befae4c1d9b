"""A frame-aware fault proxy for any msixhub connection.

The proxy listens on a unix socket and connects each client it accepts to the real socket
(the hub's, usually). It parses the frames flowing each way (the framing of
``protocol/frame.py``; the msgpack envelope only to learn each frame's kind and operation),
passes the fds of each frame along with it (SCM_RIGHTS), and applies ``FaultRule``\\s::

    rules = [FaultRule(Drop(), op="irq", direction="from_hub", times=1),
             FaultRule(Delay(0.2), op="mmio_read", probability=0.5)]
    async with fault_proxy(hub.socket, tmp_path / "proxy.sock", rules, seed=seed) as proxy:
        ...connect to proxy.path instead of hub.socket...
        await proxy.wait_for("drop")          # it really happened

Replies and error replies have no operation on the wire; the proxy names them after the
request they answer (matched by request id as the frames pass), so ``op="attach"`` with
``kind="reply"`` is the hub's answer to an ``attach``.

Every fault applied is recorded as a ``FaultEvent`` in ``proxy.events``. Randomness comes
from the proxy's seed only: each stream (connection, direction) draws from its own
``random.Random`` derived from the seed, so a stream's decisions depend on the seed and on
that stream's frames, not on how the scheduler interleaved the streams.

Each fd that enters the proxy has one owner: a forwarded frame's fds are closed once they
are sent (the receiver got its own copies), a dropped frame's fds are closed, and a
duplicate owns duplicates of the original's fds.

Frames the proxy cannot parse (the endpoints are expected to speak msixhub) end the
connection, recorded as an ``unparseable`` event.
"""

from __future__ import annotations

import itertools
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgpack
import trio
from msixhub.protocol.connection import CLOSING, ERROR, HELLO, NOTICE, REPLY, REQUEST
from msixhub.protocol.errors import ConnectionClosed, ProtocolError
from msixhub.protocol.fds import OwnedFd, close_all
from msixhub.protocol.frame import HEADER, MAGIC, MAX_FDS_LIMIT, Frame, FrameDecoder
from msixhub.protocol.peer import connect_unix
from msixhub.protocol.transport import Transport
from msixhub.server.serve import bind_unix

Direction = Literal["to_hub", "from_hub"]
DIRECTIONS: tuple[Direction, Direction] = ("to_hub", "from_hub")
FrameKind = Literal["hello", "request", "reply", "error", "notice", "closing", "unknown"]
DEFAULT_MAX_FRAME = 16 << 20  # more than any peer negotiates by default (1 MiB)

_KIND_NAMES: dict[int, FrameKind] = {
    HELLO: "hello",
    REQUEST: "request",
    REPLY: "reply",
    ERROR: "error",
    NOTICE: "notice",
    CLOSING: "closing",
}


class FaultRuleError(ValueError):
    """A fault rule or action with an impossible setting."""


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drop:
    """The frame vanishes (its fds are closed)."""


@dataclass(frozen=True, slots=True)
class Delay:
    """The frame is held ``seconds`` before it is sent; frames behind it wait too (latency)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The frame is sent twice; the copy carries duplicates of the fds."""


@dataclass(frozen=True, slots=True)
class Reorder:
    """The frame is held until the next frame of its stream has passed (or ``hold`` seconds
    went by with none), then sent after it."""

    hold: float = 1.0


@dataclass(frozen=True, slots=True)
class Truncate:
    """Only a prefix of the frame is sent (fds included), then the connection is closed:
    the receiver sees the stream end in the middle of a frame."""


@dataclass(frozen=True, slots=True)
class Corrupt:
    """``bits`` random bits of the frame are flipped: in the body only (framing intact, so the
    receiver decodes a damaged message), or anywhere with ``header=True`` (framing too)."""

    bits: int = 1
    header: bool = False


@dataclass(frozen=True, slots=True)
class CloseAfter:
    """The connection is closed right after the rule's ``n``-th firing frame was sent."""

    n: int


Action = Drop | Delay | Duplicate | Reorder | Truncate | Corrupt | CloseAfter


def action_name(action: Action) -> str:
    return {
        Drop: "drop",
        Delay: "delay",
        Duplicate: "duplicate",
        Reorder: "reorder",
        Truncate: "truncate",
        Corrupt: "corrupt",
        CloseAfter: "close",
    }[type(action)]


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Apply ``action`` to frames that match ``op``, ``direction`` and ``kind`` (None: any).

    A matching frame fires the rule with ``probability``, once ``after`` matching frames have
    passed untouched, at most ``times`` times (None: no limit). Counts are shared by all the
    proxy's connections. The first rule that fires on a frame decides its fate."""

    action: Action
    op: str | None = None
    direction: Direction | None = None
    kind: FrameKind | None = None
    probability: float = 1.0
    after: int = 0
    times: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise FaultRuleError(f"probability {self.probability} is not within [0, 1]")
        if self.direction not in (None, *DIRECTIONS):
            raise FaultRuleError(f"direction must be one of {DIRECTIONS} or None")
        if self.kind not in (None, *_KIND_NAMES.values(), "unknown"):
            raise FaultRuleError(f"unknown frame kind {self.kind!r}")
        if self.after < 0 or (self.times is not None and self.times < 1):
            raise FaultRuleError("after must be >= 0 and times >= 1 (or None)")
        action = self.action
        if isinstance(action, Delay) and action.seconds < 0:
            raise FaultRuleError("a delay cannot be negative")
        if isinstance(action, Reorder) and action.hold <= 0:
            raise FaultRuleError("a reorder must hold for a positive time")
        if isinstance(action, Corrupt) and action.bits < 1:
            raise FaultRuleError("corrupt flips at least one bit")
        if isinstance(action, CloseAfter) and action.n < 1:
            raise FaultRuleError("close_after needs n >= 1")

    def matches(self, direction: Direction, kind: FrameKind, op: str | None) -> bool:
        return (
            (self.direction is None or self.direction == direction)
            and (self.kind is None or self.kind == kind)
            and (self.op is None or self.op == op)
        )


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One fault the proxy applied. ``frame`` counts the frames of that stream (0: hello);
    -1 for a held frame sent early (no frame followed in time, or the stream ended)."""

    connection: int
    direction: Direction
    frame: int
    kind: FrameKind
    op: str | None
    action: str
    nfds: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class FrameInfo:
    kind: FrameKind
    op: str | None
    request_id: int | None


def classify(body: bytes) -> FrameInfo:
    """What a frame body is, as far as its envelope says (never raises)."""
    try:
        envelope = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return FrameInfo("unknown", None, None)
    if not isinstance(envelope, list) or not envelope or type(envelope[0]) is not int:
        return FrameInfo("unknown", None, None)
    kind = _KIND_NAMES.get(envelope[0], "unknown")
    second = envelope[1] if len(envelope) > 1 else None
    if kind == "request" and len(envelope) == 4 and isinstance(envelope[2], str):
        return FrameInfo(kind, envelope[2], second if type(second) is int else None)
    if kind == "notice" and len(envelope) == 3 and isinstance(second, str):
        return FrameInfo(kind, second, None)
    if kind in ("reply", "error") and type(second) is int:
        return FrameInfo(kind, None, second)
    if kind in ("hello", "closing"):
        return FrameInfo(kind, kind, None)
    return FrameInfo("unknown", None, None)


# --- the proxy -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Stream:
    """One direction of one connection."""

    connection: int
    direction: Direction
    source: Transport
    sink: Transport
    rng: random.Random
    frames: int = 0
    held: list[Frame] = field(default_factory=list)
    hold_deadline: float = float("inf")


@dataclass(eq=False)
class _Pending:
    """A request seen passing: the operation its replies are named after, and how many
    replies it still expects (two once it was duplicated)."""

    op: str | None
    replies: int = 1


@dataclass(eq=False)
class _RuleState:
    rule: FaultRule
    matched: int = 0
    fired: int = 0


class _CloseLink(Exception):
    """Raised inside a pump: the connection must end now (a fault or a broken stream)."""


class FaultProxy:
    """Accepts clients on ``path`` and relays each to ``upstream``, applying the rules."""

    def __init__(
        self,
        upstream: str | Path,
        path: str | Path,
        rules: Sequence[FaultRule] = (),
        *,
        seed: int,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.upstream = str(upstream)
        self.path = str(path)
        self.seed = seed
        self.max_frame = max_frame
        self.events: list[FaultEvent] = []
        self.seen: Counter[tuple[Direction, str | None]] = Counter()
        self.connections = 0
        self._rules: list[_RuleState] = []
        self._connection_ids = itertools.count()
        # the requests awaiting replies, by id, per (connection, direction the request went)
        self._requests: dict[tuple[int, Direction], dict[int, _Pending]] = {}
        self._new_event = trio.lowlevel.ParkingLot()
        self.set_rules(rules)

    def set_rules(self, rules: Sequence[FaultRule]) -> None:
        """Replace the rules (their counts start again from zero)."""
        self._rules = [_RuleState(rule) for rule in rules]

    def events_of(self, action: str | None = None, *, op: str | None = None) -> list[FaultEvent]:
        return [
            e
            for e in self.events
            if (action is None or e.action == action) and (op is None or e.op == op)
        ]

    async def wait_for(
        self,
        action: str | None = None,
        *,
        op: str | None = None,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[FaultEvent]:
        """Wait until ``count`` events of ``action`` (on ``op``) were recorded; return them."""
        with trio.fail_after(timeout):
            while len(found := self.events_of(action, op=op)) < count:
                await self._new_event.park()
        return found

    # --- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and relay until cancelled."""
        listener = await bind_unix(self.path)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._relay, Transport(sock))
        finally:
            listener.close()
            Path(self.path).unlink(missing_ok=True)

    async def _relay(self, client: Transport) -> None:
        connection = next(self._connection_ids)
        self.connections += 1
        upstream: Transport | None = None
        streams: list[_Stream] = []
        try:
            try:
                upstream = await connect_unix(self.upstream)
            except ConnectionClosed as exc:
                self._append(
                    FaultEvent(connection, "to_hub", 0, "unknown", None, "unreachable", 0, str(exc))
                )
                return
            streams = [
                self._stream(connection, "to_hub", client, upstream),
                self._stream(connection, "from_hub", upstream, client),
            ]
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(self._pump, stream, nursery.cancel_scope)
        finally:
            for stream in streams:
                close_all(list(itertools.chain.from_iterable(f.fds for f in stream.held)))
            for key in [(connection, d) for d in DIRECTIONS]:
                self._requests.pop(key, None)
            with trio.CancelScope(shield=True):
                await client.aclose()
                if upstream is not None:
                    await upstream.aclose()

    def _stream(
        self, connection: int, direction: Direction, source: Transport, sink: Transport
    ) -> _Stream:
        rng = random.Random(f"{self.seed}/{connection}/{direction}")
        self._requests[(connection, direction)] = {}
        return _Stream(connection, direction, source, sink, rng)

    async def _pump(self, stream: _Stream, link: trio.CancelScope) -> None:
        """Relay one direction until its source ends (then pass the end on) or a fault ends
        the connection (then both directions stop)."""
        decoder = FrameDecoder(self.max_frame, MAX_FDS_LIMIT)
        try:
            while True:
                while (frame := decoder.next_frame()) is not None:
                    await self._on_frame(stream, frame)
                data, fds = await self._receive(stream)
                if data is None:  # the hold of a reordered frame ran out
                    await self._release_held(stream, "released: no frame followed")
                    continue
                decoder.feed(data, fds)
                if not data:
                    break
            if decoder.buffered:
                raise ProtocolError("the stream ended inside a frame")
            await self._release_held(stream, "released at end of stream")
            stream.sink.socket.shutdown(socket.SHUT_WR)  # pass the half-close on
        except ProtocolError as exc:
            self._record(
                stream, stream.frames, FrameInfo("unknown", None, None), 0, "unparseable", str(exc)
            )
            link.cancel()
        except (_CloseLink, ConnectionClosed, OSError):
            link.cancel()
        finally:
            decoder.close()

    async def _receive(self, stream: _Stream) -> tuple[bytes | None, list[int]]:
        """The next chunk from the source; ``(None, [])`` if a held frame's time ran out."""
        if not stream.held:
            return await stream.source.receive()
        with trio.move_on_at(stream.hold_deadline):
            return await stream.source.receive()
        return None, []

    async def _on_frame(self, stream: _Stream, frame: Frame) -> None:
        try:
            await self._apply(stream, frame)
        except BaseException:
            close_all(frame.fds)  # not sent: ours to close (a no-op for fds already sent)
            raise

    async def _apply(self, stream: _Stream, frame: Frame) -> None:
        index = stream.frames
        stream.frames += 1
        info = self._name(stream, frame)
        self.seen[(stream.direction, info.op)] += 1
        state = self._select(stream, info)
        if state is None:
            await self._send(stream, frame)
            await self._release_held(stream)
            return
        action = state.rule.action
        name = action_name(action)
        nfds = len(frame.fds)
        if isinstance(action, Drop):
            close_all(frame.fds)
            self._record(stream, index, info, nfds, name)
        elif isinstance(action, Delay):
            self._record(stream, index, info, nfds, name, f"{action.seconds}s")
            await trio.sleep(action.seconds)
            await self._send(stream, frame)
            await self._release_held(stream)
        elif isinstance(action, Duplicate):
            copy = Frame(frame.body, [fd.dup() for fd in frame.fds])
            self._record(stream, index, info, nfds, name)
            try:
                await self._send(stream, frame)
            except BaseException:
                close_all(copy.fds)  # the original was not sent: neither will the copy be
                raise
            await self._send(stream, copy)
            await self._release_held(stream)
        elif isinstance(action, Reorder):
            if not stream.held:
                stream.hold_deadline = trio.current_time() + action.hold
            stream.held.append(frame)
            self._record(stream, index, info, nfds, name, "held")
        elif isinstance(action, Truncate):
            data = _encode(frame)
            cut = stream.rng.randrange(1, len(data))
            self._record(stream, index, info, nfds, name, f"sent {cut} of {len(data)} bytes")
            try:
                await stream.sink.send(data[:cut], [fd.fileno() for fd in frame.fds])
            finally:
                close_all(frame.fds)
            raise _CloseLink
        elif isinstance(action, Corrupt):
            damaged = bytearray(_encode(frame))
            start = 0 if action.header or len(damaged) == HEADER.size else HEADER.size
            flipped = []
            for _ in range(action.bits):
                bit = stream.rng.randrange(start * 8, len(damaged) * 8)
                damaged[bit // 8] ^= 1 << (bit % 8)
                flipped.append(bit)
            self._record(stream, index, info, nfds, name, f"flipped bits {flipped}")
            await self._send_bytes(stream, bytes(damaged), frame.fds)
            await self._release_held(stream)
        else:
            assert isinstance(action, CloseAfter)
            await self._send(stream, frame)
            if state.fired >= action.n:
                self._record(stream, index, info, nfds, name, f"after {state.fired} frames")
                raise _CloseLink
            await self._release_held(stream)

    def _name(self, stream: _Stream, frame: Frame) -> FrameInfo:
        """Classify the frame, naming a reply after the request it answers."""
        info = classify(frame.body)
        if info.kind == "request" and info.request_id is not None:
            pending = _Pending(info.op)
            self._requests[(stream.connection, stream.direction)][info.request_id] = pending
        elif info.kind in ("reply", "error") and info.request_id is not None:
            other: Direction = "from_hub" if stream.direction == "to_hub" else "to_hub"
            requests = self._requests.get((stream.connection, other), {})
            entry = requests.get(info.request_id)
            if entry is not None:
                entry.replies -= 1
                if entry.replies <= 0:
                    del requests[info.request_id]
                return FrameInfo(info.kind, entry.op, info.request_id)
        return info

    def _select(self, stream: _Stream, info: FrameInfo) -> _RuleState | None:
        """The first rule that fires on this frame (every matching rule counts the frame)."""
        chosen = None
        for state in self._rules:
            rule = state.rule
            if not rule.matches(stream.direction, info.kind, info.op):
                continue
            state.matched += 1
            if chosen is not None or state.matched <= rule.after:
                continue
            if rule.times is not None and state.fired >= rule.times:
                continue
            if rule.probability < 1.0 and stream.rng.random() >= rule.probability:
                continue
            state.fired += 1
            chosen = state
        if chosen is not None and isinstance(chosen.rule.action, Duplicate):
            self._expect_second_reply(stream, info)
        return chosen

    def _expect_second_reply(self, stream: _Stream, info: FrameInfo) -> None:
        if info.kind == "request" and info.request_id is not None:
            entry = self._requests[(stream.connection, stream.direction)].get(info.request_id)
            if entry is not None:
                entry.replies += 1

    async def _release_held(self, stream: _Stream, early: str | None = None) -> None:
        """Send the frames a reorder held back: after the frame just sent, or ``early`` (why,
        recorded as an event) when no frame followed in time or the stream ended."""
        held, stream.held = stream.held, []
        stream.hold_deadline = float("inf")
        for index, frame in enumerate(held):
            if early is not None:
                info = classify(frame.body)
                self._record(stream, -1, info, len(frame.fds), "reorder", early)
            try:
                await self._send(stream, frame)
            except BaseException:
                close_all(list(itertools.chain.from_iterable(f.fds for f in held[index + 1 :])))
                raise

    async def _send(self, stream: _Stream, frame: Frame) -> None:
        await self._send_bytes(stream, _encode(frame), frame.fds)

    @staticmethod
    async def _send_bytes(stream: _Stream, data: bytes, fds: list[OwnedFd]) -> None:
        try:
            await stream.sink.send(data, [fd.fileno() for fd in fds])
        finally:
            close_all(fds)

    def _record(
        self, stream: _Stream, frame: int, info: FrameInfo, nfds: int, action: str, detail: str = ""
    ) -> None:
        self._append(
            FaultEvent(
                stream.connection, stream.direction, frame, info.kind, info.op, action, nfds, detail
            )
        )

    def _append(self, event: FaultEvent) -> None:
        self.events.append(event)
        self._new_event.unpark_all()


def _encode(frame: Frame) -> bytes:
    """The frame's bytes exactly as they came (the decoder accepts only flags 0)."""
    return HEADER.pack(MAGIC, 0, len(frame.fds), len(frame.body)) + frame.body


@asynccontextmanager
async def fault_proxy(
    upstream: str | Path,
    path: str | Path,
    rules: Sequence[FaultRule] = (),
    *,
    seed: int,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[FaultProxy]:
    """A ``FaultProxy`` listening on ``path`` for the duration of the block."""
    proxy = FaultProxy(upstream, path, rules, seed=seed, max_frame=max_frame)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
