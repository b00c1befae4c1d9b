"""A VMM on TCP gets the message path DESIGN.md promises: attach without fds, every vector
delivered as an Irq message (the hub reads the eventfds), kicks as Kick notices, the same
masking, pending and counters; guest memory (which needs fd passing) refused, clearly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from msixhub.client.msix_guest import set_vector_mask
from msixhub.client.vmm import connect
from msixhub.devices.daemon import open_device
from msixhub.devices.ivshmem.daemon import IvshmemDevice
from msixhub.protocol.errors import ErrorCode, FdPassingUnsupported, RemoteError
from msixhub.protocol.messages import SetMemTable
from msixhub.server.serve import HubConfig, HubServer, run_hub
from msixhub.testing.inprocess import inprocess_testdev
from msixhub.testing.system import Testdev, hub_status, message_of, next_interrupt

TIMEOUT = 10.0


@asynccontextmanager
async def tcp_hub(directory: Path, policy: str) -> AsyncIterator[tuple[HubServer, str]]:
    config = HubConfig(
        socket=str(directory / "hub.sock"),
        tcp=("127.0.0.1", 0),
        route_policy=policy,  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        server: HubServer = await nursery.start(run_hub, config)
        try:
            yield server, config.socket
        finally:
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("policy", ["static", "lazy", "direct"])
async def test_a_vmm_on_tcp_gets_every_interrupt_by_message_and_kicks_by_message(
    tmp_path: Path, policy: str
) -> None:
    async with (
        tcp_hub(tmp_path, policy) as (server, socket),
        inprocess_testdev(socket, "dev0", vectors=2) as model,
        hub_status(socket) as status,
    ):
        with trio.fail_after(TIMEOUT):
            async with connect(server.tcp_addresses[0], name="tcp-vm") as vm:
                assert not vm.peer.connection.fd_passing  # really TCP
                device = await vm.attach("dev0")
                assert device.by_message and device.kicks == []
                testdev = Testdev(device)
                await testdev.setup(range(2))

                await testdev.notify(1)
                interrupt = await next_interrupt(vm)
                assert (interrupt.vector, interrupt.count) == (1, 1)
                assert (interrupt.address, interrupt.data) == message_of(1)

                # Masked: pending, then coalesced; the unmask delivers the pending one once.
                await set_vector_mask(device, 0, True)
                await testdev.notify(0, 3)
                await set_vector_mask(device, 0, False)
                interrupt = await next_interrupt(vm)
                assert (interrupt.vector, interrupt.count) == (0, 1)

                device.kick(0)  # testdev: a kick of queue 0 notifies vector 0
                interrupt = await next_interrupt(vm)
                assert (interrupt.vector, interrupt.count) == (0, 1)
                assert len(vm.queue) == 0
                assert device.irq_fds == {}  # no eventfd ever reached this VMM

                row = await status.vector("dev0", 0)
                assert (row["delivered"], row["coalesced"], row["pending"]) == (2, 2, False)
                assert await testdev.sent() == 5  # 1 + 3 + the kick's: all accounted
                assert list(device.notifications) == [2, 1]

                # Guest memory needs fd passing: refused here before anything is sent, and by
                # the hub (a table without fds), clearly; nothing changed.
                with pytest.raises(FdPassingUnsupported):
                    await vm.add_memory(1 << 20)
                with pytest.raises(RemoteError) as refused:
                    await vm.peer.call(SetMemTable([]))
                assert refused.value.code == ErrorCode.UNSUPPORTED
                assert "fd passing" in refused.value.message
                assert (vm.regions, model.memory) == ([], [])
                assert (await status.report())["vmms"] == ["tcp-vm"]

            # Gone: the device is released (function-masked, pending bits kept for the next).
            await status.wait_for(lambda r: r["devices"][0]["vmm"] is None)
            async with connect(socket, name="unix-vm") as vm:
                device = await vm.attach("dev0")
                assert not device.by_message
                await Testdev(device).setup(range(2))
                await Testdev(device).notify(0)
                interrupt = await next_interrupt(vm)
                assert (interrupt.vector, interrupt.count) == (0, 1)
                if policy == "static":
                    assert sorted(device.irq_fds) == [0, 1]  # back on the eventfd path


async def test_a_device_with_bar_memory_is_refused_to_a_vmm_on_tcp(tmp_path: Path) -> None:
    """ivshmem's BAR2 is the shared region, an fd: no message form, so the attach is refused
    up front with ``unsupported`` and the device stays free."""
    async with (
        tcp_hub(tmp_path, "static") as (server, socket),
        open_device(socket, IvshmemDevice("ivs0", "shm", 1 << 20, 2)),
        hub_status(socket) as status,
    ):
        with trio.fail_after(TIMEOUT):
            await status.wait_for(lambda r: [d["up"] for d in r["devices"]] == [True])
            async with connect(server.tcp_addresses[0], name="tcp-vm") as vm:
                with pytest.raises(RemoteError) as refused:
                    await vm.attach("ivs0")
                assert refused.value.code == ErrorCode.UNSUPPORTED
                assert "ivshmem BAR memory" in refused.value.message
                assert vm.devices == {}
            report = await status.report()
            assert [d["vmm"] for d in report["devices"]] == [None]
