"""The virtio-blk daemon SIGKILLed (at least twice, at random points) in the middle of I/O, with
many requests in flight, and brought back: by this process (``testing.processes.restart``) or by the
hub's supervisor (a ``[[device]]`` entry of its config).

"Exactly once" is checked where the guest can see it:
* every chain the driver added comes back on the used ring once and only once (a second
  completion of a head raises in the driver; the count of used entries must equal the count
  of chains added, and the device's used idx must stop at the avail idx);
* each request's caller returns once with the right answer: reads match the reference;
* writes that were in flight at the kill are executed again by the new daemon, which is
  harmless because each task has one request in flight on its own stripe: after every write
  completed, the image (read through the device, and the file itself) equals the reference.

And the kills must have caught requests in flight: each new daemon logs how many requests it
took over from the one killed, and at least one kill must have left some. A daemon that keeps
up with the guest is often idle between two batches, so a kill can find nothing taken: after
``KILLS`` kills the test goes on killing, at further random points, until one catches requests
in flight (at most ``KILL_POINTS`` kills).
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from msixhub.client.virtio_driver import BlkDriver
from msixhub.client.virtqueue import Buffer
from msixhub.devices.virtio.blk import SECTOR
from msixhub.testing.processes import restart
from msixhub.testing.virtio_system import BLK, VirtioSystem, virtio_system

IMAGE = 4 << 20
SECTORS = IMAGE // SECTOR
TASKS = 24  # requests in flight at once (one per task)
OPS = 25  # requests per task
MAX_SECTORS = 64  # up to 32 KiB per request
KILLS = 2  # at least
KILL_POINTS = 8  # at most
TIMEOUT = 30.0


async def io_across_a_crash(
    system: VirtioSystem,
    rng: random.Random,
    kill: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[str]],
) -> list[int]:
    """Kill the daemon at random points of the I/O (``KILLS`` times, then until a kill
    caught requests in flight); returns how many requests each new daemon ran again (taken,
    not completed, at the kill)."""
    reference = bytearray(system.image.read_bytes())
    driver = await system.guest.virtio(BLK)
    blk = BlkDriver(driver, slots=TASKS, max_transfer=MAX_SECTORS * SECTOR)
    await blk.start()

    ring = driver.queues[0]
    harvested: Counter[object] = Counter()  # used entries seen, per request (its token)
    harvest = ring.harvest

    def counting_harvest(deliver: Callable[[object, int], None]) -> int:
        def counting_deliver(token: object, length: int) -> None:
            harvested[token] += 1
            deliver(token, length)

        return harvest(counting_deliver)

    ring.harvest = counting_harvest  # type: ignore[method-assign]
    added: list[object] = []  # every request's token, as the driver added it
    add = ring.add

    def counting_add(out: list[Buffer], in_: list[Buffer], token: object, **options: bool) -> int:
        added.append(token)
        return add(out, in_, token, **options)

    ring.add = counting_add  # type: ignore[method-assign]

    completed = 0
    # Kill points, counted in completed requests, while the queue is full.
    points = rng.sample(range(TASKS, TASKS * (OPS - 2)), KILL_POINTS)
    kill_at = {point: trio.Event() for point in points}
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
            if completed in kill_at:
                kill_at[completed].set()

    requeued: list[int] = []

    async def crash() -> None:
        for point in sorted(kill_at):
            if len(requeued) >= KILLS and max(requeued) > 0:
                return
            await kill_at[point].wait()
            await kill()
            line = await recover()
            match = re.search(r"(\d+) requests taken before run again", line)
            assert match, line
            requeued.append(int(match.group(1)))

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
    return requeued


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

        async def recover() -> str:
            mark = daemon.line_count
            await restart(daemon, nursery)
            return await daemon.wait_for_line("resumed: ", after=mark)

        with trio.fail_after(TIMEOUT):
            requeued = await io_across_a_crash(system, random.Random(msixhub_seed), kill, recover)
            assert max(requeued) > 0, f"no kill caught a request in flight: {requeued}"
            registrations = (await system.status.device(BLK))["registrations"]
            assert registrations == len(requeued) + 1
        await daemon.stop()


@pytest.mark.parametrize("policy", ["static", "lazy"])
async def test_killed_blk_daemon_respawned_by_the_hub(
    tmp_path: Path, msixhub_seed: int, policy: str
) -> None:
    image = random_image(tmp_path / "disk.img", msixhub_seed)
    async with virtio_system(tmp_path, image=image, policy=policy, supervised=True) as system:
        hub = system.hub
        mark = 0

        pid = await system.blk_pid()  # known before the kill point: the kill lands at once

        async def kill() -> None:
            nonlocal mark
            mark = hub.line_count
            os.kill(pid, signal.SIGKILL)

        async def recover() -> str:
            nonlocal pid
            await hub.wait_for_line(rf"device {BLK} \(virtio-blk\) re-registered", after=mark)
            line = await hub.wait_for_line(rf"{BLK}\[\d+\] INFO resumed: ", after=mark)
            pid = await system.blk_pid()
            return line

        with trio.fail_after(TIMEOUT):
            requeued = await io_across_a_crash(system, random.Random(msixhub_seed), kill, recover)
            assert max(requeued) > 0, f"no kill caught a request in flight: {requeued}"
            registrations = (await system.status.device(BLK))["registrations"]
            assert registrations == len(requeued) + 1
