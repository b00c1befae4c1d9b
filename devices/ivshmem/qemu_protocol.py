"""QEMU's ivshmem client-server protocol (docs/specs/ivshmem-spec.rst), sans-IO.

The stream is one-way, server to client. Every message is one little-endian signed 64-bit
integer, optionally with one file descriptor (SCM_RIGHTS). On connect the server sends, in
this order:

1. the protocol version, 0;
2. the client's peer id (0..65535);
3. -1 with the shared memory fd;
4. for each peer already there, its id once per vector with one eventfd each (vector 0, 1, ...):
   writing one rings that vector of that peer;
5. the client's own id once per vector with its own eventfds (to read: that is how it is rung).

After that: a peer id with an fd is one more vector of a new peer (as in 4); a peer id without
an fd is that peer's departure.

Server side: ``greeting`` and ``announcement`` turn domain data into ``ServerMessage``s, and
``PeerOutbox`` is one connection's send queue with the rules that keep a slow connection
correct: a queued vector whose fd has been closed since (its peer left) is dropped, a
departure is sent only for a peer this connection was told about, and a backlog over the bound
marks the connection for dropping instead of growing without end.

Client side: ``ClientDecoder`` is fed what ``recvmsg`` returned (bytes and fds) and yields
events. Where fds land: the kernel hands a message's fds to the ``recvmsg`` call that returns
that message's first byte, and stops a read after a message that carried fds, so fds arriving
with a chunk belong to the last message that starts in it.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from msixhub.devices.ivshmem.domain import Announcement, JoinResult, PeerLeft
from msixhub.protocol.errors import ProtocolError, VersionMismatch
from msixhub.protocol.fds import OwnedFd, close_all

PROTOCOL_VERSION = 0
MESSAGE_SIZE = 8
SHM_MESSAGE_VALUE = -1
MAX_PEER_ID = 0xFFFF
_INT64 = struct.Struct("<q")


def encode(value: int) -> bytes:
    """One message's bytes."""
    return _INT64.pack(value)


class MessageKind(enum.Enum):
    VERSION = "version"
    PEER_ID = "peer-id"
    SHARED_MEMORY = "shared-memory"
    PEER_VECTOR = "peer-vector"
    OWN_VECTOR = "own-vector"
    PEER_GONE = "peer-gone"


@dataclass(frozen=True, slots=True)
class ServerMessage:
    """One message to send. ``fd`` is borrowed (the domain owns it); closed means stale."""

    kind: MessageKind
    value: int
    fd: OwnedFd | None = None

    @property
    def payload(self) -> bytes:
        return encode(self.value)


def greeting(join: JoinResult, shm: OwnedFd) -> list[ServerMessage]:
    """Everything a new client receives on connect, in the spec's order."""
    messages = [
        ServerMessage(MessageKind.VERSION, PROTOCOL_VERSION),
        ServerMessage(MessageKind.PEER_ID, join.peer_id),
        ServerMessage(MessageKind.SHARED_MEMORY, SHM_MESSAGE_VALUE, shm),
    ]
    for peer in join.existing:
        messages.extend(announcement(peer))
    messages.extend(ServerMessage(MessageKind.OWN_VECTOR, join.peer_id, fd) for fd in join.vectors)
    return messages


def announcement(event: Announcement) -> list[ServerMessage]:
    """The messages telling a client about another peer's join or departure."""
    if isinstance(event, PeerLeft):
        return [ServerMessage(MessageKind.PEER_GONE, event.peer_id)]
    return [ServerMessage(MessageKind.PEER_VECTOR, event.peer_id, fd) for fd in event.vectors]


class PeerOutbox:
    """One client's queue of messages not yet sent (a ``PeerSink`` for the domain).

    ``failure`` becomes a reason (and stays) once the connection must be dropped: its backlog
    went over the bound, or an fd it must send (the region, its own vectors) was closed."""

    __slots__ = ("_announced", "_greeting_left", "_max_backlog", "_queue", "failure")

    def __init__(self, max_backlog: int) -> None:
        """``max_backlog``: how many messages may wait beyond the greeting before the
        connection counts as stuck."""
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be positive, got {max_backlog}")
        self._queue: deque[ServerMessage] = deque()
        self._max_backlog = max_backlog
        self._greeting_left = 0
        self._announced: set[int] = set()
        self.failure: str | None = None

    def greet(self, messages: Sequence[ServerMessage]) -> None:
        """Queue the greeting, first; it does not count against the backlog bound."""
        if self._queue or self._announced:
            raise ProtocolError("greeting queued after other messages")
        self._queue.extend(messages)
        self._greeting_left = len(messages)

    def announce(self, event: Announcement) -> None:
        messages = announcement(event)
        if self.failure is not None:
            return
        if self.backlog + len(messages) > self._max_backlog:
            self.failure = f"backlog over {self._max_backlog} messages"
            self._queue.clear()
            self._greeting_left = 0
            return
        self._queue.extend(messages)

    def next_message(self) -> ServerMessage | None:
        """The next message to send now, or None if there is none (stale ones are skipped)."""
        while self.failure is None and self._queue:
            message = self._queue.popleft()
            if self._greeting_left:
                self._greeting_left -= 1
            if message.fd is not None and message.fd.closed:
                if message.kind is MessageKind.PEER_VECTOR:
                    continue  # its peer left before we could send it: the departure follows
                self.failure = f"{message.kind.value} fd closed before it was sent"
                return None
            if message.kind is MessageKind.PEER_VECTOR:
                self._announced.add(message.value)
            elif message.kind is MessageKind.PEER_GONE:
                if message.value not in self._announced:
                    continue  # never told about this peer, so nothing to retract
                self._announced.discard(message.value)
            return message
        return None

    @property
    def backlog(self) -> int:
        """Messages waiting beyond the greeting."""
        return len(self._queue) - self._greeting_left


# ----------------------------------------------------------------------------- client side


@dataclass(frozen=True, slots=True)
class Welcome:
    """Steps 1-2 done: the server speaks our version and gave us ``peer_id``."""

    peer_id: int


@dataclass(frozen=True, slots=True)
class SharedMemory:
    fd: OwnedFd


@dataclass(frozen=True, slots=True)
class PeerVector:
    """Writing ``fd`` rings vector ``vector`` of peer ``peer_id``."""

    peer_id: int
    vector: int
    fd: OwnedFd


@dataclass(frozen=True, slots=True)
class OwnVector:
    """Reading ``fd`` tells us vector ``vector`` was rung."""

    vector: int
    fd: OwnedFd


@dataclass(frozen=True, slots=True)
class PeerGone:
    peer_id: int


@dataclass(frozen=True, slots=True)
class ServerClosed:
    """The server closed the stream at a message boundary."""


ClientEvent = Welcome | SharedMemory | PeerVector | OwnVector | PeerGone | ServerClosed


class NeedData(enum.Enum):
    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA


class _State(enum.Enum):
    VERSION = "version"
    PEER_ID = "peer-id"
    SHARED_MEMORY = "shared-memory"
    RUNNING = "running"
    CLOSED = "closed"
    BROKEN = "broken"


class ClientDecoder:
    """Turns the server's byte stream and fds into ``ClientEvent``s. Fds received become the
    decoder's until an event hands them out; ``close`` closes any it still holds. After a
    ``ProtocolError`` the decoder is broken and every call raises it again."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._received = 0  # stream offset of the end of the data received so far
        self._decoded = 0  # stream offset of the next message to decode
        self._fds: dict[int, list[OwnedFd]] = {}  # message start offset -> its fds
        self._state = _State.VERSION
        self._peer_id = -1
        self._vectors: dict[int, int] = {}  # peer id -> vectors received so far
        self._own_vectors = 0
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def peer_id(self) -> int:
        """Our id, -1 before the server sent it."""
        return self._peer_id

    def receive_data(self, data: bytes, fds: Sequence[OwnedFd] = ()) -> None:
        """Feed one ``recvmsg`` result; ``b""`` means end of stream. Takes ownership of ``fds``."""
        fds = list(fds)
        try:
            self._raise_if_broken()
            if self._eof:
                raise ProtocolError("data after end of stream")
            if not data:
                if fds:
                    raise ProtocolError("fds without data")
                self._eof = True
                return
            if fds:
                start = self._received
                owner = (start + len(data) - 1) // MESSAGE_SIZE * MESSAGE_SIZE
                if owner < start:
                    raise ProtocolError("fds arrived in the middle of a message")
                if owner in self._fds:
                    raise ProtocolError("two batches of fds for one message")
                self._fds[owner] = fds
                fds = []
            self._buffer += data
            self._received += len(data)
        except ProtocolError as exc:
            close_all(fds)
            self._break(exc)
            raise

    def next_event(self) -> ClientEvent | NeedData:
        self._raise_if_broken()
        try:
            while True:
                if len(self._buffer) < MESSAGE_SIZE:
                    if not self._eof:
                        return NEED_DATA
                    if self._buffer:
                        raise ProtocolError(
                            f"stream ended inside a message ({len(self._buffer)} of 8 bytes)"
                        )
                    self._state = _State.CLOSED
                    return ServerClosed()
                (value,) = _INT64.unpack_from(self._buffer)
                del self._buffer[:MESSAGE_SIZE]
                fds = self._fds.pop(self._decoded, [])
                self._decoded += MESSAGE_SIZE
                if len(fds) > 1:
                    count = len(fds)
                    close_all(fds)
                    raise ProtocolError(f"message {value} came with {count} fds, not 1")
                event = self._event(value, fds[0] if fds else None)
                if event is not None:
                    return event
        except ProtocolError as exc:
            self._break(exc)
            raise

    def close(self) -> None:
        """Close the fds received and not handed out by an event."""
        pending = [fd for fds in self._fds.values() for fd in fds]
        self._fds.clear()
        close_all(pending)

    def _event(self, value: int, fd: OwnedFd | None) -> ClientEvent | None:
        try:
            return self._decode(value, fd)
        except ProtocolError:
            if fd is not None:
                fd.close()
            raise

    def _decode(self, value: int, fd: OwnedFd | None) -> ClientEvent | None:
        state = self._state
        if state is _State.VERSION:
            self._expect_no_fd(value, fd, "version")
            if value != PROTOCOL_VERSION:
                raise VersionMismatch(PROTOCOL_VERSION, value)
            self._state = _State.PEER_ID
            return None
        if state is _State.PEER_ID:
            self._expect_no_fd(value, fd, "own peer id")
            self._check_peer_id(value)
            self._peer_id = value
            self._state = _State.SHARED_MEMORY
            return Welcome(value)
        if state is _State.SHARED_MEMORY:
            if value != SHM_MESSAGE_VALUE or fd is None:
                raise ProtocolError(
                    f"expected -1 with the shared memory fd, got {value} "
                    f"{'with' if fd is not None else 'without'} an fd"
                )
            self._state = _State.RUNNING
            return SharedMemory(fd)
        self._check_peer_id(value)
        if fd is None:
            if value == self._peer_id or value not in self._vectors:
                raise ProtocolError(f"departure of peer {value}, which we do not know")
            del self._vectors[value]
            return PeerGone(value)
        if value == self._peer_id:
            self._own_vectors += 1
            return OwnVector(self._own_vectors - 1, fd)
        vector = self._vectors.get(value, 0)
        self._vectors[value] = vector + 1
        return PeerVector(value, vector, fd)

    @staticmethod
    def _expect_no_fd(value: int, fd: OwnedFd | None, what: str) -> None:
        if fd is not None:
            raise ProtocolError(f"{what} message ({value}) came with an fd")

    @staticmethod
    def _check_peer_id(value: int) -> None:
        if not 0 <= value <= MAX_PEER_ID:
            raise ProtocolError(f"peer id {value} outside 0..{MAX_PEER_ID}")

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise self._error

    def _break(self, exc: ProtocolError) -> None:
        self._error = exc
        self._state = _State.BROKEN
        self._buffer.clear()
        self.close()


def receive_all(decoder: ClientDecoder) -> Iterable[ClientEvent]:
    """Every event the decoder can produce from what it has been fed."""
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            return
        yield event
        if isinstance(event, ServerClosed):
            return
