"""virtio-blk's inline path: a read the page cache holds is served on the caller's thread with
``RWF_NOWAIT``; anything else is declined untouched and left to ``execute`` (a worker thread).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from blk_harness import UNTOUCHED, cached_image, request
from msixhub.devices.virtio.blk import SECTOR, BlkDevice, BlkStatus, BlkType

IMAGE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    with cached_image(tmp_path, IMAGE, seed=7) as opened:
        yield opened


def test_a_cached_read_is_served_inline(image: tuple[int, bytes]) -> None:
    fd, content = image
    device = BlkDevice(fd)
    work, memory = request(device, BlkType.IN, 8, 4096)
    assert work.execute_nowait() == 4096 + 1  # type: ignore[attr-defined]
    assert memory[16:-1] == content[8 * SECTOR : 8 * SECTOR + 4096]
    assert memory[-1] == BlkStatus.OK


@pytest.mark.parametrize(
    ("kind", "sector", "length", "out"),
    [
        (BlkType.OUT, 0, 0, b"w" * SECTOR),  # writes always go to a thread
        (BlkType.FLUSH, 0, 0, b""),
        (BlkType.IN, IMAGE // SECTOR, SECTOR, b""),  # past the end: execute() answers IOERR
        (BlkType.IN, 0, 100, b""),  # not whole sectors
    ],
)
def test_anything_else_is_declined_untouched(
    image: tuple[int, bytes], kind: int, sector: int, length: int, out: bytes
) -> None:
    fd, content = image
    device = BlkDevice(fd)
    work, memory = request(device, kind, sector, length, out)
    before = bytes(memory)
    assert work.execute_nowait() is None  # type: ignore[attr-defined]
    assert bytes(memory) == before
    assert os.pread(fd, IMAGE, 0) == content
    work.execute()  # type: ignore[attr-defined]
    expected = BlkStatus.OK if kind in (BlkType.OUT, BlkType.FLUSH) else BlkStatus.IOERR
    assert memory[-1] == expected


def test_an_uncached_read_is_declined_or_served_whole(image: tuple[int, bytes]) -> None:
    """Dropped from the page cache (where the filesystem lets us), the read is declined; a
    filesystem that keeps everything in memory (tmpfs) serves it. Never half of it."""
    fd, content = image
    os.fsync(fd)
    os.posix_fadvise(fd, 0, IMAGE, os.POSIX_FADV_DONTNEED)
    device = BlkDevice(fd)
    work, memory = request(device, BlkType.IN, 512, 64 << 10)
    result = work.execute_nowait()  # type: ignore[attr-defined]
    if result is None:
        assert memory[-1] == UNTOUCHED
        assert work.execute() == (64 << 10) + 1  # type: ignore[attr-defined]
    else:
        assert result == (64 << 10) + 1
    assert memory[16:-1] == content[512 * SECTOR : 512 * SECTOR + (64 << 10)]
    assert memory[-1] == BlkStatus.OK


def test_a_file_without_nowait_reads_is_remembered(tmp_path: Path) -> None:
    """A pipe is no image, but it refuses RWF_NOWAIT preadv the way some files do."""
    read_end, write_end = os.pipe()
    try:
        device = BlkDevice(read_end)
        device.capacity = 8
        work, _ = request(device, BlkType.IN, 0, SECTOR)
        assert work.execute_nowait() is None  # type: ignore[attr-defined]
        assert not device.nowait_reads
    finally:
        os.close(read_end)
        os.close(write_end)
