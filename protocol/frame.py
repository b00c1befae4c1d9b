"""Framing: an 8-byte header, then one msgpack body.

Header, little-endian: magic ``b"MX"`` (2 bytes), flags (u8, must be 0), number of attached
fds (u8), body length (u32).

The fds of a frame travel with its first byte (one ``sendmsg`` per frame; the kernel
attaches SCM_RIGHTS to the first byte and a ``recvmsg`` never reads past a message that
carries fds). A stream reader may still get them in a chunk that begins with earlier
frames' bytes, so the rule enforced here is: fds that arrived with a chunk belong to a
frame that *starts* inside that chunk. A frame that declares more fds than came with its
first byte is a protocol error, and so are fds that no frame can claim any more (they are
detected as soon as that is certain, so a peer cannot park fds in our process).

The decoder owns every fd it is given from the moment ``feed`` returns; each fd ends either
handed out with its frame or closed by ``close()``. Nothing here does I/O.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from msixhub.protocol.errors import ProtocolError
from msixhub.protocol.fds import OwnedFd, close_all

HEADER = struct.Struct("<2sBBI")
MAGIC = b"MX"
DEFAULT_MAX_FRAME = 1 << 20
MIN_MAX_FRAME = 4096  # no peer may ask for smaller frames than this
MAX_FRAME_LIMIT = 0xFFFF_FFFF  # the header's u32 length
MAX_FDS_LIMIT = 253  # SCM_MAX_FD
DEFAULT_MAX_FDS = 64


@dataclass(slots=True)
class Frame:
    body: bytes
    fds: list[OwnedFd]


@dataclass(slots=True)
class _FdBatch:
    """The fds that came with the stream bytes ``[start, end)``."""

    start: int
    end: int
    fds: deque[OwnedFd]


def encode_header(body_length: int, nfds: int) -> bytes:
    """The header of a frame; limits are the caller's business (``Connection`` checks them)."""
    return HEADER.pack(MAGIC, 0, nfds, body_length)


class FrameDecoder:
    """Turns a byte stream plus received fds into frames, enforcing the limits."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_fds: int = DEFAULT_MAX_FDS) -> None:
        self.max_frame = max_frame
        self.max_fds = max_fds
        self._buffer = bytearray()
        self._offset = 0  # stream offset of _buffer[0], which is always a frame start
        self._batches: deque[_FdBatch] = deque()
        self._length = -1  # body length of the frame being read, -1 until its header is in
        self._claimed: list[OwnedFd] = []  # fds of the frame being read

    def feed(self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()) -> None:
        """Take ``data`` and ownership of ``fds`` (closed by ``close()`` if never claimed)."""
        if fds:
            owned = deque(OwnedFd(fd, "received") for fd in fds)
            if owned:
                start = self._offset + len(self._buffer)
                self._batches.append(_FdBatch(start, start + len(data), owned))
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def held_fds(self) -> int:
        """How many received fds the decoder holds (claimed by a partial frame or not yet)."""
        return len(self._claimed) + sum(len(batch.fds) for batch in self._batches)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed."""
        buffer = self._buffer
        batches = self._batches
        if not buffer and not batches:
            return None  # the common case between frames: nothing in hand
        if self._length < 0:
            if len(buffer) < HEADER.size:
                if batches:
                    self._check_unclaimable(self._offset)
                return None
            magic, flags, nfds, length = HEADER.unpack_from(buffer)
            if magic != MAGIC:
                raise ProtocolError(f"bad frame magic {bytes(magic)!r}: not an msixhub stream")
            if flags:
                raise ProtocolError(f"unknown frame flags {flags:#x}")
            if length > self.max_frame:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the maximum of {self.max_frame}"
                )
            if nfds > self.max_fds:
                raise ProtocolError(
                    f"frame declares {nfds} fds, more than the maximum of {self.max_fds}"
                )
            if batches:
                self._check_unclaimable(self._offset)
            if nfds:
                self._claim(nfds)
            self._length = length
        end = HEADER.size + self._length
        if batches:
            self._check_unclaimable(self._offset + end)
        if len(buffer) < end:
            return None
        body = bytes(memoryview(buffer)[HEADER.size : end])
        del buffer[:end]
        self._offset += end
        self._length = -1
        fds, self._claimed = self._claimed, []
        return Frame(body, fds)

    def _claim(self, nfds: int) -> None:
        """Take the fds of the frame starting at ``_offset`` (they came with its first byte)."""
        batch = self._batches[0] if self._batches else None
        arrived = len(batch.fds) if batch is not None and batch.start <= self._offset else 0
        if arrived < nfds:
            raise ProtocolError(f"frame declares {nfds} fds but {arrived} arrived with it")
        assert batch is not None
        self._claimed = [batch.fds.popleft() for _ in range(nfds)]
        if not batch.fds:
            self._batches.popleft()

    def _check_unclaimable(self, next_start: int) -> None:
        """Fail if some fds came with bytes in which no frame can start any more."""
        batches = self._batches
        if batches and batches[0].end <= next_start:
            raise ProtocolError(
                f"{len(batches[0].fds)} fds arrived with bytes that no frame claims them from"
            )

    def close(self) -> None:
        """Close every fd still held (exactly once) and drop buffered bytes."""
        fds = self._claimed
        self._claimed = []
        for batch in self._batches:
            fds.extend(batch.fds)
        self._batches.clear()
        self._buffer.clear()
        close_all(fds)
