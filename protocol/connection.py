"""The sans-IO protocol connection: bytes and fds in, events out; messages in, bytes out.

It knows the handshake, the envelopes, request ids and which operation each outstanding id
belongs to (so a reply is decoded as that operation's reply type). It does no I/O and does
not know about trio: ``receive_data(bytes, fds)``, ``next_event()``, ``send_*() -> bytes``,
as h11 does.

Envelopes (msgpack arrays)::

    [0, hello]                 handshake, first frame from each side
    [1, id, op, body]          request, answered by exactly one reply or error
    [2, id, body]              reply
    [3, id, code, message]     error reply
    [4, op, body]              notice (one-way)
    [5, reason]                closing: the sender is about to close the connection

A malformed *message* (unknown op, bad field or range, wrong fd count) becomes a
``RejectedRequest`` / ``RejectedNotice`` event, its fds already closed, and the connection
stays usable; a malformed *stream* raises ``ProtocolError`` and the connection is dead.
A message we may not send (larger than the peer accepts, fds that the transport or the
peer cannot take) raises ``MessageError`` before any byte is produced, so the connection
stays usable for the next one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, get_args

import msgpack
from msixhub.protocol.errors import (
    ConnectionClosed,
    ErrorCode,
    FdPassingUnsupported,
    MessageError,
    ProtocolError,
    VersionMismatch,
)
from msixhub.protocol.fds import OwnedFd, close_all
from msixhub.protocol.frame import (
    DEFAULT_MAX_FDS,
    DEFAULT_MAX_FRAME,
    MAX_FDS_LIMIT,
    MAX_FRAME_LIMIT,
    MIN_MAX_FRAME,
    FrameDecoder,
    encode_header,
)
from msixhub.protocol.messages import Hello, Role
from msixhub.protocol.ops import OPS, OpSpec, spec_of
from msixhub.protocol.schema import Message

PROTOCOL_VERSION: Final = 1
FEATURES: Final = ("fd-passing",)

HELLO, REQUEST, REPLY, ERROR, NOTICE, CLOSING = range(6)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
_LATE: Final = object()  # a reply to a request whose waiter gave up: dropped
# Requests whose waiter gave up are remembered so that their late replies can be dropped;
# beyond this many the oldest is forgotten for good, and a reply that late is a protocol error.
MAX_FORGOTTEN: Final = 4096
MAX_REASON: Final = 1024


class State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)
class PeerHello:
    """The peer's hello, once validated; limits are already applied to this connection."""

    hello: Hello


@dataclass(slots=True)
class Request:
    id: int
    op: str
    body: Message
    fds: list[OwnedFd] = field(default_factory=list)


@dataclass(slots=True)
class Reply:
    id: int
    body: Message
    fds: list[OwnedFd] = field(default_factory=list)


@dataclass(slots=True)
class ErrorReply:
    id: int
    code: str
    message: str


@dataclass(slots=True)
class Notice:
    op: str
    body: Message
    fds: list[OwnedFd] = field(default_factory=list)


@dataclass(slots=True)
class RejectedRequest:
    """A request we cannot accept; answer it with ``send_error(id, error)``."""

    id: int
    error: MessageError


@dataclass(slots=True)
class RejectedNotice:
    op: str
    error: MessageError


@dataclass(slots=True)
class RejectedReply:
    """A reply that did not decode as its operation's reply type; its waiter should fail."""

    id: int
    error: MessageError


@dataclass(slots=True)
class Closing:
    reason: str


Event = (
    PeerHello
    | Request
    | Reply
    | ErrorReply
    | Notice
    | RejectedRequest
    | RejectedNotice
    | RejectedReply
    | Closing
)


class Connection:
    """One end of an msixhub connection (either role; the protocol is symmetric)."""

    def __init__(
        self,
        role: Role,
        *,
        name: str = "",
        max_frame: int = DEFAULT_MAX_FRAME,
        max_fds: int = DEFAULT_MAX_FDS,
        fd_passing: bool = True,
    ) -> None:
        if role not in get_args(Role):
            raise ValueError(f"role must be one of {get_args(Role)}, not {role!r}")
        if not 0 <= max_fds <= MAX_FDS_LIMIT:
            raise ValueError(f"max_fds must be within 0..{MAX_FDS_LIMIT}")
        if not MIN_MAX_FRAME <= max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be within {MIN_MAX_FRAME}..{MAX_FRAME_LIMIT}")
        self.role = role
        self.name = name
        self.fd_passing = fd_passing
        # What we accept; the peer's hello may lower what we send.
        self.max_frame = max_frame
        self.max_fds = max_fds if fd_passing else 0
        self.send_max_frame = max_frame
        self.send_max_fds = self.max_fds
        self.peer: Hello | None = None
        self.state = State.HANDSHAKE
        self._decoder = FrameDecoder(max_frame, self.max_fds)
        self._next_id = 1
        self._outstanding: dict[int, OpSpec] = {}
        self._forgotten: OrderedDict[int, None] = OrderedDict()
        self._eof = False
        self._packer = msgpack.Packer(use_bin_type=True)

    # --- sending ---------------------------------------------------------------------------

    def hello(self) -> bytes:
        """Our hello frame; send it first."""
        hello = Hello(
            PROTOCOL_VERSION,
            self.role,
            self.max_frame,
            self.max_fds,
            list(FEATURES) if self.fd_passing else [],
            self.name,
        )
        return self._frame([HELLO, hello.to_wire()], 0)

    def send_request(self, body: Message, fds: Sequence[int] = ()) -> tuple[int, bytes]:
        """Frame a request; returns its id (the key of its reply) and the bytes to send."""
        spec = spec_of(body)
        if spec.oneway:
            raise TypeError(f"{spec.name} is a notice; use send_notice")
        if fds or spec.request_fds:
            self._check_fds(spec.name, spec.expected_request_fds(body), fds)
        request_id = self._next_id
        data = self._frame([REQUEST, request_id, spec.name, body.to_wire()], len(fds))
        self._next_id = request_id + 1
        self._outstanding[request_id] = spec
        return request_id, data

    def send_notice(self, body: Message, fds: Sequence[int] = ()) -> bytes:
        spec = spec_of(body)
        if not spec.oneway:
            raise TypeError(f"{spec.name} is a request; use send_request")
        self._check_fds(spec.name, spec.expected_request_fds(body), fds)
        return self._frame([NOTICE, spec.name, body.to_wire()], len(fds))

    def send_reply(self, request: Request, body: Message, fds: Sequence[int] = ()) -> bytes:
        spec = OPS[request.op]
        if not isinstance(body, spec.reply):
            raise TypeError(
                f"{request.op} replies with {spec.reply.__name__}, not {type(body).__name__}"
            )
        if fds or spec.reply_fds:
            self._check_fds(f"{request.op} reply", spec.expected_reply_fds(body), fds)
        return self._frame([REPLY, request.id, body.to_wire()], len(fds))

    def send_error(self, request_id: int, error: MessageError) -> bytes:
        return self._frame([ERROR, request_id, error.code, error.message[:MAX_REASON]], 0)

    def send_closing(self, reason: str) -> bytes:
        """Our last frame: why we are closing (also after a ProtocolError closed us).
        The connection is closed afterwards."""
        body = self._packer.pack([CLOSING, reason[:MAX_REASON]])
        self.state = State.CLOSED
        return encode_header(len(body), 0) + body

    def forget(self, request_id: int) -> None:
        """Stop expecting a reply to ``request_id`` (its waiter gave up); a late reply is dropped."""
        if self._outstanding.pop(request_id, None) is not None:
            if len(self._forgotten) >= MAX_FORGOTTEN:
                self._forgotten.popitem(last=False)
            self._forgotten[request_id] = None

    @property
    def outstanding(self) -> int:
        """How many of our requests still await their reply."""
        return len(self._outstanding)

    @property
    def held_fds(self) -> int:
        """How many received fds are still ours (not yet handed out with an event)."""
        return self._decoder.held_fds

    def _check_fds(self, what: str, expected: int, fds: Sequence[int]) -> None:
        if len(fds) != expected:
            raise ValueError(f"{what} carries {expected} fds, {len(fds)} given")
        if not fds:
            return
        if not self.fd_passing:
            raise FdPassingUnsupported(f"{what} needs fd passing, which TCP cannot do")
        if self.send_max_fds == 0:
            raise FdPassingUnsupported(f"{what} needs fd passing; the peer takes no fds")
        if len(fds) > self.send_max_fds:
            raise MessageError(
                ErrorCode.BAD_RANGE,
                f"{what} carries {len(fds)} fds; the peer takes at most {self.send_max_fds}",
            )

    def _frame(self, envelope: list[Any], nfds: int) -> bytes:
        if self.state is State.CLOSED:
            raise ConnectionClosed("connection is closed")
        body = self._packer.pack(envelope)
        if len(body) > self.send_max_frame:
            raise MessageError(
                ErrorCode.BAD_RANGE,
                f"frame of {len(body)} bytes exceeds the peer's maximum of {self.send_max_frame}",
            )
        return encode_header(len(body), nfds) + body

    # --- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Feed received bytes and fds (the connection owns the fds from now on).
        ``data == b""`` means the peer closed its end."""
        if self.state is State.CLOSED:
            close_all([OwnedFd(fd) for fd in fds])
            return
        self._decoder.feed(data, fds)
        if not data:
            self._eof = True

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA.

        Raises ProtocolError if the stream is broken (the connection is closed then; the
        caller should send ``send_closing(str(error))`` if it can, then close the transport),
        and ConnectionClosed if the connection was closed already."""
        while True:  # until an event that is not a late reply (those are dropped)
            if self.state is State.CLOSED:
                raise ConnectionClosed("connection is closed")
            try:
                frame = self._decoder.next_frame()
            except ProtocolError:
                self.close()
                raise
            if frame is None:
                if self._eof:
                    midframe = self._decoder.buffered > 0
                    self.close()
                    if midframe:
                        raise ProtocolError("peer closed the connection in the middle of a frame")
                    return Closing("peer closed the connection")
                return NEED_DATA
            try:
                envelope = msgpack.unpackb(frame.body, raw=False, strict_map_key=True)
                event = self._dispatch(envelope, frame.fds)
            except ProtocolError:
                close_all(frame.fds)
                self.close()
                raise
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                close_all(frame.fds)
                self.close()
                raise ProtocolError(f"undecodable frame body: {exc}") from None
            if event is not _LATE:
                return event  # type: ignore[return-value]

    def _dispatch(self, envelope: Any, fds: list[OwnedFd]) -> Event | object:
        if type(envelope) is not list or not envelope or type(envelope[0]) is not int:
            raise ProtocolError("frame body is not an msixhub envelope")
        kind = envelope[0]
        size = len(envelope)
        if kind == CLOSING and size == 2:
            close_all(fds)
            self.close()
            return Closing(str(envelope[1])[:MAX_REASON])
        if self.state is State.HANDSHAKE:
            if kind != HELLO or size != 2:
                raise ProtocolError("the first frame must be hello")
            if fds:
                raise ProtocolError("hello carries no fds")
            return self._receive_hello(envelope[1])
        if kind == REPLY and size == 3:
            _, request_id, body = envelope
            spec = self._outstanding.pop(request_id, None) if type(request_id) is int else None
            if spec is None:
                if self._drop_late(request_id, fds):
                    return _LATE
                raise ProtocolError(f"reply to unknown request id {request_id!r}")
            try:
                message = spec.reply.from_wire(body)
                self._match_fds(spec.name, "reply", spec.expected_reply_fds(message), fds)
            except MessageError as error:
                close_all(fds)
                return RejectedReply(request_id, error)
            return Reply(request_id, message, fds)
        if kind == REQUEST and size == 4:
            _, request_id, op, body = envelope
            if type(request_id) is not int or request_id <= 0:
                raise ProtocolError(f"bad request id {request_id!r}")
            try:
                message = self._incoming(op, body, fds, oneway=False)
            except MessageError as error:
                close_all(fds)
                return RejectedRequest(request_id, error)
            return Request(request_id, op, message, fds)
        if kind == NOTICE and size == 3:
            _, op, body = envelope
            try:
                message = self._incoming(op, body, fds, oneway=True)
            except MessageError as error:
                close_all(fds)
                return RejectedNotice(str(op)[:MAX_REASON], error)
            return Notice(op, message, fds)
        if kind == ERROR and size == 4:
            _, request_id, code, text = envelope
            if fds or type(code) is not str or type(text) is not str:
                raise ProtocolError("malformed error reply")
            if type(request_id) is not int:
                raise ProtocolError(f"bad request id {request_id!r} in an error reply")
            if self._outstanding.pop(request_id, None) is None:
                if self._drop_late(request_id, fds):
                    return _LATE
                if request_id != 0:
                    raise ProtocolError(f"error reply to unknown request id {request_id}")
            return ErrorReply(request_id, code[:MAX_REASON], text[:MAX_REASON])
        raise ProtocolError(f"unknown envelope kind {kind!r} of length {size}")

    def _incoming(self, op: object, body: Any, fds: list[OwnedFd], *, oneway: bool) -> Message:
        """The body of a request (or, ``oneway``, a notice) decoded as its operation's, with
        the fds it needs; MessageError if not (the fds stay the caller's to close)."""
        if type(op) is not str or (spec := OPS.get(op)) is None or spec.oneway is not oneway:
            what = "notice" if oneway else "operation"
            raise MessageError(ErrorCode.UNKNOWN_OP, f"unknown {what} {op!r}")
        message = spec.request.from_wire(body)
        self._match_fds(
            op, "notice" if oneway else "request", spec.expected_request_fds(message), fds
        )
        return message

    def _drop_late(self, request_id: object, fds: list[OwnedFd]) -> bool:
        """Whether this answers a request we forgot; if so its fds are closed here."""
        if type(request_id) is not int or request_id not in self._forgotten:
            return False
        del self._forgotten[request_id]
        close_all(fds)
        return True

    def _receive_hello(self, body: Any) -> PeerHello:
        if isinstance(body, dict) and body.get("version", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise VersionMismatch(PROTOCOL_VERSION, body["version"])
        try:
            hello = Hello.from_wire(body)
        except MessageError as error:
            raise ProtocolError(f"bad hello: {error.message}") from None
        if hello.max_frame < MIN_MAX_FRAME:
            raise ProtocolError(
                f"bad hello: max_frame {hello.max_frame} is below the minimum {MIN_MAX_FRAME}"
            )
        self.peer = hello
        # Never send more than the peer accepts; never accept more than we said.
        self.send_max_frame = min(self.send_max_frame, hello.max_frame)
        peer_passes_fds = "fd-passing" in hello.features
        self.send_max_fds = min(self.send_max_fds, hello.max_fds) if peer_passes_fds else 0
        self.state = State.OPEN
        return PeerHello(hello)

    @staticmethod
    def _match_fds(op: str, what: str, expected: int, fds: list[OwnedFd]) -> None:
        if len(fds) != expected:
            raise MessageError(
                ErrorCode.BAD_FIELD, f"{op} {what} needs {expected} fds, frame carried {len(fds)}"
            )

    def close(self) -> None:
        """Forget everything and close every fd we still own."""
        self.state = State.CLOSED
        self._outstanding.clear()
        self._decoder.close()
