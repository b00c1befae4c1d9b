"""virtio-blk: data integrity against a reference bytearray, every status rule, framings
Linux never uses, durability, and I/O that never leaves the image."""

from __future__ import annotations

import os
import random
import struct
import tempfile
from collections.abc import Iterator

import pytest
import trio
from msixhub.client.virtio_driver import BlkDriver, BlkError
from msixhub.client.virtqueue import DriverVirtqueue, GuestAllocator
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio import blk as blk_module
from msixhub.devices.virtio.blk import (
    ID_BYTES,
    SECTOR,
    SEGMENT,
    BlkDevice,
    BlkFeature,
    BlkStatus,
    BlkType,
    _transfer,
)
from msixhub.devices.virtio.constants import bit
from msixhub.devices.virtio.ring import SplitVirtqueue
from msixhub.protocol.fds import memfd
from virtio_harness import virtio_system

IMAGE = 1 << 20
SECTORS = IMAGE // SECTOR


@pytest.fixture
def image() -> Iterator[int]:
    with tempfile.TemporaryFile() as file:
        os.ftruncate(file.fileno(), IMAGE)
        yield file.fileno()


def image_bytes(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


@pytest.mark.parametrize(
    ("seed", "features", "segment"),
    [
        (1, BlkDriver.FEATURES, 4096),  # indirect tables, event idx
        (2, BlkDriver.FEATURES & ~bit(28) & ~bit(29), 4096),  # direct chains, no event idx
        (3, BlkDriver.FEATURES, 1024),  # many small segments
    ],
)
async def test_random_io_matches_a_reference(
    image: int, seed: int, features: int, segment: int
) -> None:
    rng = random.Random(seed)
    reference = bytearray(IMAGE)
    async with virtio_system(lambda: BlkDevice(image)) as system:
        blk = BlkDriver(system.driver, slots=8, max_transfer=64 << 10, segment=segment)
        with trio.fail_after(30):
            await blk.start(features)
            for _ in range(25):
                # a batch of concurrent requests on disjoint ranges
                starts = sorted(rng.sample(range(0, SECTORS - 128, 128), 6))
                async with trio.open_nursery() as nursery:
                    for start in starts:
                        sector = start + rng.randrange(0, 64)
                        count = rng.randrange(1, 65)
                        nursery.start_soon(_random_op, blk, rng, reference, sector, count)
            assert await blk.read(0, 64 << 10) == reference[: 64 << 10]
    assert image_bytes(image) == reference


async def _random_op(
    blk: BlkDriver, rng: random.Random, reference: bytearray, sector: int, count: int
) -> None:
    span = slice(sector * SECTOR, (sector + count) * SECTOR)
    match rng.choice(["read", "write", "write", "zeroes"]):
        case "read":
            assert await blk.read(sector, count * SECTOR) == reference[span]
        case "write":
            data = rng.randbytes(count * SECTOR)
            await blk.write(sector, data)
            reference[span] = data
        case "zeroes":
            await blk.write_zeroes(sector, count)
            reference[span] = bytes(count * SECTOR)


async def test_ranges_outside_the_image_fail_without_touching_it(image: int) -> None:
    os.pwrite(image, b"\xaa" * IMAGE, 0)
    async with virtio_system(lambda: BlkDevice(image)) as system:
        blk = BlkDriver(system.driver)
        with trio.fail_after(10):
            await blk.start()
            assert blk.capacity == SECTORS
            for sector, length in [
                (SECTORS - 1, 2 * SECTOR),
                (SECTORS, SECTOR),
                ((1 << 64) - 1, SECTOR),
                (0, 100),
            ]:
                with pytest.raises(BlkError) as read_error:
                    await blk.read(sector, length)
                with pytest.raises(BlkError) as write_error:
                    await blk.write(sector, b"\x55" * length)
                assert read_error.value.status == write_error.value.status == BlkStatus.IOERR
            for count in (0x7FFFFFFF, 2):
                with pytest.raises(BlkError):
                    await blk.write_zeroes(SECTORS - 1, count)
            status, _, used = await blk.request(BlkType.IN, SECTORS - 1, in_len=SECTOR)
            assert (status, used) == (BlkStatus.OK, SECTOR + 1)  # data + status byte
            status, _, used = await blk.request(BlkType.OUT, 0, out=b"\xaa" * SECTOR)
            assert (status, used) == (BlkStatus.OK, 1)
    assert os.fstat(image).st_size == IMAGE
    assert image_bytes(image) == b"\xaa" * IMAGE


async def test_read_only_device(image: int) -> None:
    async with virtio_system(lambda: BlkDevice(image, read_only=True)) as system:
        blk = BlkDriver(system.driver)
        with trio.fail_after(10):
            await blk.start()
            assert blk.read_only
            assert not system.driver.features & bit(BlkFeature.DISCARD)
            with pytest.raises(BlkError) as error:
                await blk.write(0, b"x" * SECTOR)
            assert error.value.status == BlkStatus.IOERR
            status, _, _ = await blk.request(BlkType.WRITE_ZEROES, out=SEGMENT.pack(0, 1, 0))
            assert status == BlkStatus.UNSUPP  # not negotiated
            await blk.flush()
            assert await blk.read(0, SECTOR) == bytes(SECTOR)
    assert image_bytes(image) == bytes(IMAGE)


async def test_get_id_and_unknown_requests(image: int) -> None:
    serial = b"S" * ID_BYTES  # exactly 20 bytes: no NUL terminator
    async with virtio_system(lambda: BlkDevice(image, serial=serial)) as system:
        blk = BlkDriver(system.driver)
        with trio.fail_after(10):
            await blk.start()
            assert await blk.get_id() == serial
            for kind in (2, 10, 14, 99, 0xFFFFFFFF):  # SCSI, GET_LIFETIME, SECURE_ERASE...
                status, _, used = await blk.request(kind, 0, in_len=SECTOR)
                assert (status, used) == (BlkStatus.UNSUPP, 1)


async def test_discard_and_write_zeroes_rules(image: int) -> None:
    os.pwrite(image, b"\xee" * IMAGE, 0)
    async with virtio_system(lambda: BlkDevice(image, max_segments=2)) as system:
        blk = BlkDriver(system.driver)
        with trio.fail_after(10):
            await blk.start()
            cases = [
                (BlkType.DISCARD, SEGMENT.pack(0, 8, 1), BlkStatus.UNSUPP),  # unmap on discard
                (BlkType.WRITE_ZEROES, SEGMENT.pack(0, 8, 2), BlkStatus.UNSUPP),  # reserved
                (BlkType.WRITE_ZEROES, SEGMENT.pack(0, 8, 0)[:15], BlkStatus.IOERR),
                (BlkType.WRITE_ZEROES, SEGMENT.pack(0, 1, 0) * 3, BlkStatus.IOERR),  # > max seg
                # a bad second segment: the first one is not carried out either
                (
                    BlkType.WRITE_ZEROES,
                    SEGMENT.pack(0, 8, 0) + SEGMENT.pack(SECTORS, 1, 0),
                    BlkStatus.IOERR,
                ),
                (BlkType.DISCARD, SEGMENT.pack(0, 8, 0), BlkStatus.OK),  # a hint: data stays
            ]
            for kind, payload, expected in cases:
                status, _, _ = await blk.request(kind, out=payload)
                assert status == expected, (kind, payload)
            assert image_bytes(image) == b"\xee" * IMAGE
            two = SEGMENT.pack(8, 2, 1) + SEGMENT.pack(100, 1, 0)  # unmap allowed on zeroes
            status, _, _ = await blk.request(BlkType.WRITE_ZEROES, out=two)
            assert status == BlkStatus.OK
    expected = bytearray(b"\xee" * IMAGE)
    expected[8 * SECTOR : 10 * SECTOR] = bytes(2 * SECTOR)
    expected[100 * SECTOR : 101 * SECTOR] = bytes(SECTOR)
    assert image_bytes(image) == expected


@pytest.mark.parametrize(("negotiate_flush", "syncs_per_write"), [(True, 0), (False, 1)])
async def test_writethrough_unless_flush_is_negotiated(
    image: int, monkeypatch: pytest.MonkeyPatch, negotiate_flush: bool, syncs_per_write: int
) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(blk_module.os, "fdatasync", syncs.append)
    features = BlkDriver.FEATURES if negotiate_flush else BlkDriver.FEATURES & ~bit(9)
    async with virtio_system(lambda: BlkDevice(image)) as system:
        blk = BlkDriver(system.driver)
        with trio.fail_after(10):
            await blk.start(features)
            await blk.write(0, b"w" * SECTOR)
            assert len(syncs) == syncs_per_write
            await blk.flush()
            assert len(syncs) == syncs_per_write + 1


async def test_large_block_size(image: int) -> None:
    os.ftruncate(image, IMAGE + 1000)  # a partial block at the end is not exposed
    async with virtio_system(lambda: BlkDevice(image, blk_size=4096)) as system:
        blk = BlkDriver(system.driver)
        with trio.fail_after(10):
            await blk.start()
            assert (blk.capacity, blk.blk_size) == (SECTORS, 4096)
            await blk.write(8, b"k" * 4096)
            for sector, length in [(1, 4096), (8, 512)]:
                with pytest.raises(BlkError):
                    await blk.read(sector, length)
            assert await blk.read(8, 4096) == b"k" * 4096


def test_framings_linux_does_not_use(image: int) -> None:
    """Header and data in one buffer; data and status in one buffer (5.2.6: any framing)."""
    with memfd(1 << 20, "blk-framing") as fd, GuestMemory.from_memfd(fd, 1 << 20) as memory:
        allocator = GuestAllocator(0x1000, (1 << 20) - 0x1000)
        driver = DriverVirtqueue(memory, allocator, 8, event_idx=False, indirect=False)
        device_ring = SplitVirtqueue(memory, driver.layout, event_idx=False, indirect=False)
        device = BlkDevice(image)
        out = allocator.alloc(16 + 1024)
        memory.write(out, struct.pack("<IIQ", BlkType.OUT, 0, 4) + b"h" * 1024)
        status = allocator.alloc(1)
        driver.add([(out, 10), (out + 10, 16 + 1024 - 10)], [(status, 1)], "write")
        in_ = allocator.alloc(16)
        memory.write(in_, struct.pack("<IIQ", BlkType.IN, 0, 4))
        data_and_status = allocator.alloc(1024 + 1)
        driver.add([(in_, 16)], [(data_and_status, 300), (data_and_status + 300, 725)], "read")
        for _ in range(2):
            chain = device_ring.pop()
            assert chain is not None
            written = device.parse(0, chain).execute()
            device_ring.push(chain.head, written)
            chain.release()
        assert memory.read(status, 1) == bytes([BlkStatus.OK])
        assert memory.read(data_and_status, 1025) == b"h" * 1024 + bytes([BlkStatus.OK])
        assert driver.get_used().length == 1  # type: ignore[union-attr]
        assert driver.get_used().length == 1025  # type: ignore[union-attr]
        device_ring.close()


def test_transfers_split_at_iov_max() -> None:
    with tempfile.TemporaryFile() as file:
        count = blk_module.IOV_MAX + 476
        data = random.Random(7).randbytes(count * 64)
        source = [memoryview(data)[i * 64 : (i + 1) * 64] for i in range(count)]
        assert _transfer(os.pwritev, file.fileno(), source, 512) == len(data)
        target = bytearray(len(data))
        views = [memoryview(target)[i * 64 : (i + 1) * 64] for i in range(count)]
        assert _transfer(os.preadv, file.fileno(), views, 512) == len(data)
        assert target == data
        assert _transfer(os.preadv, file.fileno(), views, 1024) == len(data) - 512  # EOF


def test_device_rejects_bad_construction(image: int) -> None:
    for kwargs in (
        {"blk_size": 1000},
        {"blk_size": 256},
        {"serial": b"x" * 21},
        {"queue_size": 100},
    ):
        with pytest.raises(ValueError):
            BlkDevice(image, **kwargs)  # type: ignore[arg-type]


async def test_a_batch_of_requests_costs_one_kick(image: int) -> None:
    """``add`` queues without waiting; ``kick`` publishes the batch and notifies once; the
    interrupt handler calls every request's callback with its used length."""
    content = random.Random(9).randbytes(IMAGE)
    os.pwrite(image, content, 0)
    async with virtio_system(lambda: BlkDevice(image)) as system:
        driver, memory = system.driver, system.memory
        with trio.fail_after(10):
            await BlkDriver(driver).start()
            requests = 8
            done: dict[int, int] = {}
            all_done = trio.Event()
            buffers = []
            for number in range(requests):
                header, data, status = (driver.allocator.alloc(size) for size in (16, SECTOR, 1))
                memory.write(header, blk_module.REQUEST_HEADER.pack(BlkType.IN, 0, 3 * number))

                def on_done(length: int, number: int = number) -> None:
                    done[number] = length
                    if len(done) == requests:
                        all_done.set()

                driver.add(0, [(header, 16)], [(data, SECTOR), (status, 1)], on_done)
                buffers.append((data, status))
            kicks = system.runner.kicks[0]
            await driver.kick(0)
            assert system.runner.kicks[0] == kicks + 1
            await all_done.wait()
            assert done == dict.fromkeys(range(requests), SECTOR + 1)
            for number, (data, status) in enumerate(buffers):
                assert memory.read(status, 1)[0] == BlkStatus.OK
                start = 3 * number * SECTOR
                assert memory.read(data, SECTOR) == content[start : start + SECTOR]
