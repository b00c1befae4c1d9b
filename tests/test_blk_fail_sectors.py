"""Injected I/O errors (``--fail-sectors``): a request that touches a failing sector is
answered IOERR and moves no data, in either direction; its neighbours are served; the data
outside stays intact. In process for every request kind, then across processes with the
daemon spawned by the hub from a ``[[device]]`` entry of its config."""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from blk_harness import UNTOUCHED, cached_image, request
from msixhub.client.guest import Guest
from msixhub.client.vmm import connect
from msixhub.devices.virtio.blk import (
    SECTOR,
    SEGMENT,
    BlkDevice,
    BlkFeature,
    BlkStatus,
    BlkType,
)
from msixhub.devices.virtio.constants import bit
from msixhub.devices.virtio.daemon import sector_ranges
from msixhub.testing.processes import hub_process

IMAGE = 1 << 20
FAILING = [(8, 15), (100, 100)]


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    with cached_image(tmp_path, IMAGE, seed=11) as opened:
        yield opened


def failing_device(fd: int) -> BlkDevice:
    device = BlkDevice(fd, fail_sectors=FAILING)
    device.negotiate(bit(BlkFeature.FLUSH) | bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES))
    return device


@pytest.mark.parametrize(
    ("sector", "sectors", "fails"),
    [
        (0, 8, False),  # ends just before the range
        (0, 9, True),  # its last sector is the range's first
        (15, 1, True),
        (16, 8, False),  # starts just after
        (4, 16, True),  # covers the whole range
        (99, 1, False),
        (99, 2, True),  # a one-sector range
        (101, 8, False),
    ],
)
def test_reads_and_writes_touching_a_failing_sector(
    image: tuple[int, bytes], sector: int, sectors: int, fails: bool
) -> None:
    fd, content = image
    device = failing_device(fd)
    length = sectors * SECTOR
    expected = BlkStatus.IOERR if fails else BlkStatus.OK
    for inline in (True, False):
        work, memory = request(device, BlkType.IN, sector, length)
        written = work.execute_nowait() if inline else work.execute()  # type: ignore[attr-defined]
        assert memory[-1] == expected
        if fails:
            assert written == 1
            assert memory[16:-1] == bytes([UNTOUCHED]) * length  # no data moved
        else:
            assert memory[16:-1] == content[sector * SECTOR : sector * SECTOR + length]
    data = b"\x5a" * length
    work, memory = request(device, BlkType.OUT, sector, 0, data)
    assert work.execute_nowait() is None  # type: ignore[attr-defined]
    assert work.execute() == 1  # type: ignore[attr-defined]
    assert memory[-1] == expected
    after = os.pread(fd, IMAGE, 0)
    start, end = sector * SECTOR, sector * SECTOR + length
    assert after[:start] == content[:start] and after[end:] == content[end:]
    assert after[start:end] == (content[start:end] if fails else data)


def test_discard_and_write_zeroes_fail_whole(image: tuple[int, bytes]) -> None:
    """One segment that touches a failing sector fails the request; none is carried out."""
    fd, content = image
    device = failing_device(fd)
    for kind in (BlkType.WRITE_ZEROES, BlkType.DISCARD):
        payload = SEGMENT.pack(200, 8, 0) + SEGMENT.pack(12, 1, 0)
        work, memory = request(device, kind, 0, 0, payload)
        work.execute()  # type: ignore[attr-defined]
        assert memory[-1] == BlkStatus.IOERR
    assert os.pread(fd, IMAGE, 0) == content
    work, memory = request(device, BlkType.WRITE_ZEROES, 0, 0, SEGMENT.pack(16, 84, 0))
    work.execute()  # type: ignore[attr-defined]
    assert memory[-1] == BlkStatus.OK  # 16..99: between the ranges
    assert os.pread(fd, 84 * SECTOR, 16 * SECTOR) == bytes(84 * SECTOR)


def test_requests_without_sectors_are_served(image: tuple[int, bytes]) -> None:
    fd, _ = image
    device = failing_device(fd)
    for kind, length in ((BlkType.FLUSH, 0), (BlkType.GET_ID, 20)):
        work, memory = request(device, kind, 8, length)  # the sector field means nothing here
        work.execute()  # type: ignore[attr-defined]
        assert memory[-1] == BlkStatus.OK


def test_sector_ranges_option() -> None:
    assert sector_ranges("8-15,100") == [(8, 15), (100, 100)]
    assert sector_ranges(" 0-0 ") == [(0, 0)]
    for bad in ("", "x", "5-2", "-1-3", "1-2-3", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            sector_ranges(bad)
    with pytest.raises(ValueError, match="failing sector range"):
        BlkDevice(os.open("/dev/null", os.O_RDONLY), fail_sectors=[(5, 2)])


async def test_a_guest_sees_ioerr_only_on_failing_sectors(tmp_path: Path) -> None:
    """The hub spawns the daemon from its config with ``--fail-sectors``; the guest's driver
    gets IOERR for requests that touch them, and its data everywhere else."""
    content = random.Random(5).randbytes(IMAGE)
    image = tmp_path / "disk.img"
    image.write_bytes(content)
    args = ["--image", str(image), "--fail-sectors", "8-15,100"]
    config = tmp_path / "hub.toml"
    config.write_text(f'[[device]]\nkind = "virtio-blk"\nid = "blk0"\nargs = {json.dumps(args)}\n')
    reference = bytearray(content)
    async with hub_process(tmp_path, extra=("--config", str(config))) as hub:
        with trio.fail_after(30):
            await hub.wait_for_line(r"device blk0 \(virtio-blk\) registered")
            async with connect(hub.socket, name="vm0") as vm, Guest.open(vm) as guest:
                blk = await guest.blk("blk0")
                for sector, sectors in ((4, 8), (15, 1), (99, 2), (100, 1)):
                    status, _, used = await blk.request(BlkType.IN, sector, in_len=sectors * SECTOR)
                    assert (status, used) == (BlkStatus.IOERR, 1)
                    status, _, _ = await blk.request(
                        BlkType.OUT, sector, out=b"\x77" * (sectors * SECTOR)
                    )
                    assert status == BlkStatus.IOERR
                for sector, sectors in ((0, 8), (16, 84), (101, 16)):
                    start, end = sector * SECTOR, (sector + sectors) * SECTOR
                    assert await blk.read(sector, end - start) == content[start:end]
                    await blk.write(sector, b"\x33" * (end - start))
                    reference[start:end] = b"\x33" * (end - start)
                    assert await blk.read(sector, end - start) == reference[start:end]
                await blk.flush()
    assert image.read_bytes() == reference  # the failing sectors kept their old data
