"""Interrupts the hub sends by message coalesce per vector while they wait, like an eventfd.

Across real processes (hub, testdev daemon, this process as the VMM), policy ``direct``: the
device notifies one vector far faster than the VMM reads -- the VMM stops reading its socket
altogether for a while -- and the VMM is not disconnected (its outbox holds one Irq per
vector, however many notifications it carries), and in the end it has accounted exactly
every notification: ``sum(Interrupt.count) == device SENT == hub delivered``. And in process:
only control notices can fill the outbox, and a VMM that lets them is disconnected once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from msixhub.client.vmm import Interrupt, connect
from msixhub.protocol.connection import Notice
from msixhub.protocol.messages import Intx
from msixhub.protocol.peer import Peer
from msixhub.server import hub as hub_module
from msixhub.testing.inprocess import inprocess_hub, inprocess_testdev
from msixhub.testing.system import Testdev, next_interrupt, running_system

TOTAL = 200_000
WHILE_STALLED = 12_000  # three times the outbox (4096): uncoalesced, it overflowed
CHUNK = 20_000
SETTLE_TIMEOUT = 60.0


async def test_a_vmm_that_stops_reading_is_not_disconnected_and_loses_nothing(
    tmp_path: Path,
) -> None:
    async with running_system(tmp_path, policy="direct") as system:
        try:
            await system.testdev.setup([0])
            vm = system.vm
            # The VMM stops reading its socket: its notice handler holds the connection's
            # only reader at the first notice until ``resume``. (Not for long: a peer that
            # leaves a frame half sent for the hub's send timeout, 5 s, is disconnected.)
            stalled, resume = trio.Event(), trio.Event()
            serve_notice = vm._on_notice

            async def stalling_on_notice(peer: Peer, notice: Notice) -> None:
                stalled.set()
                await resume.wait()
                await serve_notice(peer, notice)

            vm._on_notice = stalling_on_notice  # type: ignore[method-assign]
            counts = interrupts = 0
            reached = trio.Event()

            async def consume() -> None:
                nonlocal counts, interrupts
                while True:
                    event = await vm.next_event()
                    assert isinstance(event, Interrupt), event
                    assert event.vector == 0
                    counts += event.count
                    interrupts += 1
                    assert counts <= TOTAL  # never more
                    if counts == TOTAL:
                        reached.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                # The write's reply is stuck behind the stalled notice: it runs on its own.
                nursery.start_soon(system.testdev.notify, 0, WHILE_STALLED)
                with trio.fail_after(SETTLE_TIMEOUT):
                    await stalled.wait()
                report = await system.status.wait_for(
                    lambda r: r["devices"][0]["vectors"][0]["delivered"] == WHILE_STALLED,
                    timeout=SETTLE_TIMEOUT,
                )
                assert report["vmms"] == ["vm0"]  # still connected
                resume.set()
                sent = WHILE_STALLED
                while sent < TOTAL:
                    chunk = min(CHUNK, TOTAL - sent)
                    await system.testdev.notify(0, chunk)
                    sent += chunk
                assert await system.testdev.sent() == TOTAL
                with trio.fail_after(SETTLE_TIMEOUT):
                    await reached.wait()
                nursery.cancel_scope.cancel()

            row = await system.status.vector("dev0", 0)
            assert (row["delivered"], row["pending"], row["coalesced"], row["dropped"]) == (
                TOTAL,
                False,
                0,
                0,
            )
            assert system.device.notifications[0] == TOTAL
            # they did coalesce, in the hub and again in the client's queue
            assert interrupts <= system.device.interrupts[0] < TOTAL
            # Nothing else was on its way: one more notification arrives alone.
            await system.testdev.notify(0)
            interrupt = await next_interrupt(system.vm)
            assert (interrupt.vector, interrupt.count) == (0, 1)
            assert len(vm.queue) == 0
            assert (await system.status.report())["vmms"] == ["vm0"]
        except BaseException:
            print(f"hub log, last lines:\n{system.hub.log_tail(80)}")
            raise


async def test_only_control_notices_fill_the_outbox_and_then_the_vmm_is_disconnected_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In process, with room for three notices, posting with nothing sent in between: any
    number of deliveries to two vectors takes two slots and no room; the fourth control
    notice disconnects the VMM, once, and a delivery meanwhile is still taken."""
    monkeypatch.setattr(hub_module, "OUTBOX_SIZE", 3)
    async with (
        inprocess_hub(tmp_path / "hub.sock", route_policy="direct") as server,
        inprocess_testdev(server.socket, "dev0", vectors=2),
    ):
        with trio.fail_after(SETTLE_TIMEOUT):
            async with connect(server.socket, name="vm0") as vm:
                await Testdev(await vm.attach("dev0")).setup(range(2))
                hub = server.hub
                (vmm,) = hub.vmms.values()
                device = hub.devices["dev0"]
                for _ in range(1000):
                    for vector in range(2):
                        hub._on_counts(device, vector, 1)  # the model delivers: unmasked
                for level in (True, False, True):
                    hub._post(vmm, Intx("dev0", level))
                assert (len(vmm.outbox), vmm.stopped_reading) == (5, False)
                assert vmm.outbox.unsent((device, 0)) == 1000
                with caplog.at_level(logging.WARNING, "msixhub.hub"):
                    hub._post(vmm, Intx("dev0", False))
                    hub._post(vmm, Intx("dev0", True))
                    hub._on_counts(device, 0, 1)
                    assert vmm.outbox.unsent((device, 0)) == 1001
                    await vm.peer.closed.wait()
                assert vmm.stopped_reading
                assert caplog.text.count("not reading its notices") == 1
                assert "outbox full" in (vm.peer.close_reason or "")
