"""Framing: an 8-byte header, then one msgpack body.

Header, little-endian: magic ``b"MX"`` (2 bytes), flags (u8, must be 0), number of attached
fds (u8), body length (u32). The fds of a frame travel with its first byte (one ``sendmsg``
per frame), so by the time a frame is complete its fds have arrived: fewer is a protocol
error. One read brings the fds of at most one frame (the kernel ends a read after a message
that carried fds), so whenever more bytes are needed, the fds waiting must all belong to
the frame begun in the buffer; any more is a protocol error too.

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
MAX_FDS_LIMIT = 253  # SCM_MAX_FD
DEFAULT_MAX_FDS = 64


@dataclass(slots=True)
class Frame:
    body: bytes
    fds: list[OwnedFd]


def encode_header(body_length: int, nfds: int, max_frame: int, max_fds: int) -> bytes:
    if body_length > max_frame:
        raise ProtocolError(f"frame of {body_length} bytes exceeds the maximum of {max_frame}")
    if nfds > max_fds:
        raise ProtocolError(f"frame with {nfds} fds exceeds the maximum of {max_fds}")
    return HEADER.pack(MAGIC, 0, nfds, body_length)


class FrameDecoder:
    """Turns a byte stream plus received fds into frames, enforcing the limits."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_fds: int = DEFAULT_MAX_FDS) -> None:
        self.max_frame = max_frame
        self.max_fds = max_fds
        self._buffer = bytearray()
        self._fds: deque[OwnedFd] = deque()
        self._header: tuple[int, int] | None = None  # (nfds, length) of the frame being read

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Take ``data`` and ownership of ``fds`` (closed by ``close()`` if never claimed)."""
        self._fds.extend(OwnedFd(fd, "received") for fd in fds)
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed."""
        if self._header is None:
            if len(self._buffer) < HEADER.size:
                # A frame's fds come with its first byte: with no frame begun, none may wait.
                self._check_surplus(claimable=self.max_fds if self._buffer else 0)
                return None
            magic, flags, nfds, length = HEADER.unpack_from(self._buffer)
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
                    f"frame declares {nfds} fds, more than the maximum {self.max_fds}"
                )
            self._header = (nfds, length)
        nfds, length = self._header
        end = HEADER.size + length
        if len(self._buffer) < end:
            self._check_surplus(claimable=nfds)
            return None
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame declares {nfds} fds but {len(self._fds)} arrived with it")
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        self._header = None
        return Frame(body, [self._fds.popleft() for _ in range(nfds)])

    def _check_surplus(self, claimable: int) -> None:
        if len(self._fds) > claimable:
            raise ProtocolError(
                f"{len(self._fds)} fds arrived but the frames in hand declare only {claimable}"
            )

    def close(self) -> None:
        """Close every fd still held (exactly once) and drop buffered bytes."""
        fds = list(self._fds)
        self._fds.clear()
        self._buffer.clear()
        close_all(fds)
