"""The interrupt paths across three real processes: hub, testdev daemon, and this process as
the VMM. Every wait is on an event (an interrupt, a status report) with a cap.

"Exactly one" is proved with a sentinel: after the interrupt under test, the device notifies
the same vector once more; the next interrupt must carry exactly that one notification. A
duplicate would have been a second count in the same eventfd (or a second interrupt) first.
"""

from __future__ import annotations

from pathlib import Path

from msixhub.client.msix_guest import FUNCTION_MASK, MSIX_ENABLE, pba_pending, set_vector_mask
from msixhub.client.vmm import IntxEvent
from msixhub.testing.system import (
    Testdev,
    TestdevSystem,
    message_of,
    next_event,
    next_interrupt,
    running_system,
)


async def expect_sentinel(system: TestdevSystem, vector: int) -> None:
    """The vector delivers exactly one fresh notification, and nothing else was queued."""
    before = system.device.notifications[vector]
    await system.testdev.notify(vector)
    interrupt = await next_interrupt(system.vm)
    assert (interrupt.vector, interrupt.count) == (vector, 1)
    assert system.device.notifications[vector] == before + 1


async def test_unmasked_delivery_keeps_the_hub_off_the_path(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(2))
        await system.testdev.notify(0)
        interrupt = await next_interrupt(system.vm)
        assert (interrupt.device, interrupt.vector, interrupt.count) == ("dev0", 0, 1)
        assert (interrupt.address, interrupt.data) == message_of(0)
        assert 0 in system.device.irq_fds  # routed: the VMM reads the eventfd itself

        row = await system.status.vector("dev0", 0)
        assert row["route"] is not None
        assert row["delivered"] == 0  # the hub never saw it
        assert not row["hub_reading"]
        assert (await system.status.routes())["direct_deliveries"] == 0
        assert await system.testdev.sent() == 1


async def test_masked_vector_goes_pending_and_unmask_delivers_it_once(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(2))
        await set_vector_mask(system.device, 1, True)
        await system.testdev.notify(1, 3)

        assert await pba_pending(system.device, 1)
        assert not await pba_pending(system.device, 0)
        row = await system.status.vector("dev0", 1)
        assert (row["pending"], row["coalesced"], row["hub_reading"]) == (True, 2, True)
        assert len(system.vm.queue) == 0

        await set_vector_mask(system.device, 1, False)
        interrupt = await next_interrupt(system.vm)
        assert (interrupt.vector, interrupt.count) == (1, 1)
        assert (interrupt.address, interrupt.data) == message_of(1)
        assert not await pba_pending(system.device, 1)
        await expect_sentinel(system, 1)
        row = await system.status.vector("dev0", 1)
        assert (row["delivered"], row["coalesced"], row["pending"]) == (1, 2, False)


async def test_function_mask_holds_every_vector_and_releases_each_once(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(3))
        await set_vector_mask(system.device, 2, True)  # stays masked by its own bit
        await system.device.msix_control_write(MSIX_ENABLE | FUNCTION_MASK)
        assert await system.device.msix_control_read() & FUNCTION_MASK
        for vector in range(3):
            await system.testdev.notify(vector, 2)
        assert [await pba_pending(system.device, v) for v in range(3)] == [True, True, True]

        await system.device.msix_control_write(MSIX_ENABLE)
        delivered = sorted(
            [(i.vector, i.count) for i in [await next_interrupt(system.vm) for _ in range(2)]]
        )
        assert delivered == [(0, 1), (1, 1)]
        assert [await pba_pending(system.device, v) for v in range(3)] == [False, False, True]
        await expect_sentinel(system, 0)
        await expect_sentinel(system, 1)
        assert system.device.interrupts[2] == 0


async def test_msix_disabled_falls_back_to_intx(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(1), enable=False)
        await system.testdev.notify(0)
        assert await next_event(system.vm) == IntxEvent("dev0", True)
        device = await system.status.device("dev0")
        assert device["intx"]
        assert (await system.status.vector("dev0", 0))["intx"] == 1

        await system.testdev.set_intx(False)  # the driver read the ISR: the line drops
        assert await next_event(system.vm) == IntxEvent("dev0", False)

        await system.testdev.notify(0)
        assert await next_event(system.vm) == IntxEvent("dev0", True)
        await system.device.msix_control_write(MSIX_ENABLE)  # the hub lowers INTx itself
        assert await next_event(system.vm) == IntxEvent("dev0", False)
        await expect_sentinel(system, 0)  # MSI-X again, and the INTx notification is not replayed
        assert (await system.status.vector("dev0", 0))["intx"] == 2


async def test_deassert_withdraws_a_pending_notification(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(1))
        await set_vector_mask(system.device, 0, True)
        await system.testdev.notify(0, 2)
        assert await pba_pending(system.device, 0)

        await system.testdev.deassert(0)
        assert not await pba_pending(system.device, 0)
        row = await system.status.vector("dev0", 0)
        assert (row["cleared"], row["coalesced"], row["pending"]) == (1, 1, False)

        await set_vector_mask(system.device, 0, False)
        await expect_sentinel(system, 0)  # the unmask delivered nothing
        assert system.device.interrupts[0] == 1
        assert (await system.status.vector("dev0", 0))["delivered"] == 0


async def test_static_route_exhaustion_fails_at_use(tmp_path: Path) -> None:
    async with running_system(tmp_path, budget=3, vectors=8) as system:
        testdev = system.testdev
        assert [await testdev.use(v) for v in range(3)] == [True, True, True]
        assert not await testdev.use(3)  # RESULT 1: the driver would fall back
        routes = await system.status.routes()
        assert (routes["in_use"], routes["alloc_failures"]) == (3, 1)
        assert (await system.status.vector("dev0", 3))["used"] == 0

        await testdev.unuse(0)
        assert await testdev.use(3)  # the route 0 gave back
        assert (await system.status.routes())["in_use"] == 3


async def test_lazy_routes_are_evicted_and_every_notification_delivered(tmp_path: Path) -> None:
    rounds = 3
    async with running_system(tmp_path, policy="lazy", budget=2, vectors=4) as system:
        await system.testdev.setup(range(4))
        for _ in range(rounds):
            for vector in range(4):
                await system.testdev.notify(vector)
                interrupt = await next_interrupt(system.vm)
                assert (interrupt.vector, interrupt.count) == (vector, 1)
                assert (interrupt.address, interrupt.data) == message_of(vector)
        assert list(system.device.notifications) == [rounds] * 4
        routes = await system.status.routes()
        assert routes["evictions"] > 0
        assert routes["in_use"] <= 2 and routes["high_water"] == 2


async def test_direct_policy_delivers_by_message_through_the_hub(tmp_path: Path) -> None:
    async with running_system(tmp_path, policy="direct") as system:
        await system.testdev.setup(range(2))
        await system.testdev.notify(0, 3)
        await system.testdev.notify(1)
        interrupts = [await next_interrupt(system.vm)]
        while sum(i.count for i in interrupts) < 4:
            interrupts.append(await next_interrupt(system.vm))
        # Vector 0's three may coalesce while they wait in the hub (one Irq with a count).
        *zeros, one = interrupts
        assert {i.vector for i in zeros} == {0} and sum(i.count for i in zeros) == 3
        assert (one.vector, one.count) == (1, 1)
        assert [(i.address, i.data) for i in (zeros[-1], one)] == [message_of(0), message_of(1)]
        assert system.device.irq_fds == {}  # no eventfd: each one came as an Irq message
        routes = await system.status.routes()
        assert (routes["direct_deliveries"], routes["in_use"]) == (4, 0)
        assert (await system.status.vector("dev0", 0))["delivered"] == 3


async def test_a_new_attachment_starts_from_the_table_the_hub_kept(tmp_path: Path) -> None:
    """The MSI-X state outlives an attachment; the next VMM's view of it must match what
    its guest reads, or it would not read the eventfd of a vector the guest sees unmasked."""
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(2))
        await set_vector_mask(system.device, 1, True)
        await system.vm.detach("dev0")  # function-masks the device

        device = await system.vm.attach("dev0")
        layout = device.info.msix
        control = await device.msix_control_read()
        assert control & (MSIX_ENABLE | FUNCTION_MASK) == MSIX_ENABLE | FUNCTION_MASK
        assert await device.mmio_read(layout.bar, layout.table_offset, 8) == message_of(0)[0]
        await device.msix_control_write(MSIX_ENABLE)  # the guest lifts the function mask only

        await Testdev(device).notify(0)  # vector 0 is unmasked, as the guest reads it
        interrupt = await next_interrupt(system.vm, timeout=1.0)  # it takes milliseconds
        assert (interrupt.vector, interrupt.count) == (0, 1)
        assert (interrupt.address, interrupt.data) == message_of(0)


async def test_unuse_drops_and_use_again_restores_the_route(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        testdev = system.testdev
        await testdev.setup(range(1))
        assert await testdev.use(0)  # refcount 2: one unuse keeps the route
        await testdev.unuse(0)
        await expect_sentinel(system, 0)

        await testdev.unuse(0)  # the last reference: the route and the channel go
        assert 0 not in system.device.irq_fds
        await testdev.notify(0)  # nobody uses it: dropped, as in QEMU
        row = await system.status.vector("dev0", 0)
        assert (row["used"], row["route"], row["dropped"]) == (0, None, 1)

        assert await testdev.use(0)  # a new route, a new eventfd, straight to us again
        assert 0 in system.device.irq_fds
        await expect_sentinel(system, 0)
        assert system.device.interrupts[0] == 2
        assert (await system.status.vector("dev0", 0))["delivered"] == 0
