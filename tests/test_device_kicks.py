"""The daemon shell's kick readers: the VMM holds the same file as the daemon and may take a
kick's count first; the daemon must not block in its read (it serves the hub meanwhile)."""

from __future__ import annotations

import pytest
import trio
from msixhub.devices.daemon import HubLink
from msixhub.protocol.fds import NOWAIT_READS, eventfd_read_nowait, eventfd_write, vector_eventfd


class _Kicked:
    """The part of a DeviceModel the kick reader calls."""

    def __init__(self) -> None:
        self.kicks = 0

    async def kicked(self, queue: int) -> None:
        self.kicks += 1


@pytest.mark.skipif(not NOWAIT_READS, reason="no RWF_NOWAIT: a blocking file would block")
@pytest.mark.timeout(20)  # a reader that blocks in read() stops trio: fail_after cannot fire
async def test_a_kick_taken_by_the_vmm_first_does_not_block_the_daemon() -> None:
    """The thief waits on a dup of the kick fd, so both wake for each kick and trio runs them
    in random order: some rounds it reads first. (A blocking file, so that a plain read
    would block.)"""
    model = _Kicked()
    async with trio.open_nursery() as nursery:
        link = HubLink(None, nursery, model)  # type: ignore[arg-type]  # no hub: never called
        kick = vector_eventfd()
        thief_fd = kick.dup()
        link._set_kick(0, kick)
        taken = 0

        async def take() -> None:
            nonlocal taken
            while True:
                await trio.lowlevel.wait_readable(thief_fd.fileno())
                taken += eventfd_read_nowait(thief_fd.fileno())

        with thief_fd:
            nursery.start_soon(take)
            with trio.fail_after(10):
                for sent in range(1, 201):
                    await trio.testing.wait_all_tasks_blocked()
                    eventfd_write(kick.fileno())
                    await trio.testing.wait_all_tasks_blocked()
                    assert taken + model.kicks == sent
            assert 0 < taken < 200, "each side should have won some rounds"
            link.close()
            nursery.cancel_scope.cancel()
