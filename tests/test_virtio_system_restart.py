"""The virtio-blk daemon SIGKILLed in the middle of I/O, with many requests in flight, and
brought back: by this process (``testing.processes.restart``) or by the hub's supervisor (a
``[[device]]`` entry of its config).

"Exactly once" is checked where the guest can see it:
* every chain the driver added comes back on the used ring once and only once (a second
  completion of a head raises in the driver; the count of used entries must equal the count
  of chains added, and the device's used idx must stop at the avail idx);
* each request's caller returns once with the right answer: reads match the reference;
* writes that were in flight at the kill are executed again by the new daemon, which is
  harmless because each task has one request in flight on its own stripe: after every write
  completed, the image (read through the device, and the file itself) equals the reference.
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from msixhub.client.virtio_driver import BlkDriver
from msixhub.client.virtqueue import Buffer, Used
from msixhub.devices.virtio.blk import SECTOR
from msixhub.testing.processes import restart
from msixhub.testing.virtio_system import BLK, VirtioSystem, virtio_system

IMAGE = 4 << 20
SECTORS = IMAGE // SECTOR
TASKS = 24  # requests in flight at once (one per task)
OPS = 25  # requests per task
MAX_SECTORS = 64  # up to 32 KiB per request
TIMEOUT = 30.0


async def io_across_a_crash(
    system: VirtioSystem,
    rng: random.Random,
    kill: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[None]],
) -> None:
    reference = bytearray(system.image.read_bytes())
    driver = await system.guest.virtio(BLK)
    blk = BlkDriver(driver, slots=TASKS, max_transfer=MAX_SECTORS * SECTOR)
    await blk.start()

    ring = driver.queues[0]
    harvested: Counter[object] = Counter()  # used entries seen, per request (its token)
    get_used = ring.get_used

    def counting_get_used() -> Used | None:
        used = get_used()
        if used is not None:
            harvested[used.token] += 1
        return used

    ring.get_used = counting_get_used  # type: ignore[method-assign]
    added: list[object] = []  # every request's token, as the driver added it
    add = ring.add

    def counting_add(out: list[Buffer], in_: list[Buffer], token: object) -> int:
        added.append(token)
        return add(out, in_, token)

    ring.add = counting_add  # type: ignore[method-assign]

    completed = 0
    kill_after = rng.randrange(TASKS, TASKS * OPS // 2)  # while the queue is full
    kill_now = trio.Event()
    stripe = SECTORS // TASKS

    async def worker(seed: int, first: int) -> None:
        nonlocal completed
        task_rng = random.Random(seed)
        for _ in range(OPS):
            length = task_rng.randint(1, MAX_SECTORS)
            sector = first + task_rng.randrange(stripe - length + 1)
            start, end = sector * SECTOR, (sector + length) * SECTOR
            if task_rng.random() < 0.6:
                data = task_rng.randbytes(end - start)
                await blk.write(sector, data)
                reference[start:end] = data
            else:
                assert await blk.read(sector, end - start) == reference[start:end]
            completed += 1
            if completed == kill_after:
                kill_now.set()

    async def crash() -> None:
        await kill_now.wait()
        await kill()
        await recover()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(crash)
        for task in range(TASKS):
            nursery.start_soon(worker, rng.getrandbits(64), task * stripe)

    assert completed == TASKS * OPS
    assert len(added) == len(set(added)) == TASKS * OPS
    assert harvested.keys() == set(added)
    assert set(harvested.values()) == {1}
    used_idx = driver.memory.read_u16(ring.layout.used + 2)
    avail_idx = driver.memory.read_u16(ring.layout.avail + 2)
    assert used_idx == avail_idx == len(added) & 0xFFFF

    # The device keeps working, and the image is exactly what the guest wrote.
    await blk.flush()
    step = blk.max_transfer
    for offset in range(0, IMAGE, step):
        assert await blk.read(offset // SECTOR, step) == reference[offset : offset + step]
    assert system.image.read_bytes() == reference
    assert system.guest.misbehaviour == []  # no used entry the driver had not handed out


def random_image(path: Path, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(IMAGE))
    return path


async def test_killed_blk_daemon_restarted_by_hand(tmp_path: Path, msixhub_seed: int) -> None:
    image = random_image(tmp_path / "disk.img", msixhub_seed)
    async with virtio_system(tmp_path, image=image) as system, trio.open_nursery() as nursery:
        daemon = system.blk_daemon
        assert daemon is not None

        async def kill() -> None:
            daemon.kill()
            assert await daemon.wait() == -signal.SIGKILL

        async def recover() -> None:
            await restart(daemon, nursery)

        with trio.fail_after(TIMEOUT):
            await io_across_a_crash(system, random.Random(msixhub_seed), kill, recover)
            assert (await system.status.device(BLK))["registrations"] == 2
        await daemon.stop()


@pytest.mark.parametrize("policy", ["static", "lazy"])
async def test_killed_blk_daemon_respawned_by_the_hub(
    tmp_path: Path, msixhub_seed: int, policy: str
) -> None:
    image = random_image(tmp_path / "disk.img", msixhub_seed)
    async with virtio_system(tmp_path, image=image, policy=policy, supervised=True) as system:
        hub = system.hub
        mark = 0

        async def kill() -> None:
            nonlocal mark
            mark = hub.line_count
            os.kill(await system.blk_pid(), signal.SIGKILL)

        async def recover() -> None:
            await hub.wait_for_line(rf"device {BLK} \(virtio-blk\) re-registered", after=mark)

        with trio.fail_after(TIMEOUT):
            await io_across_a_crash(system, random.Random(msixhub_seed), kill, recover)
            assert (await system.status.device(BLK))["registrations"] == 2
