"""An Irq still unsent in the hub when the guest masks its vector is taken back: the VMM does
not receive it while the vector is masked, it becomes pending, and the unmask delivers it
exactly once; an Irq already popped to be sent is in flight and arrives (an MSI write the
function had issued before the mask). Counters add up at every step, and ``delivered`` is
what the VMM accounted.

In process, for both ways a delivery reaches the outbox: policy ``direct`` (the device sends
``Notify`` messages, a VMM on the unix socket) and policy ``static`` with a VMM on TCP (the
hub reads the vector's eventfd, counts and all). The hub's first send of an Irq is held in
the middle (its drain task popped it and waits in ``notify``), so that later deliveries
wait, unsent, in the outbox behind it -- the state the mask must find.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from msixhub.client.msix_guest import FUNCTION_MASK, MSIX_ENABLE, set_vector_mask
from msixhub.client.vmm import AttachedDevice, VmmClient, connect
from msixhub.protocol.messages import Irq
from msixhub.protocol.schema import Message
from msixhub.server.hub import Vmm
from msixhub.testing.inprocess import InProcessHub, inprocess_hub, inprocess_testdev
from msixhub.testing.system import HubStatus, Testdev, hub_status, next_interrupt

TIMEOUT = 20.0
PATHS = pytest.mark.parametrize(("policy", "on_tcp"), [("direct", False), ("static", True)])


class HeldSend:
    """Holds the hub's first Irq to ``vmm`` in the middle of being sent, until ``release``."""

    def __init__(self, vmm: Vmm) -> None:
        self.holding = trio.Event()
        self.released = trio.Event()
        self._send = vmm.peer.notify
        vmm.peer.notify = self._notify  # type: ignore[method-assign]

    async def _notify(self, body: Message, fds: Any = ()) -> None:
        if isinstance(body, Irq) and not self.holding.is_set():
            self.holding.set()
            await self.released.wait()
        await self._send(body, fds)


@asynccontextmanager
async def attached(
    tmp_path: Path, policy: str, on_tcp: bool
) -> AsyncIterator[tuple[InProcessHub, VmmClient, AttachedDevice, HubStatus]]:
    """Hub, testdev ``dev0`` (vector 0 set up), a VMM with it attached, a status connection."""
    async with (
        inprocess_hub(
            tmp_path / "hub.sock", route_policy=policy, tcp=("127.0.0.1", 0) if on_tcp else None
        ) as server,
        inprocess_testdev(server.socket, "dev0", vectors=2),
        hub_status(server.socket) as status,
    ):
        address = server.server.tcp_addresses[0] if on_tcp else server.socket
        async with connect(address, name="vm0") as vm:
            device = await vm.attach("dev0")
            assert device.by_message == on_tcp
            await Testdev(device).setup([0])
            yield server, vm, device, status


def counters(row: dict[str, Any]) -> tuple[int, int, bool]:
    return row["delivered"], row["coalesced"], row["pending"]


async def wait_for_vector(status: HubStatus, predicate: Callable[[dict[str, Any]], bool]) -> None:
    await status.wait_for(lambda report: predicate(report["devices"][0]["vectors"][0]))


MASKS = {
    "vector mask bit": (
        lambda device: set_vector_mask(device, 0, True),
        lambda device: set_vector_mask(device, 0, False),
    ),
    "function mask": (
        lambda device: device.msix_control_write(MSIX_ENABLE | FUNCTION_MASK),
        lambda device: device.msix_control_write(MSIX_ENABLE),
    ),
    "MSI-X disable": (
        lambda device: device.msix_control_write(0),
        lambda device: device.msix_control_write(MSIX_ENABLE),
    ),
}


@PATHS
@pytest.mark.parametrize("how", MASKS)
async def test_an_irq_unsent_at_the_mask_is_received_once_after_the_unmask(
    tmp_path: Path, policy: str, on_tcp: bool, how: str
) -> None:
    mask, unmask = MASKS[how]
    async with attached(tmp_path, policy, on_tcp) as (server, vm, device, status):
        with trio.fail_after(TIMEOUT):
            testdev = Testdev(device)
            hub = server.hub
            (vmm,) = hub.vmms.values()
            key = (hub.devices["dev0"], 0)
            held = HeldSend(vmm)

            await testdev.notify(0)
            await held.holding.wait()  # popped: in flight from now on
            await testdev.notify(0, 4)
            await wait_for_vector(status, lambda row: row["delivered"] == 5)
            assert vmm.outbox.unsent(key) == 4

            await mask(device)
            assert (vmm.outbox.unsent(key), len(vmm.outbox)) == (0, 0)  # taken back
            assert counters(await status.vector("dev0", 0)) == (1, 3, True)
            sent = 5
            if how != "MSI-X disable":  # (disabled, testdev would assert INTx instead)
                await testdev.notify(0, 2)  # masked: merged into the pending one
                sent += 2
                await wait_for_vector(status, lambda row: row["coalesced"] == 5)

            held.released.set()
            in_flight = await next_interrupt(vm)
            assert (in_flight.vector, in_flight.count) == (0, 1)
            assert len(vmm.outbox) == 0  # nothing else to send while masked
            assert device.notifications[0] == 1

            await unmask(device)
            after_unmask = await next_interrupt(vm)
            assert (after_unmask.vector, after_unmask.count) == (0, 1)
            row = await status.vector("dev0", 0)
            assert counters(row) == (2, sent - 2, False)
            assert await testdev.sent() == sent == row["delivered"] + row["coalesced"]
            assert device.notifications[0] == row["delivered"]  # what the VMM accounted

            await testdev.notify(0)  # nothing else was on its way
            assert (await next_interrupt(vm)).count == 1
            assert len(vm.queue) == 0


@PATHS
async def test_a_departing_vmms_unsent_irq_is_pending_for_the_next_vmm(
    tmp_path: Path, policy: str, on_tcp: bool
) -> None:
    """A detach masks the function: what the hub had not sent the VMM that let go is neither
    sent to it nor lost (counted delivered to nobody); the next VMM gets it, once."""
    async with attached(tmp_path, policy, on_tcp) as (server, vm, device, status):
        with trio.fail_after(TIMEOUT):
            testdev = Testdev(device)
            hub = server.hub
            (vmm,) = hub.vmms.values()
            held = HeldSend(vmm)
            await testdev.notify(0)
            await held.holding.wait()
            await testdev.notify(0, 3)
            await wait_for_vector(status, lambda row: row["delivered"] == 4)

            await vm.detach("dev0")
            assert len(vmm.outbox) == 0
            assert counters(await status.vector("dev0", 0)) == (1, 2, True)
            # The one in flight goes out; this client discards it (not its device any more).
            held.released.set()
            address = server.server.tcp_addresses[0] if on_tcp else server.socket
            async with connect(address, name="vm1") as next_vm:
                next_device = await next_vm.attach("dev0")
                await next_device.msix_control_write(MSIX_ENABLE)  # clears the function mask
                interrupt = await next_interrupt(next_vm)
                assert (interrupt.vector, interrupt.count) == (0, 1)
                assert counters(await status.vector("dev0", 0)) == (2, 2, False)
                assert len(next_vm.queue) == 0
