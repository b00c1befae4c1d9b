"""The open-file flags of an eventfd belong to the file, which the hub shares with the
device and the VMM it hands copies to: vector eventfds are blocking files, and a peer that
changes O_NONBLOCK on its copy changes it on everyone's. Neither the hub's reads nor the VMM
client's may block, whatever the flag says."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import trio
from msixhub.client.msix_guest import set_vector_mask
from msixhub.protocol.fds import NOWAIT_READS
from msixhub.testing.system import running_system

VECTOR = 0
ANSWER_TIMEOUT = 5.0


@pytest.mark.skipif(not NOWAIT_READS, reason="without RWF_NOWAIT a blocking file blocks the hub")
@pytest.mark.parametrize("peer_sets", [None, "nonblocking", "blocking"])
async def test_no_flag_a_peer_sets_on_an_irq_fd_blocks_the_hub_or_the_vmm(
    tmp_path: Path, peer_sets: str | None
) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup([VECTOR])
        irq_fd = system.device.irq_fds[VECTOR].fileno()
        flags = fcntl.fcntl(irq_fd, fcntl.F_GETFL)
        assert not flags & os.O_NONBLOCK  # as the hub made it
        if peer_sets is not None:  # on the hub's copy too
            nonblocking = flags | os.O_NONBLOCK
            fcntl.fcntl(irq_fd, fcntl.F_SETFL, nonblocking if peer_sets == "nonblocking" else flags)
        with trio.fail_after(ANSWER_TIMEOUT):
            # Masking hands the reads to the hub; unmasking has it drain an empty eventfd.
            await set_vector_mask(system.device, VECTOR, True)
            await set_vector_mask(system.device, VECTOR, False)
            await system.status.report()
        # And it still delivers: a notification now arrives once, read by the VMM's reader.
        with trio.fail_after(ANSWER_TIMEOUT):
            await system.testdev.notify(VECTOR)
            event = await system.vm.next_event()
        assert event.vector == VECTOR  # type: ignore[union-attr]
        assert system.device.notifications[VECTOR] == 1
