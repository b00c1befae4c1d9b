"""``msixhub bench blk``: virtio-blk reads through the whole system, beside ``os.preadv`` of the
same file from one process.

Ours: a hub and a virtio-blk daemon run as processes; this process is the VMM with a pretend
guest (``client/guest.py``): the toolkit's driver puts each request on the split ring in guest
RAM, kicks the queue's ioeventfd, the daemon pops it and ``preadv``s the image straight into
guest RAM from a worker thread, completes it on the used ring and signals the queue's vector
(one eventfd write, the hub off the path), the VMM's reader takes the interrupt and the driver
harvests the used ring. The data stays in guest RAM, where a guest's page cache would keep it;
the baseline's data stays in its buffer. Each slot (request header, data buffer, status byte)
is preallocated in guest RAM, as a guest's block layer owns its pages.

Baseline: the same offsets read with ``os.preadv`` in a loop, in this process, into as many
preallocated buffers (taken in turn) as ours has requests in flight, so both sides write the
same amount of distinct memory. The QD32 baseline is that same loop (a synchronous read of
a cached file has no queue to fill; 32 Python threads reading at once were measured slower
than the loop).

* 4 KiB random reads at queue depth 1 and 32 (IOPS), 4 KiB-aligned offsets drawn once;
* 1 MiB sequential reads (MB/s) at queue depth 1, and at ``SEQ_DEPTH`` (a guest's
  readahead); a last row compares the latter with a baseline that reads into one buffer
  again and again (it stays in the CPU caches, which flatters the baseline).

Page cache: the image is written and then read once whole before anything is timed, so both
sides read the same cached file; neither touches the disk. Rounds alternate (baseline, ours,
...) so drift hits both alike; medians are reported. No CPU pinning is imposed: every process
(hub, daemon and its worker threads, this process) may run on every CPU this one may, which
the report names.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from msixhub.bench.report import Report
from msixhub.client.virtio_driver import BlkDriver, VirtioPciDriver
from msixhub.devices.virtio.blk import REQUEST_HEADER, SECTOR, BlkStatus, BlkType
from msixhub.testing.virtio_system import BLK, virtio_system

IMAGE_SIZE = 256 << 20
SMALL = 4096
LARGE = 1 << 20
DEEP = 32
SEQ_DEPTH = 16
ROUNDS = 3
MIN_ROUND = 0.3  # seconds
OFFSETS = 1 << 16  # random offsets drawn once, cycled through by both sides


@dataclass(frozen=True, slots=True)
class _Slot:
    """One request's guest buffers: header, data, status byte."""

    header: int
    data: int
    status: int


class _Reader:
    """Read requests through the toolkit's driver, from preallocated guest buffers."""

    def __init__(self, driver: VirtioPciDriver, slots: int, size: int) -> None:
        self.driver = driver
        self.memory = driver.memory
        allocator = driver.allocator
        self.slots = [
            _Slot(
                allocator.alloc(REQUEST_HEADER.size, 16),
                allocator.alloc(size, 4096),
                allocator.alloc(1, 1),
            )
            for _ in range(slots)
        ]

    async def read(self, slot: _Slot, offset: int, length: int) -> None:
        memory = self.memory
        memory.write(slot.header, REQUEST_HEADER.pack(BlkType.IN, 0, offset // SECTOR))
        await self.driver.submit(
            0, [(slot.header, REQUEST_HEADER.size)], [(slot.data, length), (slot.status, 1)]
        )
        status = memory.read(slot.status, 1)[0]
        if status != BlkStatus.OK:
            raise RuntimeError(f"read of {length} bytes at {offset:#x} failed: status {status}")


def measure(seconds: float) -> Report:
    round_seconds = max(seconds / ROUNDS, MIN_ROUND)
    cpus = sorted(os.sched_getaffinity(0))
    report = Report(
        "blk",
        f"not pinned: hub, blk daemon (and its I/O threads) and this process (VMM and "
        f"baseline) all allowed on cpus {','.join(map(str, cpus))}",
    )
    with tempfile.TemporaryDirectory(prefix="msixhub-bench-blk-") as directory:
        image = _make_image(Path(directory))
        trio.run(_measure, Path(directory), image, round_seconds, report)
    report.notes.append(
        f"image {IMAGE_SIZE >> 20} MiB in a temp dir, cached (written, then read once whole, "
        "before timing): both sides read the page cache"
    )
    report.notes.append(
        "baseline: os.preadv loop in one process, same offsets and sizes, into as many "
        "buffers in turn as ours has requests in flight; the QD32 baseline is that loop "
        "(no queue depth for a synchronous read)"
    )
    report.notes.append(
        f"ours: data lands in guest RAM; 1 MiB sequential at queue depth {SEQ_DEPTH}, "
        "one 1 MiB data descriptor per request (guest RAM is contiguous)"
    )
    report.notes.append("command: msixhub bench blk [--seconds S] [--json]")
    return report


def _make_image(directory: Path) -> Path:
    image = directory / "disk.img"
    chunk = random.Random(0).randbytes(LARGE)
    with image.open("wb") as file:
        for _ in range(IMAGE_SIZE // LARGE):
            file.write(chunk)
    fd = os.open(image, os.O_RDONLY)
    try:
        buffer = bytearray(LARGE)
        for offset in range(0, IMAGE_SIZE, LARGE):  # into the page cache
            os.preadv(fd, [buffer], offset)
    finally:
        os.close(fd)
    return image


async def _measure(directory: Path, image: Path, round_seconds: float, report: Report) -> None:
    rng = random.Random(1)
    offsets = [rng.randrange(IMAGE_SIZE // SMALL) * SMALL for _ in range(OFFSETS)]
    sequential = list(range(0, IMAGE_SIZE, LARGE))
    fd = os.open(image, os.O_RDONLY)
    try:
        async with virtio_system(directory, image=image, ram=128 << 20) as system:
            driver = await system.guest.virtio(BLK)
            await _start(driver)
            small = _Reader(driver, DEEP, SMALL)
            large = _Reader(driver, SEQ_DEPTH, LARGE)
            await _check_data(fd, large, LARGE)

            async def ours_qd1() -> float:
                return await _ours(small, offsets, SMALL, 1, round_seconds)

            async def ours_qd32() -> float:
                return await _ours(small, offsets, SMALL, DEEP, round_seconds)

            async def ours_seq_qd1() -> float:
                return await _ours(large, sequential, LARGE, 1, round_seconds) * LARGE / 1e6

            async def ours_seq() -> float:
                return await _ours(large, sequential, LARGE, SEQ_DEPTH, round_seconds) * LARGE / 1e6

            async def bare_qd1() -> float:
                return _preadv_loop(fd, offsets, SMALL, 1, round_seconds)

            async def bare_qd32() -> float:
                return _preadv_loop(fd, offsets, SMALL, DEEP, round_seconds)

            async def bare_seq() -> float:
                return _preadv_loop(fd, sequential, LARGE, SEQ_DEPTH, round_seconds) * LARGE / 1e6

            async def bare_seq_one_buffer() -> float:  # also the QD1 baseline: one buffer
                return _preadv_loop(fd, sequential, LARGE, 1, round_seconds) * LARGE / 1e6

            for what, ours, bare, unit in (
                ("4 KiB random read, QD1", ours_qd1, bare_qd1, "IOPS"),
                ("4 KiB random read, QD32", ours_qd32, bare_qd32, "IOPS"),
                ("1 MiB sequential read, QD1", ours_seq_qd1, bare_seq_one_buffer, "MB/s"),
                (f"1 MiB sequential read, QD{SEQ_DEPTH}", ours_seq, bare_seq, "MB/s"),
                ("  same, baseline into one buffer", ours_seq, bare_seq_one_buffer, "MB/s"),
            ):
                await ours()  # a round to warm up: the rings, the caches, the scheduler
                ours_median, bare_median = await _alternate(ours, bare)
                report.add(what, unit, ours_median, bare_median, higher_is_better=True)
    finally:
        os.close(fd)


async def _start(driver: VirtioPciDriver) -> None:
    await BlkDriver(driver, slots=1).start()  # negotiate, one queue, vectors


async def _check_data(fd: int, reader: _Reader, length: int) -> None:
    """Ours must read what the file holds (one request, compared with the baseline's read)."""
    slot = reader.slots[0]
    offset = IMAGE_SIZE - length
    await reader.read(slot, offset, length)
    if reader.memory.read(slot.data, length) != os.pread(fd, length, offset):
        raise RuntimeError("the device read different data from the file's")


async def _alternate(
    ours: Callable[[], Awaitable[float]], bare: Callable[[], Awaitable[float]]
) -> tuple[float, float]:
    """Medians of ROUNDS alternating rounds, baseline first."""
    ours_rounds, bare_rounds = [], []
    for _ in range(ROUNDS):
        bare_rounds.append(await bare())
        ours_rounds.append(await ours())
    return statistics.median(ours_rounds), statistics.median(bare_rounds)


async def _ours(
    reader: _Reader, offsets: list[int], length: int, depth: int, seconds: float
) -> float:
    """Requests per second with ``depth`` tasks, each with one request in flight, taking the
    next offset from one shared cursor until the time is up."""
    done = 0
    cursor = 0
    deadline = time.perf_counter() + seconds

    async def task(slot: _Slot) -> None:
        nonlocal done, cursor
        while time.perf_counter() < deadline:
            offset = offsets[cursor % len(offsets)]
            cursor += 1
            await reader.read(slot, offset, length)
            done += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for slot in reader.slots[:depth]:
            nursery.start_soon(task, slot)
    return done / (time.perf_counter() - start)


def _preadv_loop(fd: int, offsets: list[int], length: int, buffers: int, seconds: float) -> float:
    """Reads per second of a bare ``os.preadv`` loop over ``offsets``, into ``buffers``
    buffers in turn."""
    targets = [[bytearray(length)] for _ in range(buffers)]
    done = 0
    count = len(offsets)
    start = time.perf_counter()
    deadline = start + seconds
    while (now := time.perf_counter()) < deadline:
        for _ in range(64):
            os.preadv(fd, targets[done % buffers], offsets[done % count])
            done += 1
    return done / (now - start)
