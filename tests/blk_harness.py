"""virtio-blk requests without rings or processes: a cached image file and requests parsed
over a private "guest memory", for tests of the device's request paths."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from msixhub.devices.virtio.blk import REQUEST_HEADER, BlkDevice
from msixhub.devices.virtio.ring import Chain

UNTOUCHED = 0xEE  # what the device must leave alone reads back as this


@contextmanager
def cached_image(directory: Path, size: int, seed: int) -> Iterator[tuple[int, bytes]]:
    """An image of ``size`` random bytes, read once so it is in the page cache (reads then
    take the device's inline path first); yields its open fd and its content."""
    content = random.Random(seed).randbytes(size)
    path = directory / "disk.img"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pread(fd, size, 0)
        yield fd, content
    finally:
        os.close(fd)


def request(
    device: BlkDevice, kind: int, sector: int, length: int, out: bytes = b""
) -> tuple[object, bytearray]:
    """A parsed request over a private "guest memory": header (+ data out), data in, status."""
    memory = bytearray([UNTOUCHED]) * (16 + len(out) + length + 1)
    memory[:16] = REQUEST_HEADER.pack(kind, 0, sector)
    memory[16 : 16 + len(out)] = out
    view = memoryview(memory)
    readable = [view[: 16 + len(out)]]
    writable = [view[16 + len(out) : -1], view[-1:]] if length else [view[-1:]]
    return device.parse(0, Chain(0, readable, writable)), memory
