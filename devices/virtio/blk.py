"""virtio-blk (virtio 1.x section 5.2) over a raw image file.

A request is ``{le32 type; le32 reserved; le64 sector}``, then data, then one status
byte the device writes, framed in descriptors any way the driver likes (the device must
not assume a layout): the header is the first 16 device-readable bytes, the status the
last device-writable byte. A chain without room for both cannot be answered and stops the
queue; every other bad request is answered with a status.

Data moves straight between the image and guest memory: ``os.preadv``/``os.pwritev`` on
views of the mapping, no bounce buffer. :meth:`BlkRequest.execute` is synchronous and
meant for a worker thread. A read whose data is all in the page cache is a memory copy
that cannot block, so :meth:`BlkRequest.execute_nowait` serves it on the caller's thread
with ``RWF_NOWAIT`` (the kernel answers ``EAGAIN`` rather than wait for the disk), sparing
two thread handoffs; anything else is left to ``execute`` in a worker thread, as QEMU's
io_uring path tries a non-blocking submission first. Ranges are checked against the
capacity before any I/O, so a request never reads or writes outside the image.

Durability: FLUSH is offered. If the driver does not negotiate it, the device is
write-through (each write is followed by ``fdatasync``), as 5.2.6.1 requires.
DISCARD is a checked no-op (5.2.6.1: the device MAY deallocate); WRITE_ZEROES writes
zeroes and reports ``write_zeroes_may_unmap = 0``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from enum import IntEnum

from msixhub.devices.virtio.constants import DeviceId, bit
from msixhub.devices.virtio.ring import (
    Chain,
    VirtqueueError,
    read_views,
    slice_views,
    write_views,
)
from msixhub.protocol.fds import OwnedFd

SECTOR = 512
ID_BYTES = 20
IOV_MAX = os.sysconf("SC_IOV_MAX")
_ZERO_CHUNK = 1 << 20

REQUEST_HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes
# struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes)
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


class BlkConfig(IntEnum):
    """Offsets of the fields of ``struct virtio_blk_config`` a driver reads."""

    CAPACITY = 0
    SIZE_MAX = 8
    SEG_MAX = 12
    BLK_SIZE = 20
    NUM_QUEUES = 34
    MAX_DISCARD_SECTORS = 36
    MAX_DISCARD_SEG = 40
    DISCARD_SECTOR_ALIGNMENT = 44
    MAX_WRITE_ZEROES_SECTORS = 48
    MAX_WRITE_ZEROES_SEG = 52
    WRITE_ZEROES_MAY_UNMAP = 56


class BlkFeature(IntEnum):
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class BlkType(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class BlkStatus(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


SEGMENT_FLAG_UNMAP = 1

# Plain ints and bound methods for the per-request path (an IntEnum compare is slower).
_IN = int(BlkType.IN)
_OK = int(BlkStatus.OK)
_RWF_NOWAIT = os.RWF_NOWAIT
_unpack_header = REQUEST_HEADER.unpack_from
_HEADER_SIZE = REQUEST_HEADER.size


class BlkDevice:
    """The virtio-blk device type: one request queue over an image fd (the caller's)."""

    device_id = DeviceId.BLOCK
    pci_class = 0x010000  # mass storage, as QEMU's virtio-blk-pci
    num_queues = 1

    def __init__(
        self,
        image: OwnedFd | int,
        *,
        read_only: bool = False,
        queue_size: int = 256,
        blk_size: int = SECTOR,
        serial: bytes = b"msixhub",
        max_discard_sectors: int = 1 << 22,
        max_write_zeroes_sectors: int = 1 << 22,
        max_segments: int = 32,
        fail_sectors: Sequence[tuple[int, int]] = (),
    ) -> None:
        """``fail_sectors``: inclusive ``(first, last)`` sector ranges where I/O fails, for
        testing a guest's error paths without root (no dm-error, no faulty disk): a request
        that touches one is answered ``IOERR`` and moves no data."""
        if blk_size < SECTOR or blk_size & (blk_size - 1):
            raise ValueError(f"blk_size {blk_size} is not a power of two >= 512")
        if len(serial) > ID_BYTES:
            raise ValueError(f"serial is longer than {ID_BYTES} bytes")
        if queue_size < 4 or queue_size & (queue_size - 1):
            raise ValueError(f"queue size {queue_size} is not a power of two >= 4")
        for first, last in fail_sectors:
            if not 0 <= first <= last:
                raise ValueError(f"bad failing sector range {first}-{last}")
        self.fd = image if isinstance(image, int) else image.fileno()
        self.read_only = read_only
        self.max_queue_size = queue_size
        self.blk_size = blk_size
        self.serial = serial
        self.max_discard_sectors = max_discard_sectors
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_segments = max_segments
        self.fail_sectors = tuple(fail_sectors)
        image_bytes = os.fstat(self.fd).st_size
        self.capacity = image_bytes // blk_size * (blk_size // SECTOR)  # in 512-byte sectors
        self.nowait_reads = True  # cleared if the file refuses RWF_NOWAIT
        self._negotiated = 0

    # -- VirtioDevice -------------------------------------------------------------------

    def device_features(self) -> int:
        features = bit(BlkFeature.SEG_MAX) | bit(BlkFeature.BLK_SIZE) | bit(BlkFeature.FLUSH)
        if self.read_only:
            return features | bit(BlkFeature.RO)
        return features | bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES)

    def negotiate(self, features: int) -> bool:
        self._negotiated = features
        return True

    def reset(self) -> None:
        self._negotiated = 0

    def config_space(self) -> bytes:
        return CONFIG.pack(
            self.capacity,
            0,  # size_max (not offered)
            self.max_queue_size - 2,  # seg_max: room for the header and status descriptors
            0,
            0,
            0,  # geometry
            self.blk_size,
            0,
            0,
            0,
            0,  # topology
            0,
            0,  # writeback, unused0
            1,  # num_queues
            self.max_discard_sectors,
            self.max_segments,
            self.blk_size // SECTOR,  # discard_sector_alignment
            self.max_write_zeroes_sectors,
            self.max_segments,
            0,  # write_zeroes_may_unmap
        )

    def write_config(self, offset: int, data: bytes) -> None:
        """Every field is read-only without VIRTIO_BLK_F_CONFIG_WCE, which is not offered."""

    def parse(self, queue: int, chain: Chain) -> BlkRequest:
        if chain.read_len < _HEADER_SIZE:
            raise VirtqueueError(f"blk request at head {chain.head} has no 16-byte header")
        if chain.write_len < 1:
            raise VirtqueueError(f"blk request at head {chain.head} has no status byte")
        first = chain.readable[0]
        if len(first) >= _HEADER_SIZE:  # the header in one buffer, as drivers put it
            kind, _reserved, sector = _unpack_header(first)
        else:
            kind, _reserved, sector = REQUEST_HEADER.unpack(
                read_views(chain.readable, REQUEST_HEADER.size)
            )
        return BlkRequest(self, chain, kind, sector)

    # -- what requests check --------------------------------------------------------------

    @property
    def writethrough(self) -> bool:
        return not self._negotiated & bit(BlkFeature.FLUSH)

    def negotiated(self, feature: BlkFeature) -> bool:
        return bool(self._negotiated & bit(feature))

    def range_ok(self, sector: int, length: int) -> bool:
        """Whether ``length`` bytes at ``sector`` are whole blocks inside the image."""
        return (
            length % self.blk_size == 0
            and (sector * SECTOR) % self.blk_size == 0
            and sector + length // SECTOR <= self.capacity
        )

    def injected_error(self, sector: int, count: int) -> bool:
        """Whether sectors ``[sector, sector + count)`` touch a range of ``fail_sectors``."""
        end = sector + count
        return any(start < end and sector <= last for start, last in self.fail_sectors)


class BlkRequest:
    """One parsed virtio-blk request; :meth:`execute` never raises.

    The data and status views are the chain's own when the driver framed the header and
    the status byte in buffers of their own (every driver does); else they are cut from
    the chain's views, and those cuts are this request's to release. The chain's views
    are the transport's (see :class:`~msixhub.devices.virtio.device.DeviceRequest`)."""

    __slots__ = (
        "_cuts",
        "chain",
        "device",
        "in_data",
        "in_len",
        "kind",
        "out_data",
        "sector",
        "status_view",
    )
    blocking = True

    def __init__(self, device: BlkDevice, chain: Chain, kind: int, sector: int) -> None:
        self.device = device
        self.chain = chain
        self.kind = kind
        self.sector = sector
        self.in_len = in_len = chain.write_len - 1
        readable, writable = chain.readable, chain.writable
        cuts: list[memoryview] = []
        if len(readable[0]) == _HEADER_SIZE:
            self.out_data = readable[1:]
        else:
            self.out_data = slice_views(readable, _HEADER_SIZE, chain.read_len)
            cuts += self.out_data
        if len(writable[-1]) == 1:
            self.in_data, self.status_view = writable[:-1], writable[-1]
        else:
            self.in_data = slice_views(writable, 0, in_len)
            self.status_view = slice_views(writable, in_len, chain.write_len)[0]
            cuts += self.in_data
            cuts.append(self.status_view)
        self._cuts = cuts

    def execute(self) -> int:
        """Do the request, write the status byte; returns bytes written (data + status)."""
        try:
            status, written = self._run()
        except OSError:
            status, written = BlkStatus.IOERR, 0
        return self._finish(status, written)

    def execute_nowait(self) -> int | None:
        """A read whose data is all in the page cache, done now (see the module doc); None,
        with nothing done that :meth:`execute` would not redo, for anything else.

        Runs for every cached read, so the checks of :meth:`BlkDevice.range_ok` are inlined."""
        device = self.device
        if self.kind != _IN or not device.nowait_reads:
            return None
        in_data, length, sector = self.in_data, self.in_len, self.sector
        blk_size = device.blk_size
        if (
            len(in_data) > IOV_MAX
            or length % blk_size
            or (sector << 9) % blk_size
            or sector + (length >> 9) > device.capacity
        ):
            return None
        if device.fail_sectors and device.injected_error(sector, length >> 9):
            return self._finish(BlkStatus.IOERR, 0)
        try:
            done = os.preadv(device.fd, in_data, sector << 9, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError:
            device.nowait_reads = False  # e.g. EOPNOTSUPP: this file never takes it
            return None
        if done != length:
            return None  # partly cached: the worker thread reads it all again
        return self._finish(_OK, length)

    def _finish(self, status: int, written: int) -> int:
        try:
            self.status_view[0] = status
            return written + 1
        finally:
            for view in self._cuts:
                view.release()

    def _run(self) -> tuple[BlkStatus, int]:
        device = self.device
        match self.kind:
            case BlkType.IN:
                length = self.in_len
                if not device.range_ok(self.sector, length) or device.injected_error(
                    self.sector, length // SECTOR
                ):
                    return BlkStatus.IOERR, 0
                done = _transfer(os.preadv, device.fd, self.in_data, self.sector * SECTOR)
                return (BlkStatus.OK, length) if done == length else (BlkStatus.IOERR, 0)
            case BlkType.OUT:
                length = sum(map(len, self.out_data))
                if (
                    device.read_only
                    or not device.range_ok(self.sector, length)
                    or device.injected_error(self.sector, length // SECTOR)
                ):
                    return BlkStatus.IOERR, 0
                done = _transfer(os.pwritev, device.fd, self.out_data, self.sector * SECTOR)
                if done != length:
                    return BlkStatus.IOERR, 0
                self._settle()
                return BlkStatus.OK, 0
            case BlkType.FLUSH:
                os.fdatasync(device.fd)
                return BlkStatus.OK, 0
            case BlkType.GET_ID:
                return BlkStatus.OK, write_views(self.in_data, device.serial.ljust(ID_BYTES, b"\0"))
            case BlkType.DISCARD | BlkType.WRITE_ZEROES:
                return self._discard_or_zero(), 0
            case _:
                return BlkStatus.UNSUPP, 0

    def _discard_or_zero(self) -> BlkStatus:
        """Check every segment first, so a bad one leaves the image untouched."""
        device = self.device
        zeroes = self.kind == BlkType.WRITE_ZEROES
        feature = BlkFeature.WRITE_ZEROES if zeroes else BlkFeature.DISCARD
        if not device.negotiated(feature):
            return BlkStatus.UNSUPP
        if device.read_only:
            return BlkStatus.IOERR
        raw = b"".join(view.tobytes() for view in self.out_data)
        if not raw or len(raw) % SEGMENT.size or len(raw) // SEGMENT.size > device.max_segments:
            return BlkStatus.IOERR
        limit = device.max_write_zeroes_sectors if zeroes else device.max_discard_sectors
        segments = list(SEGMENT.iter_unpack(raw))
        for sector, count, flags in segments:
            if flags & ~SEGMENT_FLAG_UNMAP or (flags and not zeroes):
                return BlkStatus.UNSUPP  # 5.2.6.1: unknown flags, or unmap on a discard
            if count > limit or not device.range_ok(sector, count * SECTOR):
                return BlkStatus.IOERR
        if any(device.injected_error(sector, count) for sector, count, _flags in segments):
            return BlkStatus.IOERR
        if zeroes:
            for sector, count, _flags in segments:
                _write_zeroes(device.fd, sector * SECTOR, count * SECTOR)
            self._settle()
        return BlkStatus.OK

    def _settle(self) -> None:
        if self.device.writethrough:
            os.fdatasync(self.device.fd)


def _transfer(
    op: Callable[[int, Sequence[memoryview], int], int],
    fd: int,
    views: list[memoryview],
    offset: int,
) -> int:
    """preadv/pwritev until done, at most IOV_MAX buffers per call; bytes moved (short at EOF)."""
    pending = list(views)
    total = 0
    while pending:
        moved = op(fd, pending[:IOV_MAX], offset)
        if moved == 0:
            break
        total += moved
        offset += moved
        while moved:
            if len(pending[0]) <= moved:
                moved -= len(pending.pop(0))
            else:
                pending[0] = pending[0][moved:]
                moved = 0
    return total


def _write_zeroes(fd: int, offset: int, length: int) -> None:
    zeroes = memoryview(bytes(min(length, _ZERO_CHUNK)))
    while length:
        written = os.pwrite(fd, zeroes[: min(length, len(zeroes))], offset)
        offset += written
        length -= written
