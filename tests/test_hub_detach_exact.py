"""A detach is a function mask the hub applies by itself: what the hub sent before it took the
Detach is the detaching VMM's (counted and emitted by it), and what the device signals after
is pending for the next VMM. Nothing in between is counted delivered and received by nobody.
In process: the hub's device lock and its message to the daemon are held to open the window."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from msixhub.client.msix_guest import MSIX_ENABLE
from msixhub.client.vmm import Interrupt, connect
from msixhub.protocol.messages import SetMemTable
from msixhub.server.hub import Device
from msixhub.testing.inprocess import inprocess_hub, inprocess_testdev
from msixhub.testing.system import Testdev, hub_status

VECTOR = 0
TIMEOUT = 10.0


@pytest.mark.parametrize("path", ["direct", "tcp"])
async def test_irqs_sent_while_a_detach_waits_are_the_detaching_vmms(
    tmp_path: Path, path: str
) -> None:
    """The Detach waits for the device's lock (as behind a route change to a slow daemon);
    meanwhile the vector is still unmasked in the hub, which sends its Irqs: this VMM gets
    them, and accounts what the hub counted delivered."""
    tcp = ("127.0.0.1", 0) if path == "tcp" else None
    policy = "static" if path == "tcp" else "direct"  # on TCP the hub reads the eventfd
    async with (
        inprocess_hub(tmp_path / "hub.sock", route_policy=policy, tcp=tcp) as server,
        inprocess_testdev(server.socket, "dev0", vectors=2),
        hub_status(server.socket) as status,
    ):
        address = server.server.tcp_addresses[0] if tcp else server.socket
        with trio.fail_after(TIMEOUT):
            async with connect(address, name="vm0") as vm:
                device = await vm.attach("dev0")
                testdev = Testdev(device)
                await testdev.setup([VECTOR])
                hub_device: Device = server.hub.devices["dev0"]
                await hub_device.lock.acquire()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(vm.detach, "dev0")
                        await trio.testing.wait_all_tasks_blocked()
                        await testdev.notify(VECTOR, 3)
                        with trio.fail_after(TIMEOUT / 2):
                            event = await vm.next_event()
                        hub_device.lock.release()
                finally:
                    if hub_device.lock.locked():
                        hub_device.lock.release()
                assert isinstance(event, Interrupt) and event.vector == VECTOR
                row = await status.vector("dev0", VECTOR)
                assert row["delivered"] == device.notifications[VECTOR] == event.count == 3
                assert not row["pending"]


async def test_what_the_device_signals_after_the_hub_masked_is_pending_for_the_next_vmm(
    tmp_path: Path,
) -> None:
    """The hub has function-masked and reads the eventfds while it still tells the daemon
    (held here): the detaching VMM reads none of them any more."""
    async with (
        inprocess_hub(tmp_path / "hub.sock", route_policy="static") as server,
        inprocess_testdev(server.socket, "dev0", vectors=2) as model,
        hub_status(server.socket) as status,
    ):
        masked, answer = trio.Event(), trio.Event()
        tell = server.hub._tell_device

        async def held_tell(device: Device, body: object, fds: tuple = ()) -> None:
            if isinstance(body, SetMemTable) and not body.regions:  # the release's
                masked.set()
                await answer.wait()
            await tell(device, body, fds)  # type: ignore[arg-type]

        server.hub._tell_device = held_tell  # type: ignore[method-assign]
        with trio.fail_after(TIMEOUT):
            async with connect(server.socket, name="vm0") as vm:
                device = await vm.attach("dev0")
                await Testdev(device).setup([VECTOR])
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(vm.detach, "dev0")
                        await masked.wait()
                        assert model.hub is not None
                        await model.hub.notify(VECTOR)  # the daemon's eventfd write
                        await status.wait_for(
                            lambda report: report["devices"][0]["vectors"][VECTOR]["pending"],
                            timeout=TIMEOUT / 2,
                        )
                        answer.set()
                finally:
                    answer.set()
                assert len(vm.queue) == 0 and device.notifications[VECTOR] == 0
            async with connect(server.socket, name="vm1") as vm1:
                again = await vm1.attach("dev0")
                await again.msix_control_write(MSIX_ENABLE)  # function mask off: delivered
                event = await vm1.next_event()
            assert isinstance(event, Interrupt) and event.vector == VECTOR and event.count == 1
            row = await status.vector("dev0", VECTOR)
            assert row["delivered"] == 1 and not row["pending"]
