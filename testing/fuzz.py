"""Fuzzing the hub's message handling: Hypothesis generates what one peer sends (a device
or a VMM), a real hub receives it, and every case must end in one of two ways for that
connection: each request answered (a reply or an error), or the connection closed cleanly;
and either way the hub serves a status query on a fresh connection and holds no fd that it
has lost track of.

Cases are *structured* (whole frames: envelopes with real or random operation names and
bodies drawn from each operation's message type, in range and out of it; fds attached in
the right number or not, of every kind) or *raw* (random bytes, valid frames with bits
flipped, lengths changed, cut in two with fds on the second half). For a structured case
the protocol's own decoder, fed the same frames, says which requests the hub must answer
and where, if anywhere, the stream breaks; a raw case must only leave the hub alive and clean.

    python -m msixhub.testing.fuzz --seconds 600 [--seed S]      # the long run

Needs Hypothesis (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import tempfile
import time
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgpack
import trio
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from msixhub.devices.cli_args import float_in
from msixhub.protocol.connection import (
    CLOSING,
    ERROR,
    HELLO,
    NEED_DATA,
    NOTICE,
    REPLY,
    REQUEST,
    Closing,
    Connection,
    Notice,
    RejectedReply,
    RejectedRequest,
    Reply,
    Request,
)
from msixhub.protocol.errors import ConnectionClosed, MessageError, ProtocolError
from msixhub.protocol.fds import OwnedFd, close_all, eventfd, memfd
from msixhub.protocol.frame import HEADER, MAGIC, MAX_FDS_LIMIT, FrameDecoder
from msixhub.protocol.messages import (
    Attach,
    Bar,
    DeviceInfo,
    MsixLayout,
    Region,
    RegisterDevice,
    SetMemTable,
    StatusQuery,
)
from msixhub.protocol.ops import OPS
from msixhub.protocol.peer import connect_unix
from msixhub.protocol.schema import MaxLen, Message, Opaque, Range
from msixhub.protocol.transport import Transport
from msixhub.testing.faults import fd_targets
from msixhub.testing.inprocess import inprocess_hub, inprocess_testdev

Role = Literal["device", "vmm"]
ROLES: tuple[Role, ...] = typing.get_args(Role)
FdKind = Literal["eventfd", "memfd", "empty-memfd", "pipe", "socket", "directory"]
FD_KINDS: tuple[FdKind, ...] = typing.get_args(FdKind)
TESTDEV = "fz0"  # the hub's own testdev in every case; a VMM case may attach it
FUZZ_DEVICE = "fzd"  # the id a device case registers
DEVICE_IDS = (TESTDEV, FUZZ_DEVICE, "")
PING_ID = 0x7FFF_FFFF  # the closing ping's id; case request ids stay below it
CASE_TIMEOUT = 10.0
MAX_SENDS = 8


class FuzzFailure(AssertionError):
    """The hub broke its contract for one case (the message says how)."""


# --- cases -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """One ``sendmsg``: bytes, with fds of these kinds on the first byte."""

    data: bytes
    fds: tuple[FdKind, ...] = ()


@dataclass(frozen=True, slots=True)
class Case:
    role: Role
    setup: bool  # register the device / attach the testdev first
    policy: str
    budget: int
    structured: bool  # whole frames, one per send: the decoder can predict the hub's answers
    sends: tuple[Send, ...]


def frame(envelope: object, nfds: int) -> bytes:
    body = msgpack.packb(envelope, use_bin_type=True)
    return HEADER.pack(MAGIC, 0, nfds, len(body)) + body


# --- strategies ------------------------------------------------------------------------------

_INT = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
junk: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | _INT | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def values_for(hint: Any, name: str = "") -> st.SearchStrategy[Any]:
    """Mostly values of the declared type (in range, at the edges, just past them), sometimes
    anything at all."""
    typed = _typed(hint, name)
    return st.one_of(typed, typed, typed, junk)


def _typed(hint: Any, name: str) -> st.SearchStrategy[Any]:
    bounds: list[Any] = []
    if get_origin(hint) is Annotated:
        hint, *bounds = get_args(hint)
    limit = next((b.limit for b in bounds if isinstance(b, MaxLen)), None)
    origin = get_origin(hint)
    if hint is bool:
        return st.booleans()
    if hint is int:
        rng = next((b for b in bounds if isinstance(b, Range)), Range(-(2**63), 2**64 - 1))
        edges = [rng.low, rng.high]
        edges += [rng.low - 1] if rng.low > -(2**63) else []
        edges += [rng.high + 1] if rng.high < 2**64 - 1 else []
        small = st.integers(rng.low, min(rng.high, rng.low + 7))  # vectors, queues, BARs
        return st.one_of(small, small, st.integers(rng.low, rng.high), st.sampled_from(edges))
    if hint is float:
        return st.floats()
    if hint is str:
        if name == "device":
            return st.one_of(st.just(TESTDEV), st.sampled_from(DEVICE_IDS), st.text(max_size=70))
        size = limit or 16
        return st.text(max_size=min(size, 16)) | st.text(min_size=size + 1, max_size=size + 2)
    if hint is bytes:
        return st.binary(max_size=64)
    if hint is Opaque:
        return st.dictionaries(st.text(max_size=6), junk, max_size=3)
    if origin is Literal:
        return st.sampled_from(get_args(hint)) | st.text(max_size=8)
    if origin is list:
        (item,) = get_args(hint)
        items = _typed(item, name)
        lists = st.lists(items, max_size=3)
        if limit is not None and limit <= 8:
            lists |= st.lists(items, min_size=limit + 1, max_size=limit + 1)
        return lists
    if origin in (Union, types.UnionType):
        return (
            st.one_of([_typed(arg, name) for arg in get_args(hint) if arg is not type(None)])
            | st.none()
        )
    if isinstance(hint, type) and issubclass(hint, Message):
        return bodies(hint)
    raise TypeError(f"no strategy for {hint!r}")


@st.composite
def bodies(draw: st.DrawFn, cls: type[Message]) -> dict[str, Any]:
    """A wire body for message ``cls``: its fields, now and then one missing or one extra."""
    hints = typing.get_type_hints(cls, include_extras=True)
    body = {f.name: draw(values_for(hints[f.name], f.name)) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    mutation = draw(st.integers(0, 9))
    if mutation == 0 and body:
        del body[draw(st.sampled_from(sorted(body)))]
    elif mutation == 1:
        body[draw(st.text(min_size=1, max_size=6))] = draw(junk)
    return body


request_ids = st.one_of(st.integers(1, 64), st.integers(1, PING_ID - 1))
_bad_ids = st.sampled_from([0, -1, 2**64 - 1, "1", None])
ROLE_OPS: dict[str, tuple[str, ...]] = {
    "device": ("register_device", "use", "unuse", "deassert", "notify", "set_intx"),
    "vmm": (
        "set_mem_table",
        "attach",
        "detach",
        "mmio_read",
        "mmio_write",
        "msix_control_read",
        "msix_control_write",
    ),
}


def op_names(role: Role | None) -> st.SearchStrategy[str]:
    """Mostly the role's own operations, then any registered one, then made-up names."""
    own = st.sampled_from(ROLE_OPS[role] if role else sorted(OPS))
    return st.one_of(own, own, st.sampled_from(sorted(OPS)), st.text(max_size=12))


@st.composite
def envelopes(draw: st.DrawFn, role: Role | None = None, *, sound: bool = False) -> list[Any]:
    """An msixhub envelope: mostly requests and notices; ``sound``: only those, with good ids
    (the message inside may still be anything)."""
    shape = draw(st.integers(0, 15 if sound else 19))
    if shape < 16:
        name = draw(op_names(role))
        spec = OPS.get(name)
        body = draw(bodies(spec.request)) if spec is not None else draw(junk)
        if shape < 10:
            bad_id = not sound and shape == 9
            return [REQUEST, draw(_bad_ids if bad_id else request_ids), name, body]
        return [NOTICE, name, body]
    return draw(
        st.sampled_from(
            [
                [REPLY, 1, {}],
                [ERROR, 0, "internal", "x"],
                [ERROR, 3, "internal", "x"],
                [HELLO, {}],
                [CLOSING, "fuzz"],
                [REQUEST, 1, "ping"],
            ]
        )
        | junk.map(lambda value: [value])
    )


def expected_fds(envelope: list[Any]) -> int | None:
    """How many fds the envelope's operation needs (None if it does not decode)."""
    kind, *rest = envelope
    if kind not in (REQUEST, NOTICE) or len(rest) not in (2, 3):
        return None
    op, body = rest[-2], rest[-1]
    spec = OPS.get(op) if isinstance(op, str) else None
    if spec is None:
        return None
    try:
        return spec.expected_request_fds(spec.request.from_wire(body))
    except MessageError:
        return None


fd_lists = st.lists(st.sampled_from(FD_KINDS), max_size=3).map(tuple)


@st.composite
def structured_sends(draw: st.DrawFn, role: Role | None = None, *, sound: bool = False) -> Send:
    """One whole frame: usually as many fds as its operation needs; declared as attached
    (``sound``: always)."""
    envelope = draw(envelopes(role, sound=sound))
    needed = expected_fds(envelope)
    if needed is not None and draw(st.integers(0, 3)) > 0:
        fds = tuple(draw(st.lists(st.sampled_from(FD_KINDS), min_size=needed, max_size=needed)))
    else:
        fds = draw(fd_lists)
    declared = len(fds) if sound or draw(st.integers(0, 7)) > 0 else draw(st.integers(0, 4))
    return Send(frame(envelope, declared), fds)


@st.composite
def raw_sends(draw: st.DrawFn, role: Role | None = None) -> list[Send]:
    """Random bytes, or a valid frame damaged: bits flipped, length changed, cut in two."""
    how = draw(st.sampled_from(["bytes", "flip", "length", "cut", "prefix"]))
    if how == "bytes":
        return [Send(draw(st.binary(max_size=64)), draw(fd_lists))]
    whole = draw(structured_sends(role))
    data = bytearray(whole.data)
    if how == "flip":
        for bit in draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=4)):
            data[bit // 8] ^= 1 << (bit % 8)
    elif how == "length":
        data[4:8] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "little")
    elif how == "prefix":
        data = data[: draw(st.integers(1, len(data) - 1))]
    else:
        cut = draw(st.integers(1, len(data) - 1))
        return [Send(bytes(data[:cut])), Send(bytes(data[cut:]), whole.fds)]
    return [Send(bytes(data), whole.fds)]


Shape = Literal["sound", "structured", "raw"]
SHAPES: tuple[Shape, ...] = typing.get_args(Shape)


def cases(
    role: Role | None = None, *, shape: Shape | None = None, setup: bool | None = None
) -> st.SearchStrategy[Case]:
    """Fuzz cases; each argument left None is drawn too. ``sound``: whole, well-framed
    requests and notices (their messages may be anything); ``structured``: whole frames that
    may break the stream; ``raw``: bytes and damaged frames."""

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        case_role: Role = draw(st.sampled_from(ROLES)) if role is None else role
        case_shape: Shape = draw(st.sampled_from(SHAPES)) if shape is None else shape
        if case_shape == "raw":
            frames = structured_sends(case_role).map(lambda send: [send])
            parts = draw(st.lists(frames | raw_sends(case_role), min_size=1, max_size=4))
            sends = [send for part in parts for send in part]
        else:
            whole = structured_sends(case_role, sound=case_shape == "sound")
            sends = draw(st.lists(whole, min_size=1, max_size=MAX_SENDS))
        return Case(
            role=case_role,
            setup=draw(st.booleans()) if setup is None else setup,
            policy=draw(st.sampled_from(["static", "lazy", "direct"])),
            budget=draw(st.sampled_from([2, 4096])),
            structured=case_shape != "raw",
            sends=tuple(sends),
        )

    return build()


# --- what the hub must do: the protocol's own decoder as the model ---------------------------


@dataclass(slots=True)
class Expectation:
    answers: Counter[int] = field(default_factory=Counter)  # request id -> answers owed
    broken: bool = False  # the stream breaks somewhere: the hub may close instead


def expectation(case: Case) -> Expectation:
    """Which requests the hub must answer, from a hub-side ``Connection`` fed the same sends."""
    expected = Expectation()
    if not case.structured:
        expected.broken = True
        return expected
    model = Connection("admin")
    model.receive_data(Connection(case.role).hello())
    model.next_event()
    try:
        for send in case.sends:
            dummies = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in send.fds]
            model.receive_data(send.data, dummies)
            while (event := model.next_event()) is not NEED_DATA:
                if isinstance(event, Request | Notice | Reply):
                    close_all(event.fds)
                if isinstance(event, Request | RejectedRequest):
                    expected.answers[event.id] += 1
                elif isinstance(event, Closing | Reply | RejectedReply):
                    expected.broken = True
                    return expected
    except ProtocolError:
        expected.broken = True
    finally:
        model.close()
    return expected


# --- a raw peer ------------------------------------------------------------------------------


@dataclass(eq=False)
class FuzzPeer:
    """One connection to the hub that sends raw bytes, answers whatever the hub asks (so the
    hub never waits on it), and records the answers it gets and how the connection ended."""

    transport: Transport
    role: Role
    answers: Counter[int] = field(default_factory=Counter)
    hello: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)  # an answer came, or the end
    hub_said: str = ""
    internal_errors: list[str] = field(default_factory=list)  # a handler failed: a hub bug
    _send_lock: trio.Lock = field(default_factory=trio.Lock)
    _setup_ids: int = 0  # setup requests use ids above PING_ID, which cases never use

    async def send(self, data: bytes, fds: Sequence[OwnedFd] = ()) -> bool:
        """False once the hub has closed the connection."""
        if self.ended.is_set():
            return False
        try:
            async with self._send_lock:
                await self.transport.send(data, [fd.fileno() for fd in fds])
        except ConnectionClosed:
            return False
        return True

    async def read(self) -> None:
        decoder = FrameDecoder(1 << 24, MAX_FDS_LIMIT)
        try:
            while True:
                data, fds = await self.transport.receive()
                decoder.feed(data, fds)
                while (received := decoder.next_frame()) is not None:
                    close_all(received.fds)
                    await self._on_envelope(msgpack.unpackb(received.body, raw=False))
                if not data:
                    if decoder.buffered:
                        raise FuzzFailure("the hub's stream ended inside a frame")
                    return
        except ConnectionClosed:
            return
        except (ProtocolError, ValueError) as exc:
            raise FuzzFailure(f"the hub sent a malformed stream: {exc}") from exc
        finally:
            decoder.close()
            self.ended.set()
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _on_envelope(self, envelope: list[Any]) -> None:
        kind = envelope[0]
        if kind == HELLO:
            self.hello.set()
        elif kind == REQUEST:
            _, request_id, op, _ = envelope
            body = {"value": 0} if op == "bar_read" else {}
            await self.send(frame([REPLY, request_id, body], 0))
        elif kind in (REPLY, ERROR):
            if kind == ERROR and envelope[2] == "internal":
                self.internal_errors.append(str(envelope[3]))
            self.answers[envelope[1]] += 1
            self._wake()
        elif kind == CLOSING:
            self.hub_said = str(envelope[1])

    async def call(self, body: Message, fds: Sequence[OwnedFd] = ()) -> None:
        """A setup request, awaited (the hub must answer it)."""
        self._setup_ids += 1
        request_id = PING_ID + self._setup_ids
        name = next(name for name, spec in OPS.items() if spec.request is type(body))
        await self.send(frame([REQUEST, request_id, name, body.to_wire()], len(fds)), list(fds))
        with trio.fail_after(CASE_TIMEOUT):
            while not self.answers[request_id] and not self.ended.is_set():
                await self.changed.wait()
        if not self.answers[request_id]:
            raise FuzzFailure(f"the hub closed the connection during setup ({self.hub_said})")


@contextmanager
def made_fds(kinds: tuple[FdKind, ...]) -> Iterator[list[OwnedFd]]:
    """Fresh fds of these kinds, closed on exit (what was sent are the hub's copies)."""
    fds: list[OwnedFd] = []
    try:
        for kind in kinds:
            fds.append(_make_fd(kind))
        yield fds
    finally:
        close_all(fds)


def _make_fd(kind: FdKind) -> OwnedFd:
    if kind == "eventfd":
        return eventfd()
    if kind in ("memfd", "empty-memfd"):
        return memfd(4096 if kind == "memfd" else 0, "fuzz")
    if kind == "pipe":
        read, write = os.pipe2(os.O_CLOEXEC)
        os.close(write)
        return OwnedFd(read, "pipe")
    if kind == "socket":
        one, other = socket.socketpair()
        other.close()
        return OwnedFd(one.detach(), "socket")
    return OwnedFd(os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "directory")


async def _set_up(peer: FuzzPeer) -> None:
    if peer.role == "device":
        info = DeviceInfo(
            FUZZ_DEVICE, "fuzz", 4, 1, [Bar(0, 4096), Bar(1, 4096)], MsixLayout(1, 0, 2048)
        )
        await peer.call(RegisterDevice(info))
    else:
        with made_fds(("memfd",)) as fds:
            await peer.call(SetMemTable([Region(0, 4096, 0)]), fds)
        await peer.call(Attach(TESTDEV))
    peer.answers.clear()


async def run_case(socket_path: str, case: Case, *, timeout: float = CASE_TIMEOUT) -> None:
    """Play ``case`` against the hub at ``socket_path``; FuzzFailure if the hub misbehaves
    (``timeout``: how long it may take to answer, or to close after our end)."""
    expected = expectation(case)
    peer = FuzzPeer(await connect_unix(socket_path), case.role)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.read)
            with trio.fail_after(timeout):
                await peer.send(Connection(case.role).hello())
                await peer.hello.wait()
            if case.setup:
                await _set_up(peer)
            for send in case.sends:
                with made_fds(send.fds) as fds:
                    if not await peer.send(send.data, fds):
                        break
            await peer.send(frame([REQUEST, PING_ID, "ping", {}], 0))
            if not expected.broken:
                await _wait_for_answers(peer, expected.answers + Counter({PING_ID: 1}), timeout)
            if peer.internal_errors:
                raise FuzzFailure(f"the hub failed internally: {peer.internal_errors}")
            with contextlib.suppress(OSError):  # the hub may have closed it already
                peer.transport.socket.shutdown(socket.SHUT_WR)
            try:
                with trio.fail_after(timeout):
                    await peer.ended.wait()
            except trio.TooSlowError:
                raise FuzzFailure("the hub did not close the connection after our end") from None
    finally:
        await peer.transport.aclose()


async def _wait_for_answers(peer: FuzzPeer, owed: Counter[int], timeout: float) -> None:
    """Every owed answer, exactly, with the connection still open."""
    try:
        with trio.fail_after(timeout):
            while not peer.ended.is_set() and any(peer.answers[i] < n for i, n in owed.items()):
                await peer.changed.wait()
    except trio.TooSlowError:
        missing = {i: n - peer.answers[i] for i, n in owed.items() if peer.answers[i] < n}
        raise FuzzFailure(f"requests left unanswered: {missing}") from None
    if peer.ended.is_set():
        raise FuzzFailure(f"the hub closed a sound connection ({peer.hub_said!r})")
    if peer.answers != owed:
        raise FuzzFailure(f"answers {dict(peer.answers)}, owed {dict(owed)}")


async def status_answers(socket_path: str) -> None:
    """The hub answers a status query on a fresh connection."""
    peer = FuzzPeer(await connect_unix(socket_path), "vmm")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.read)
            await peer.send(Connection("admin").hello())
            await peer.call(StatusQuery())
            nursery.cancel_scope.cancel()
    finally:
        await peer.transport.aclose()


# --- one case against a fresh hub in this process --------------------------------------------


def check_in_process(case: Case) -> None:
    """Run ``case`` against a fresh in-process hub (with testdev ``fz0``); afterwards the hub
    must answer a status query, and once it is shut down no fd it received may remain."""
    with tempfile.TemporaryDirectory(prefix="msixhub-fuzz-") as directory:
        trio.run(_check_in_process, case, Path(directory) / "hub.sock")


async def _check_in_process(case: Case, socket_path: Path) -> None:
    before = fd_targets()
    with logged_errors() as errors:
        async with AsyncExitStack() as stack:
            hub = await stack.enter_async_context(
                inprocess_hub(socket_path, route_policy=case.policy, route_budget=case.budget)
            )
            await stack.enter_async_context(inprocess_testdev(hub.socket, TESTDEV, queues=2))
            await run_case(hub.socket, case)
            await status_answers(hub.socket)
    if errors:
        raise FuzzFailure("the hub logged errors:\n" + "\n".join(errors))
    leaked = {fd: target for fd, target in fd_targets().items() if before.get(fd) != target}
    if leaked:
        raise FuzzFailure(f"fds left open after the hub shut down: {leaked}")


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.formatter = logging.Formatter("%(name)s: %(message)s")
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@contextmanager
def logged_errors() -> Iterator[list[str]]:
    """What msixhub logs at ERROR or above meanwhile: a handler that failed (the peer answers
    ``internal`` and carries on, so only the log shows the bug)."""
    handler = _ErrorRecords()
    logger = logging.getLogger("msixhub")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


# --- the long run ----------------------------------------------------------------------------


def fuzz_for(seconds: float, start_seed: int, report: Callable[[str], None] = print) -> int:
    """Run batches of cases, each batch seeded, until ``seconds`` have passed; the number of
    cases run. A failure is shrunk by Hypothesis and raised, after its batch seed is reported."""
    deadline = time.monotonic() + seconds
    batch_seed = start_seed
    total = 0

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(cases())
    def batch(case: Case) -> None:
        nonlocal total
        total += 1
        check_in_process(case)

    while time.monotonic() < deadline:
        report(f"batch seed {batch_seed}")
        try:
            seed(batch_seed)(batch)()
        except BaseException:
            report(f"FAILED: reproduce with --seed {batch_seed} --seconds 1")
            raise
        batch_seed += 1
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msixhub.testing.fuzz", description=__doc__)
    parser.add_argument(
        "--seconds",
        type=float_in(0.1, 7 * 24 * 3600, "seconds"),
        default=60.0,
        help="how long to run (default 60)",
    )
    parser.add_argument("--seed", type=int, default=None, help="first batch seed (default: random)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # refusals are the point; failures are errors
    start = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    total = fuzz_for(args.seconds, start)
    print(f"{total} cases, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
