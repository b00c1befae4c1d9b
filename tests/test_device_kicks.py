"""The daemon shell's kick readers: the VMM holds the same file as the daemon and may take a
kick's count first; the daemon must not block in its read (it serves the hub meanwhile)."""

from __future__ import annotations

import pytest
import trio
from fd_thief import race_a_thief
from msixhub.devices.daemon import HubLink
from msixhub.protocol.fds import NOWAIT_READS, vector_eventfd


class _Kicked:
    """The part of a DeviceModel the kick reader calls."""

    def __init__(self) -> None:
        self.kicks = 0

    async def kicked(self, queue: int) -> None:
        self.kicks += 1


@pytest.mark.skipif(not NOWAIT_READS, reason="no RWF_NOWAIT: a blocking file would block")
@pytest.mark.timeout(20)  # a reader that blocks in read() stops trio: fail_after cannot fire
async def test_a_kick_taken_by_the_vmm_first_does_not_block_the_daemon() -> None:
    """(A blocking file, so that a plain read would block.)"""
    model = _Kicked()
    async with trio.open_nursery() as nursery:
        link = HubLink(None, nursery, model)  # type: ignore[arg-type]  # no hub: never called
        kick = vector_eventfd()
        link._set_kick(0, kick)
        await race_a_thief(kick, lambda: model.kicks)
        link.close()
        nursery.cancel_scope.cancel()
