"""The fault proxy between a real hub (in this process) and its peers: fds still work through
it, each fault shows at the endpoints, and the hub survives a damaged connection by closing
that connection only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from msixhub.client.vmm import Interrupt, VmmClient, connect
from msixhub.devices.testdev import TestDevice
from msixhub.protocol.errors import ConnectionClosed, RemoteError
from msixhub.testing.inprocess import InProcessHub, inprocess_hub, inprocess_testdev
from msixhub.testing.proxy import (
    CloseAfter,
    Corrupt,
    Drop,
    Duplicate,
    FaultProxy,
    FaultRule,
    Reorder,
    Truncate,
    fault_proxy,
)
from msixhub.testing.system import Testdev

TIMEOUT = 10.0


@dataclass
class Rig:
    hub: InProcessHub
    proxy: FaultProxy
    model: TestDevice
    vm: VmmClient
    testdev: Testdev


@asynccontextmanager
async def rig(
    tmp_path: Path, rules: list[FaultRule], *, policy: str, proxied: str
) -> AsyncIterator[Rig]:
    """Hub, testdev and VMM, in this process; ``proxied`` ('device' or 'vmm') connects
    through the fault proxy, the other one directly. Vectors 0-3 are set up and enabled
    before the rules take effect."""
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(
            inprocess_hub(tmp_path / "hub.sock", route_policy=policy)
        )
        proxy = await stack.enter_async_context(
            fault_proxy(hub.socket, tmp_path / "proxy.sock", seed=7)
        )
        device_socket = proxy.path if proxied == "device" else hub.socket
        model = await stack.enter_async_context(inprocess_testdev(device_socket, "dev0"))
        vm_socket = proxy.path if proxied == "vmm" else hub.socket
        vm = await stack.enter_async_context(connect(vm_socket, name="vm0", request_timeout=2.0))
        await vm.add_memory(1 << 20)
        device = await vm.attach("dev0")
        testdev = Testdev(device)
        await testdev.setup(range(4))
        proxy.set_rules(rules)
        yield Rig(hub, proxy, model, vm, testdev)


async def interrupts(vm: VmmClient, n: int) -> list[int]:
    """The vectors of the next ``n`` interrupts."""
    vectors = []
    with trio.fail_after(TIMEOUT):
        while len(vectors) < n:
            event = await vm.next_event()
            if isinstance(event, Interrupt):
                vectors.extend([event.vector] * event.count)
    return vectors


async def notify_directly(rig: Rig, *vectors: int) -> None:
    """The daemon notifies, back to back (direct policy: each is a ``notify`` frame)."""
    assert rig.model.hub is not None
    for vector in vectors:
        await rig.model.hub.notify(vector)


async def test_fds_pass_through_the_proxy(tmp_path: Path) -> None:
    async with rig(tmp_path, [], policy="static", proxied="device") as r:
        await r.testdev.notify(2)  # the daemon writes the call fd it got through the proxy
        r.testdev.device.kick(0)  # it reads the kick fd it got through the proxy
        assert sorted(await interrupts(r.vm, 2)) == [0, 2]
        assert r.proxy.seen[("from_hub", "set_call_fd")] == 4
        assert r.proxy.seen[("from_hub", "set_kick_fd")] == 1
        assert r.proxy.events == []


async def test_dropped_notify_never_reaches_the_vmm(tmp_path: Path) -> None:
    rules = [FaultRule(Drop(), op="notify", direction="to_hub", times=1)]
    async with rig(tmp_path, rules, policy="direct", proxied="device") as r:
        await notify_directly(r, 0, 1)
        assert await interrupts(r.vm, 1) == [1]
        (event,) = r.proxy.events
        assert (event.action, event.op) == ("drop", "notify")
        assert r.hub.hub.devices["dev0"].msix.vector_stats(0).delivered == 0


async def test_duplicated_notify_interrupts_twice(tmp_path: Path) -> None:
    rules = [FaultRule(Duplicate(), op="notify", times=1)]
    async with rig(tmp_path, rules, policy="direct", proxied="device") as r:
        await notify_directly(r, 0, 1)
        assert await interrupts(r.vm, 3) == [0, 0, 1]


async def test_reordered_irq_arrives_after_the_next(tmp_path: Path) -> None:
    rules = [FaultRule(Reorder(), op="notify", times=1)]
    async with rig(tmp_path, rules, policy="direct", proxied="device") as r:
        await notify_directly(r, 0, 1, 2)
        assert await interrupts(r.vm, 3) == [1, 0, 2]


async def test_close_after_n_requests_releases_the_device(tmp_path: Path) -> None:
    rules = [FaultRule(CloseAfter(2), op="mmio_write", direction="to_hub")]
    async with rig(tmp_path, rules, policy="static", proxied="vmm") as r:
        await r.testdev.notify(0)
        with pytest.raises(ConnectionClosed):
            await r.testdev.notify(1)  # sent, and then the connection is gone
        with trio.fail_after(TIMEOUT):
            await trio.testing.wait_all_tasks_blocked()
        (event,) = r.proxy.events
        assert (event.action, event.op, event.detail) == ("close", "mmio_write", "after 2 frames")
        device = r.hub.hub.devices["dev0"]
        assert device.vmm is None and device.peer is not None
        assert r.hub.hub.vmms == {}


async def test_hub_closes_only_a_truncated_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = [FaultRule(Truncate(), op="mmio_read")]
    async with rig(tmp_path, rules, policy="static", proxied="vmm") as r:
        with pytest.raises(ConnectionClosed):
            await r.testdev.sent()
        with trio.fail_after(TIMEOUT):
            await trio.testing.wait_all_tasks_blocked()
        assert any("middle of a frame" in m for m in caplog.messages)
        assert r.hub.hub.vmms == {}
        async with connect(r.hub.socket, name="vm1") as vm:  # the hub serves on
            testdev = Testdev(await vm.attach("dev0"))
            await testdev.setup(range(4))
            await testdev.notify(3)
            assert await interrupts(vm, 1) == [3]


async def test_hub_survives_corrupted_frames(tmp_path: Path) -> None:
    """Whatever a flipped bit makes of a frame (another message, a refused one, a broken
    stream), the hub answers or closes that connection, and serves the others."""
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(inprocess_hub(tmp_path / "hub.sock"))
        await stack.enter_async_context(inprocess_testdev(hub.socket, "dev0"))
        for seed in range(12):
            rules = [FaultRule(Corrupt(bits=1 + seed % 3), direction="to_hub", after=2)]
            path = tmp_path / f"proxy{seed}.sock"
            async with fault_proxy(hub.socket, path, rules, seed=seed) as proxy:
                await _poke_through(proxy)
                assert proxy.events_of("corrupt")
            with trio.fail_after(TIMEOUT):
                await trio.testing.wait_all_tasks_blocked()
            assert hub.hub.vmms == {}
            assert hub.hub.devices["dev0"].peer is not None
            assert hub.hub.devices["dev0"].vmm is None


async def _poke_through(proxy: FaultProxy) -> None:
    """A VMM session whose every frame after the handshake may be damaged."""
    try:
        async with connect(proxy.path, name="vm-c", request_timeout=0.5) as vm:
            testdev = Testdev(await vm.attach("dev0"))
            await testdev.setup(range(2))
            await testdev.notify(1)
    except* (ConnectionClosed, RemoteError, trio.TooSlowError):
        pass  # the damage was noticed: any of these is a fair outcome


@pytest.fixture(autouse=True)
def _quiet_hub_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
