"""The pretend guest over a real hub and blk daemon: it takes the VMM's device up/down events
itself, so that a long run with many daemon restarts never fills the VMM's bounded event
queue (a full queue stops the interrupt readers, and the guest's I/O with them)."""

from __future__ import annotations

from pathlib import Path

import trio
from msixhub.client.vmm import EventQueue
from msixhub.testing.processes import restart
from msixhub.testing.virtio_system import BLK, virtio_system

QUEUE_LIMIT = 4  # EVENT_QUEUE_LIMIT scaled down: each restart is two events (down, up)
RESTARTS = QUEUE_LIMIT  # twice as many events as the queue holds
TIMEOUT = 30.0


async def test_more_daemon_restarts_than_the_event_queue_holds(tmp_path: Path) -> None:
    async with virtio_system(tmp_path) as system, trio.open_nursery() as nursery:
        guest, daemon = system.guest, system.blk_daemon
        assert daemon is not None
        system.vm.queue = EventQueue(QUEUE_LIMIT)  # before attach: the readers use this one
        with trio.fail_after(TIMEOUT):
            blk = await guest.blk(BLK)
            for restarts in range(1, RESTARTS + 1):
                daemon.kill()
                await daemon.wait()
                await restart(daemon, nursery)
                await guest.wait_daemon_up(BLK, comebacks=restarts)
                data = bytes([restarts]) * 4096
                await blk.write(restarts, data)  # interrupts still arrive
                assert await blk.read(restarts, 4096) == data
            assert guest.comebacks[BLK] == RESTARTS and guest.daemon_up[BLK]
            assert len(system.vm.queue) == 0
        await daemon.stop()
