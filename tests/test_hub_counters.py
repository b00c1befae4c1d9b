"""The hub's per-vector counters add up, across real processes, after masked -> pending ->
unmask cycles (server/msix.py's identity, read from ``msixhub status``)::

    notifications the hub took == delivered + coalesced + dropped + intx + cleared + pending

Every notification here is sent while the vector is masked, so the hub takes each one (from
the eventfd it reads) and the device's SENT register is the left-hand side.

The defect this pins: the hub delivered a pending bit on unmask by writing one count into
the vector's eventfd, which the device and the VMM share. The VMM resumes reading only
after the ack, so a guest that masks the vector again before the VMM's reader has run hands
the eventfd back to the hub with the hub's own count still in it; the hub read it as a new
notification (pending again, delivered again on the next unmask): ``delivered`` counted one
notification twice. Now a delivery the hub makes goes to the VMM by message, and the hub
never reads back a count it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from msixhub.client.msix_guest import set_vector_mask
from msixhub.client.vmm import Interrupt
from msixhub.testing.system import running_system

CYCLES = 12
SETTLE_TIMEOUT = 10.0
COUNTERS = ("delivered", "coalesced", "dropped", "intx", "cleared")


def accounted(row: dict[str, Any]) -> int:
    return sum(row[key] for key in COUNTERS) + int(row["pending"])


@pytest.mark.parametrize("policy", ["static", "lazy"])
async def test_counters_add_up_after_masked_pending_unmask_cycles(
    tmp_path: Path, policy: str
) -> None:
    async with running_system(tmp_path, policy=policy, vectors=2) as system:
        await system.testdev.setup(range(2))
        device = system.device
        sent = 0
        for cycle in range(CYCLES):
            await set_vector_mask(device, 0, True)
            count = 1 + cycle % 3
            await system.testdev.notify(0, count)  # in the eventfd the hub reads: pending
            sent += count
            await set_vector_mask(device, 0, False)  # delivers the pending bit, once
            if cycle % 2 == 0:
                # Mask again before this VMM's reader has run (no checkpoint in between: it
                # was only scheduled by the ack), then unmask with nothing new pending.
                await set_vector_mask(device, 0, True)
                await set_vector_mask(device, 0, False)

        row = await system.status.vector("dev0", 0)
        assert await system.testdev.sent() == sent
        assert accounted(row) == sent, row
        assert (row["delivered"], row["coalesced"], row["pending"]) == (
            CYCLES,
            sent - CYCLES,
            False,
        )

        received = 0
        with trio.fail_after(SETTLE_TIMEOUT):
            while received < CYCLES:
                event = await system.vm.next_event()
                assert isinstance(event, Interrupt) and event.vector == 0, event
                received += event.count
        assert received == CYCLES  # one interrupt per delivery, none more
        assert accounted(await system.status.vector("dev0", 0)) == sent
