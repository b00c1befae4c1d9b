"""A device daemon SIGKILLed while a vector is pending: its MSI-X state lives in the hub, so
the restarted daemon resumes without losing the interrupt or delivering it twice, and its
call fds and kick fds work again (a kick made while it was down is served when it is back).

Two ways back: this process restarts it (``testing.processes.restart``), or the hub spawned
it from its ``[[device]]`` config and its supervisor restarts it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from msixhub.client.msix_guest import pba_pending, set_vector_mask
from msixhub.client.vmm import DeviceEvent, Event, Interrupt
from msixhub.testing.processes import restart
from msixhub.testing.system import TestdevSystem, next_event, next_interrupt, running_system

PENDING, LIVE = 0, 1  # vector 0 is left pending across the crash; vector 1 stays unmasked


def summary(event: Event) -> tuple[str, int | str]:
    if isinstance(event, Interrupt):
        assert event.count == 1, event
        return ("interrupt", event.vector)
    assert isinstance(event, DeviceEvent), event
    return ("device", event.state)


async def crash_and_recover(
    system: TestdevSystem,
    kill: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[None]],
) -> None:
    testdev, device, vm = system.testdev, system.device, system.vm
    await testdev.setup(range(2))
    await set_vector_mask(device, PENDING, True)
    await testdev.notify(PENDING)
    assert await pba_pending(device, PENDING)

    await kill()
    assert summary(await next_event(vm)) == ("device", "down")
    device.kick(LIVE)  # queue 1 echoes on vector 1: nobody reads it until the daemon is back

    await recover()
    # The daemon drains the kick left in its eventfd as soon as it has it again; whether the
    # hub's "up" notice or that interrupt reaches us first is a race both ways are fine.
    arrived = sorted([summary(await next_event(vm)) for _ in range(2)], key=str)
    assert arrived == [("device", "up"), ("interrupt", LIVE)]
    assert await pba_pending(device, PENDING)  # the hub kept the bit across the crash

    await set_vector_mask(device, PENDING, False)
    interrupt = await next_interrupt(vm)
    assert (interrupt.vector, interrupt.count) == (PENDING, 1)

    await testdev.notify(LIVE)  # the new daemon's call fd: straight to us, not via the hub
    assert summary(await next_interrupt(vm)) == ("interrupt", LIVE)
    device.kick(PENDING)  # its kick fd; also the sentinel: the pending one came exactly once
    assert summary(await next_interrupt(vm)) == ("interrupt", PENDING)
    assert len(vm.queue) == 0
    assert list(device.notifications) == [2, 2]

    status = await system.status.device("dev0")
    assert (status["up"], status["registrations"]) == (True, 2)
    if (await system.status.routes())["policy"] == "static":
        rows = {row["vector"]: row for row in status["vectors"]}
        assert rows[PENDING]["delivered"] == 1  # only the pending bit went through the hub
        assert rows[LIVE]["delivered"] == 0  # the rest came by eventfd, old and new


async def test_restarted_daemon_delivers_the_pending_interrupt_once(tmp_path: Path) -> None:
    async with (
        running_system(tmp_path, vectors=2, queues=2) as system,
        trio.open_nursery() as nursery,
    ):
        daemon = system.daemon
        assert daemon is not None

        async def kill() -> None:
            daemon.kill()
            assert await daemon.wait() == -signal.SIGKILL

        async def recover() -> None:
            await restart(daemon, nursery)

        await crash_and_recover(system, kill, recover)
        await daemon.stop()


@pytest.mark.parametrize("policy", ["static", "lazy"])
async def test_supervised_daemon_is_respawned_and_resumes(tmp_path: Path, policy: str) -> None:
    async with running_system(
        tmp_path, policy=policy, vectors=2, queues=2, supervised=True
    ) as system:
        hub = system.hub
        mark = 0

        async def kill() -> None:
            nonlocal mark
            pid = (await system.status.device("dev0"))["pid"]
            mark = hub.line_count
            os.kill(pid, signal.SIGKILL)

        async def recover() -> None:
            await hub.wait_for_line(r"device dev0 \(testdev\) re-registered", after=mark)

        await crash_and_recover(system, kill, recover)
