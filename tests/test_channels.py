"""The hub's vector channels on their own: who reads a vector's eventfd, and when."""

from __future__ import annotations

import trio
from msixhub.protocol.fds import eventfd_write
from msixhub.server.channels import VectorChannels


async def test_a_reader_stopped_before_it_ran_leaves_the_fd_to_its_successor() -> None:
    """Mask, unmask, mask with no checkpoint between (a hostile VMM's writes handled in one
    batch): whichever reader trio runs first, the stale one must not wait on the fd (trio
    would raise BusyResourceError and take the hub's nursery down); each count is read once."""
    for _ in range(20):  # trio runs a batch of tasks in random order
        assert await _counts_after_a_quick_restart() == [(0, 3)]


async def _counts_after_a_quick_restart() -> list[tuple[int, int]]:
    counts: list[tuple[int, int]] = []
    counted = trio.Event()

    def on_counts(vector: int, count: int) -> None:
        counts.append((vector, count))
        counted.set()

    async with trio.open_nursery() as nursery:
        channels = VectorChannels(nursery, on_counts)
        channels.open(0)
        channels.start_reading(0)
        channels.stop_reading(0)
        channels.start_reading(0)
        await trio.testing.wait_all_tasks_blocked()
        eventfd_write(channels.fds[0].fileno(), 3)
        with trio.fail_after(5):
            await counted.wait()
        await trio.testing.wait_all_tasks_blocked()
        channels.close_all()
    return counts
