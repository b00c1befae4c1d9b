"""The open-file flags of an eventfd belong to the file, which the hub shares with the
device and the VMM it hands copies to: a peer that clears O_NONBLOCK on its copy clears it on
the hub's. The hub's reads must not block all the same."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import trio
from msixhub.client.msix_guest import set_vector_mask
from msixhub.testing.system import running_system

VECTOR = 0
ANSWER_TIMEOUT = 5.0


async def test_a_vmm_that_makes_its_irq_fd_blocking_cannot_block_the_hub(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup([VECTOR])
        irq_fd = system.device.irq_fds[VECTOR].fileno()
        flags = fcntl.fcntl(irq_fd, fcntl.F_GETFL)
        fcntl.fcntl(irq_fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)  # the hub's copy too
        with trio.fail_after(ANSWER_TIMEOUT):
            # Masking hands the reads to the hub; unmasking has it drain an empty eventfd.
            await set_vector_mask(system.device, VECTOR, True)
            await set_vector_mask(system.device, VECTOR, False)
            await system.status.report()
        # And it still delivers: a notification now arrives once.
        fcntl.fcntl(irq_fd, fcntl.F_SETFL, flags)  # our own reader must not block either
        with trio.fail_after(ANSWER_TIMEOUT):
            await system.testdev.notify(VECTOR)
            event = await system.vm.next_event()
        assert event.vector == VECTOR  # type: ignore[union-attr]
