"""A thief for the tests of readers that share an eventfd's file with other holders."""

from __future__ import annotations

from collections.abc import Callable

import trio
from msixhub.protocol.fds import OwnedFd, eventfd_read_nowait, eventfd_write

ROUNDS = 200


async def race_a_thief(fd: OwnedFd, counted: Callable[[], int]) -> None:
    """Write ``fd`` once per round, while a thief task waits on a dup of it: both the reader
    under test and the thief wake for each write, and trio runs them in random order, so
    each wins some rounds. Every count is read by exactly one of them (``counted`` says how
    many the reader took), and the reader, finding the fd empty, must wait again: one that
    blocks in read() stops trio, so the caller's test needs a pytest timeout."""
    taken = 0
    with fd.dup() as thief_fd:

        async def take() -> None:
            nonlocal taken
            while True:
                await trio.lowlevel.wait_readable(thief_fd.fileno())
                taken += eventfd_read_nowait(thief_fd.fileno())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            with trio.fail_after(10):
                for sent in range(1, ROUNDS + 1):
                    await trio.testing.wait_all_tasks_blocked()
                    eventfd_write(fd.fileno())
                    await trio.testing.wait_all_tasks_blocked()
                    assert taken + counted() == sent
            nursery.cancel_scope.cancel()
    assert 0 < taken < ROUNDS, "each side should have won some rounds"
