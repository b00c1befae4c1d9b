"""No notification lost, none duplicated, under a storm of masks and unmasks.

The identity (server/msix.py's accounting, seen from outside): every notification the device
sends is read either by the VMM (straight from the eventfd, or as an Irq message) or by the
hub, which turns it into a delivery (an Irq message to the VMM), a pending bit (delivered once,
by message, on the final unmask) or a coalesced count. With nothing dropped, withdrawn or left
pending::

    device SENT == sum of Interrupt.count at the VMM + hub coalesced

"Never more" is checked as the counts arrive; "none lost" by waiting, with a cap, until the
sum is reached; and a sentinel after that shows nothing more was on its way.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from msixhub.client.msix_guest import FUNCTION_MASK, MSIX_ENABLE, set_vector_mask
from msixhub.client.vmm import Interrupt
from msixhub.testing.system import TestdevSystem, next_interrupt, running_system

TOTAL = 10_000
CHUNKS = 100
SETTLE_TIMEOUT = 10.0


class Tally:
    """Notifications received per vector, with a way to wait for a vector to reach a sum."""

    def __init__(self, vectors: int) -> None:
        self.counts = [0] * vectors
        self.interrupts = [0] * vectors
        self._changed = trio.lowlevel.ParkingLot()

    async def consume(self, system: TestdevSystem) -> None:
        while True:
            event = await system.vm.next_event()
            assert isinstance(event, Interrupt), event
            self.counts[event.vector] += event.count
            self.interrupts[event.vector] += 1
            self._changed.unpark_all()

    async def wait_for(self, vector: int, expected: int) -> None:
        with trio.fail_after(SETTLE_TIMEOUT):
            while self.counts[vector] < expected:
                await self._changed.park()
        assert self.counts[vector] == expected


async def toggle_masks(system: TestdevSystem, rng: random.Random, done: trio.Event) -> int:
    """Mask and unmask vector 0 at random, by its own bit or by the function mask, until
    ``done``; leave it unmasked. Returns how many unmasking writes were made."""
    unmasks = 0
    while not done.is_set():
        function = rng.random() < 0.25
        if function:
            await system.device.msix_control_write(MSIX_ENABLE | FUNCTION_MASK)
        else:
            await set_vector_mask(system.device, 0, True)
        await checkpoints(rng.randrange(4))
        if function:
            await system.device.msix_control_write(MSIX_ENABLE)
        else:
            await set_vector_mask(system.device, 0, False)
        unmasks += 1
        await checkpoints(rng.randrange(40))  # let the VMM's reader run, or not
    return unmasks


async def checkpoints(count: int) -> None:
    """Let other tasks (and the I/O poll) run ``count`` times: a random window, not a wait."""
    for _ in range(count):
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("policy", "budget"),
    [("static", 4096), ("lazy", 4096), ("lazy", 1)],
    ids=["static", "lazy", "lazy-evicting"],
)
async def test_every_notification_is_accounted_for(
    tmp_path: Path, policy: str, budget: int
) -> None:
    rng = random.Random(20111020)
    vectors = 2
    async with running_system(tmp_path, policy=policy, budget=budget, vectors=vectors) as system:
        try:
            await system.testdev.setup(range(vectors))
            tally = Tally(vectors)
            done, stopped = trio.Event(), trio.Event()
            unmasks: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tally.consume, system)

                async def toggler() -> None:
                    unmasks.append(await toggle_masks(system, rng, done))
                    stopped.set()

                nursery.start_soon(toggler)
                rival_sent = 0
                for _ in range(CHUNKS):
                    await system.testdev.notify(0, TOTAL // CHUNKS)
                    if budget == 1:  # vector 1 takes the only route from vector 0 now and then
                        await system.testdev.notify(1)
                        rival_sent += 1
                done.set()
                with trio.fail_after(SETTLE_TIMEOUT):
                    await stopped.wait()  # its last write unmasked: the hub has let go of vector 0

                assert await system.testdev.sent() == TOTAL + rival_sent
                row = await system.status.vector("dev0", 0)
                assert (row["pending"], row["dropped"], row["intx"], row["cleared"]) == (
                    False,
                    0,
                    0,
                    0,
                )
                await tally.wait_for(0, TOTAL - row["coalesced"])
                rival = await system.status.vector("dev0", 1)
                assert not rival["pending"]
                await tally.wait_for(1, rival_sent - rival["coalesced"])

                # Nothing else was on its way: one more notification arrives alone.
                nursery.cancel_scope.cancel()
            await system.testdev.notify(0)
            interrupt = await next_interrupt(system.vm)
            assert (interrupt.vector, interrupt.count) == (0, 1)
            assert len(system.vm.queue) == 0

            assert system.device.notifications[0] == tally.counts[0] + 1
            routes = await system.status.routes()
            assert unmasks[0] > 0
            if policy == "static":
                assert routes["direct_deliveries"] == 0  # every delivery had its route
            else:
                assert routes["high_water"] <= budget
            if budget == 1:
                assert routes["evictions"] > 0
        except BaseException:
            # A flake under load is a peer dropped by the hub (TELL_TIMEOUT, a full outbox)
            # or a crash: the hub's log says which; pytest shows this on failure.
            print(f"hub log, last lines:\n{system.hub.log_tail(80)}")
            raise
