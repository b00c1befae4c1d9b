"""virtio-blk and virtio-rng through the whole system: hub and daemons as real processes, this
process as the VMM with a pretend guest (rings in its RAM, MSI-X programmed like an OS, kicks
through ioeventfds, interrupts through irqfds or the hub's INTx path).

Data integrity is checked against a reference bytearray (and, at the end, against the image
file itself), with one request at a time and with several in flight at once.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from msixhub.client.virtio_driver import BlkDriver, BlkError, RegisterAccess, VectorPlan
from msixhub.client.vmm import MSIX_ENABLE
from msixhub.devices.virtio.blk import SECTOR, BlkStatus, BlkType
from msixhub.devices.virtio.constants import VIRTIO_MSI_NO_VECTOR, Status
from msixhub.devices.virtio.pci import CommonCfg
from msixhub.testing.virtio_system import BLK, RNG, VirtioSystem, virtio_system

IMAGE = 4 << 20
SECTORS = IMAGE // SECTOR
TIMEOUT = 20.0


async def verify_whole_disk(blk: BlkDriver, reference: bytearray) -> None:
    """Read the whole disk back through the device, in the largest transfers allowed."""
    step = blk.max_transfer
    for offset in range(0, len(reference), step):
        data = await blk.read(offset // SECTOR, min(step, len(reference) - offset))
        assert data == reference[offset : offset + len(data)], (
            f"mismatch in [{offset:#x}, +{step:#x})"
        )


async def random_io(
    blk: BlkDriver, reference: bytearray, rng: random.Random, first: int, count: int, ops: int
) -> None:
    """``ops`` random reads and writes of random sizes inside sectors ``[first, first+count)``;
    every read is checked against ``reference``, every completed write applied to it."""
    limit = blk.max_transfer // SECTOR
    for _ in range(ops):
        length = rng.randint(1, min(limit, count))
        sector = first + rng.randrange(count - length + 1)
        start, end = sector * SECTOR, (sector + length) * SECTOR
        if rng.random() < 0.5:
            data = rng.randbytes(end - start)
            await blk.write(sector, data)
            reference[start:end] = data
        else:
            assert await blk.read(sector, end - start) == reference[start:end]


async def test_blk_random_io_against_a_reference(tmp_path: Path, msixhub_seed: int) -> None:
    rng = random.Random(msixhub_seed)
    initial = rng.randbytes(IMAGE)
    image = tmp_path / "disk.img"
    image.write_bytes(initial)
    reference = bytearray(initial)
    async with virtio_system(tmp_path, image=image) as system:
        with trio.fail_after(TIMEOUT):
            blk = await system.guest.blk(BLK)
            assert (blk.capacity, blk.blk_size, blk.read_only) == (SECTORS, SECTOR, False)
            assert await blk.get_id() == b"msixhub"

            await random_io(blk, reference, rng, 0, SECTORS, ops=150)

            # Several requests in flight at once: each task owns a stripe of the disk, so the
            # reference stays exact whatever order the device completes them in.
            tasks = 8  # the default driver's request slots
            stripe = SECTORS // tasks
            async with trio.open_nursery() as nursery:
                for task in range(tasks):
                    nursery.start_soon(
                        random_io,
                        blk,
                        reference,
                        random.Random(rng.getrandbits(64)),
                        task * stripe,
                        stripe,
                        60,
                    )
            await blk.flush()
            await verify_whole_disk(blk, reference)
        assert system.guest.misbehaviour == []
    assert image.read_bytes() == reference
    assert image.stat().st_size == IMAGE


async def test_blk_deep_queue_keeps_many_requests_in_flight(tmp_path: Path) -> None:
    """32 tasks at once on a 32-slot driver: the device sees a deep queue and completes all."""
    async with virtio_system(tmp_path, image_size=IMAGE) as system:
        with trio.fail_after(TIMEOUT):
            blk = BlkDriver(await system.guest.virtio(BLK), slots=32, max_transfer=4096)
            await blk.start()
            completed: list[int] = []

            async def write_then_read(index: int) -> None:
                data = bytes([index]) * 4096
                await blk.write(index * 8, data)
                assert await blk.read(index * 8, 4096) == data
                completed.append(index)

            for _ in range(3):
                completed.clear()
                async with trio.open_nursery() as nursery:
                    for index in range(32):
                        nursery.start_soon(write_then_read, index)
                assert sorted(completed) == list(range(32))


async def test_blk_discard_write_zeroes_and_bad_ranges(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xa5" * IMAGE)
    async with virtio_system(tmp_path, image=image) as system:
        with trio.fail_after(TIMEOUT):
            blk = await system.guest.blk(BLK)
            await blk.write_zeroes(8, 16)
            assert await blk.read(0, 32 * SECTOR) == (
                b"\xa5" * 8 * SECTOR + bytes(16 * SECTOR) + b"\xa5" * 8 * SECTOR
            )
            await blk.discard(100, 8)  # a checked no-op: the data may stay
            await blk.write_zeroes(SECTORS - 1, 1)  # the very last sector is inside

            # Past the end, straddling the end, and a sector number that wraps 64 bits.
            for sector, length in ((SECTORS, 1), (SECTORS - 1, 2), ((1 << 64) - 1, 1)):
                for kind in (BlkType.IN, BlkType.OUT):
                    status, _, _ = await blk.request(
                        kind,
                        sector,
                        out=b"\x5a" * length * SECTOR if kind == BlkType.OUT else b"",
                        in_len=length * SECTOR if kind == BlkType.IN else 0,
                    )
                    assert status == BlkStatus.IOERR, (kind, sector, length)
                for call in (blk.write_zeroes, blk.discard):
                    with pytest.raises(BlkError) as error:
                        await call(sector, length)
                    assert error.value.status == BlkStatus.IOERR
            # A transfer that is not whole sectors, and an unknown request type.
            status, _, _ = await blk.request(BlkType.OUT, 0, out=b"x" * 100)
            assert status == BlkStatus.IOERR
            status, _, _ = await blk.request(0x7F, 0)
            assert status == BlkStatus.UNSUPP
            assert await blk.read(0, SECTOR) == b"\xa5" * SECTOR  # the device carries on
    assert image.stat().st_size == IMAGE  # never grown
    data = image.read_bytes()
    assert data[8 * SECTOR : 24 * SECTOR] == bytes(16 * SECTOR)
    assert data[-SECTOR:] == bytes(SECTOR)
    assert data[: 8 * SECTOR] == b"\xa5" * 8 * SECTOR
    assert data[24 * SECTOR : -SECTOR] == b"\xa5" * (IMAGE - 25 * SECTOR)


async def test_blk_read_only(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    content = random.Random(5).randbytes(IMAGE)
    image.write_bytes(content)
    async with virtio_system(tmp_path, image=image, read_only=True) as system:
        with trio.fail_after(TIMEOUT):
            blk = await system.guest.blk(BLK)
            assert blk.read_only
            for sector, data in ((0, b"x" * SECTOR), (SECTORS - 8, b"y" * 8 * SECTOR)):
                with pytest.raises(BlkError) as error:
                    await blk.write(sector, data)
                assert error.value.status == BlkStatus.IOERR
            # A read-only device offers neither WRITE_ZEROES nor DISCARD.
            for call in (blk.write_zeroes, blk.discard):
                with pytest.raises(BlkError) as error:
                    await call(0, 8)
                assert error.value.status == BlkStatus.UNSUPP
            await blk.flush()
            assert await blk.read(0, 4096) == content[:4096]
    assert image.read_bytes() == content


async def test_rng_returns_bytes(tmp_path: Path) -> None:
    async with virtio_system(tmp_path, rng=True) as system:
        with trio.fail_after(TIMEOUT):
            rng = await system.guest.rng(RNG)
            first = await rng.read(64)
            second = await rng.read(4096)
            assert len(first) == 64 and 0 < len(second) <= 4096
            assert first != second[:64]  # 2**-512 to fail by chance


class RecordingAccess:
    """The driver's register access, remembering what every vector register read back."""

    def __init__(self, inner: RegisterAccess) -> None:
        self.inner = inner
        self.vector_reads: list[tuple[int, int]] = []  # (offset in common cfg, value)

    async def read(self, bar: int, offset: int, size: int) -> int:
        value = await self.inner.read(bar, offset, size)
        if offset in (CommonCfg.CONFIG_MSIX_VECTOR, CommonCfg.QUEUE_MSIX_VECTOR):
            self.vector_reads.append((offset, value))
        return value

    async def write(self, bar: int, offset: int, size: int, value: int) -> None:
        await self.inner.write(bar, offset, size, value)

    async def set_msix_enabled(self, enabled: bool) -> None:
        await self.inner.set_msix_enabled(enabled)


async def test_vector_exhaustion_falls_back_to_intx(tmp_path: Path, msixhub_seed: int) -> None:
    """Route budget 1 under ``static``: config's vector gets the route, the queue's is refused
    and reads back 0xffff; one vector for both is refused the same way, so the driver lets both
    go and uses INTx, and I/O works through the hub's INTx path."""
    async with virtio_system(tmp_path, image_size=IMAGE, policy="static", budget=1) as system:
        with trio.fail_after(TIMEOUT):
            driver = await system.guest.virtio(BLK)
            access = RecordingAccess(driver.access)
            driver.access = access
            blk = BlkDriver(driver)
            await blk.start()
            assert (CommonCfg.QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR) in access.vector_reads
            assert (CommonCfg.CONFIG_MSIX_VECTOR, 0) in access.vector_reads  # that one fitted
            assert driver.plan == VectorPlan(False, VIRTIO_MSI_NO_VECTOR, (VIRTIO_MSI_NO_VECTOR,))
            routes = await system.status.routes()
            assert (routes["in_use"], routes["alloc_failures"] > 0) == (0, True)

            reference = bytearray(IMAGE)
            await intx_io(system, blk, reference, random.Random(msixhub_seed))


async def test_intx_mode(tmp_path: Path, msixhub_seed: int) -> None:
    """No MSI-X at all (``msix=False``): completions raise INTx with ISR bits, the driver
    reads ISR (which lowers the line) and harvests; several requests in flight at once."""
    async with virtio_system(tmp_path, image_size=IMAGE) as system:
        with trio.fail_after(TIMEOUT):
            blk = await system.guest.blk(BLK, msix=False)
            assert not blk.driver.plan.msix
            await intx_io(system, blk, bytearray(IMAGE), random.Random(msixhub_seed))


async def intx_io(
    system: VirtioSystem, blk: BlkDriver, reference: bytearray, rng: random.Random
) -> None:
    assert (await system.status.device(BLK))["msix_control"] & MSIX_ENABLE == 0
    driver, raised = blk.driver, 0
    set_intx = driver.set_intx

    def count_intx(level: bool) -> None:
        nonlocal raised
        raised += level
        set_intx(level)

    driver.set_intx = count_intx  # type: ignore[method-assign]
    stripe = SECTORS // 4
    async with trio.open_nursery() as nursery:
        for task in range(4):
            seed = rng.getrandbits(64)
            nursery.start_soon(
                random_io, blk, reference, random.Random(seed), task * stripe, stripe, 40
            )
    await verify_whole_disk(blk, reference)
    assert raised > 0
    assert (await system.status.device(BLK))["vectors"] == []  # nothing went through MSI-X


async def test_hostile_descriptor_needs_reset_and_reset_recovers(tmp_path: Path) -> None:
    """A descriptor outside guest memory: the daemon stops the queue, sets DEVICE_NEEDS_RESET
    and raises a config interrupt; it does not crash, and a reset brings the device back."""
    async with virtio_system(tmp_path, image_size=IMAGE) as system, trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            blk = await system.guest.blk(BLK)
            await blk.write(0, b"before" * 512)
            driver = blk.driver
            seen = driver.config_changes
            outside = 1 << 40  # far past the guest's 64 MiB of RAM
            stuck = trio.CancelScope()

            async def submit_hostile() -> None:
                with stuck:
                    await driver.submit(0, [(outside, 16)], [(outside + 16, 1)])

            nursery.start_soon(submit_hostile)
            while driver.config_changes == seen:
                await driver.wait_config_change()
            assert await driver.status() & Status.DEVICE_NEEDS_RESET
            stuck.cancel()  # that request is lost with the queue, as on real hardware

            assert system.blk_daemon is not None
            assert system.blk_daemon.process is not None
            assert system.blk_daemon.process.returncode is None
            await system.blk_daemon.wait_for_line("queue 0 stopped: .*outside guest memory")

            await blk.start()  # reset, renegotiate, new rings
            assert await driver.status() & Status.DEVICE_NEEDS_RESET == 0
            assert await blk.read(0, 3072) == b"before" * 512
            await blk.write(8, b"after!" * 512)
            assert await blk.read(8, 3072) == b"after!" * 512
