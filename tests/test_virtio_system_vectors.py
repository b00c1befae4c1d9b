"""A virtio-blk daemon SIGKILLed inside a vector write or a reset, and started again: the
hub's ``use`` references for the device must come back to what the guest's vector registers
imply, with no leak and none missing, and interrupts must keep arriving on the vector the
guest programmed.

The kill is made to fall in the window deterministically: the daemon talks to the hub through
a fault proxy that drops the hub's reply to one ``use``/``unuse``, so the hub has applied the
call and the daemon never learns it; then it is killed. All real processes; refcounts read
with the status query ``msixhub status`` makes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from msixhub.client.guest import Guest
from msixhub.client.virtio_driver import BlkDriver, VectorPlan
from msixhub.client.vmm import connect
from msixhub.devices.virtio.pci import BarLayout, CommonCfg
from msixhub.protocol.errors import MsixhubError
from msixhub.testing.processes import ManagedProcess, device_process, hub_process, restart
from msixhub.testing.proxy import Drop, FaultProxy, FaultRule, fault_proxy
from msixhub.testing.system import HubStatus, hub_status
from msixhub.testing.virtio_system import BLK, blk_args

TIMEOUT = 30.0
L = BarLayout()


@dataclass(eq=False)
class ProxiedBlk:
    daemon: ManagedProcess
    proxy: FaultProxy
    guest: Guest
    status: HubStatus
    nursery: trio.Nursery  # for the daemon started again; cancelled when the block ends


@asynccontextmanager
async def proxied_blk(directory: Path) -> AsyncIterator[ProxiedBlk]:
    """Hub, blk daemon connected through a fault proxy, this process as VMM and guest."""
    image = directory / "disk.img"
    image.write_bytes(bytes(1 << 20))
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(hub_process(directory))
        proxy = await stack.enter_async_context(
            fault_proxy(hub.socket, directory / "proxy.sock", seed=0)
        )
        daemon = await stack.enter_async_context(
            device_process(hub, "virtio-blk", BLK, *blk_args(image), socket=proxy.path)
        )
        vm = await stack.enter_async_context(connect(hub.socket, name="vm0"))
        status = await stack.enter_async_context(hub_status(hub.socket))
        guest = await stack.enter_async_context(Guest.open(vm, ram=16 << 20))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        yield ProxiedBlk(daemon, proxy, guest, status, nursery)


def held(report: dict[str, Any]) -> dict[int, int]:
    """The blk device's use refcounts in a status report, by vector (zeros left out)."""
    (device,) = (d for d in report["devices"] if d["id"] == BLK)
    return {row["vector"]: row["used"] for row in device["vectors"] if row["used"]}


async def expect_refcounts(status: HubStatus, expected: dict[int, int]) -> None:
    """The hub reaches ``expected`` (a restarted daemon reconciles after it registered),
    and its static routes are exactly those vectors."""
    report = await status.wait_for(lambda report: held(report) == expected)
    assert report["routes"]["in_use"] == len(expected)


async def set_queue_vector(blk: BlkDriver, vector: int) -> None:
    """The guest moves queue 0 to ``vector`` (and its interrupt handler with it)."""
    driver = blk.driver
    await driver.access.write(L.bar, L.common + CommonCfg.QUEUE_SELECT, 2, 0)
    await driver.access.write(L.bar, L.common + CommonCfg.QUEUE_MSIX_VECTOR, 2, vector)
    assert await driver.access.read(L.bar, L.common + CommonCfg.QUEUE_MSIX_VECTOR, 2) == vector
    driver.plan = VectorPlan(True, driver.plan.config, (vector,))


async def io_interrupts(blk: BlkDriver) -> set[int]:
    """Vectors the guest took interrupts on while one write and one read completed."""
    seen: list[int] = []
    interrupt = blk.driver.interrupt

    def recording(vector: int) -> None:
        seen.append(vector)
        interrupt(vector)

    blk.driver.interrupt = recording  # type: ignore[method-assign]
    try:
        await blk.write(8, b"v" * 4096)
        assert await blk.read(8, 4096) == b"v" * 4096
    finally:
        del blk.driver.interrupt
    return set(seen)


async def move_queue_to_vector_0(blk: BlkDriver) -> None:
    await set_queue_vector(blk, 0)


async def reset_device(blk: BlkDriver) -> None:
    await blk.driver.reset()


@pytest.mark.parametrize(
    ("lost_reply", "interrupted", "after_restart"),
    [
        ("use", move_queue_to_vector_0, {0: 1}),  # queue's register saved as NO_VECTOR
        ("unuse", reset_device, {}),  # the reset's state was saved before its unuses
    ],
)
async def test_refcounts_match_the_registers_after_a_kill_in_the_window(
    tmp_path: Path,
    lost_reply: str,
    interrupted: Callable[[BlkDriver], Awaitable[None]],
    after_restart: dict[int, int],
) -> None:
    async with proxied_blk(tmp_path) as system:
        with trio.fail_after(TIMEOUT):
            blk = await system.guest.blk(BLK)
            assert blk.driver.plan == VectorPlan(True, 0, (1,))
            await expect_refcounts(system.status, {0: 1, 1: 1})
            assert await io_interrupts(blk) == {1}

            system.proxy.set_rules(
                [FaultRule(Drop(), op=lost_reply, kind="reply", direction="from_hub", times=1)]
            )
            done = trio.Event()

            async def killed_access() -> None:
                with pytest.raises(MsixhubError):  # the daemon dies before it answers
                    await interrupted(blk)
                done.set()

            system.nursery.start_soon(killed_access)
            await system.proxy.wait_for("drop", op=lost_reply)
            system.daemon.kill()
            await system.daemon.wait()
            await done.wait()
            await restart(system.daemon, system.nursery)
            await expect_refcounts(system.status, after_restart)

            if not after_restart:  # the reset went through: the driver starts over
                await blk.start()
            else:  # the write was lost: the driver writes it again
                await set_queue_vector(blk, 1)
            await expect_refcounts(system.status, {0: 1, 1: 1})
            assert await io_interrupts(blk) == {1}
            await set_queue_vector(blk, 0)
            await expect_refcounts(system.status, {0: 2})
            assert await io_interrupts(blk) == {0}
            assert system.guest.misbehaviour == []


async def test_refcounts_survive_a_plain_kill_and_restart(tmp_path: Path) -> None:
    """Killed between register accesses: nothing to reconcile, the restored vectors work."""
    async with proxied_blk(tmp_path) as system:
        with trio.fail_after(TIMEOUT):
            blk = await system.guest.blk(BLK)
            await set_queue_vector(blk, 0)
            await expect_refcounts(system.status, {0: 2})
            system.daemon.kill()
            await system.daemon.wait()
            await restart(system.daemon, system.nursery)
            await expect_refcounts(system.status, {0: 2})
            assert await io_interrupts(blk) == {0}
            await set_queue_vector(blk, 1)
            await expect_refcounts(system.status, {0: 1, 1: 1})
            assert await io_interrupts(blk) == {1}
