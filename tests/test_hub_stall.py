"""A route change that falls to another device does not wait for that device's peers.

Lazy routes with a budget of 1: dev0's first delivery evicts dev1's route. Closing dev1's
channel means telling dev1's VMM, which has stopped answering; opening dev0's means telling
dev0's daemon and VMM, which answer. Before, the hub applied both, in order, under one lock,
so dev0's VMM could not mask or unmask anything for TELL_TIMEOUT; now each device's changes
are applied under its own lock, and dev0's VMM goes on at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from msixhub.client.msix_guest import MSIX_ENABLE, set_vector_mask
from msixhub.client.vmm import connect
from msixhub.devices.testdev import NOTIFY, USE, TestDevice, msix_bar_layout
from msixhub.protocol.connection import Request
from msixhub.protocol.errors import ConnectionClosed
from msixhub.protocol.messages import (
    Attach,
    MmioWrite,
    MsixControlWrite,
    RegisterDevice,
    SetIrqFd,
    StatusQuery,
)
from msixhub.protocol.ops import Empty
from msixhub.protocol.peer import Peer, connect_unix, open_peer
from msixhub.protocol.schema import Message
from msixhub.server.hub import TELL_TIMEOUT
from msixhub.testing.inprocess import inprocess_hub, inprocess_testdev
from msixhub.testing.system import Testdev, message_of, next_interrupt

UNHINDERED = 0.5  # well inside TELL_TIMEOUT
STALL_LIMIT = TELL_TIMEOUT + 3.0


class MuteVmm:
    """A peer that answers the hub until ``mute()``, then reads on but never answers."""

    def __init__(self) -> None:
        self.muted = False
        self.irq_fd_set = trio.Event()
        self.asked_while_muted = trio.Event()

    def mute(self) -> None:
        self.muted = True

    async def on_request(self, peer: Peer, request: Request) -> Message:
        for fd in request.fds:
            fd.close()
        if self.muted:
            self.asked_while_muted.set()
            await trio.sleep_forever()
        if isinstance(request.body, SetIrqFd):
            self.irq_fd_set.set()
        return Empty()


async def guest_sets_up_vector_0(peer: Peer, device: str) -> None:
    """What Testdev.setup does for vector 0, as raw guest accesses from the mute VMM."""
    layout, _ = msix_bar_layout(2)
    address, data = message_of(0)
    for offset, value in ((0, address), (8, data), (12, 0)):  # message, then unmask
        await peer.call(MmioWrite(device, layout.bar, layout.table_offset + offset, 4, value))
    await peer.call(MmioWrite(device, 0, USE, 4, 0))
    await peer.call(MsixControlWrite(device, MSIX_ENABLE))


async def test_an_eviction_does_not_wait_for_the_evicted_devices_hung_vmm(
    tmp_path: Path,
) -> None:
    async with (
        inprocess_hub(tmp_path / "hub.sock", route_policy="lazy", route_budget=1) as server,
        inprocess_testdev(server.socket, "dev0", vectors=2),
        inprocess_testdev(server.socket, "dev1", vectors=2),
        connect(server.socket, name="vm0") as vm,
    ):
        mute = MuteVmm()
        transport = await connect_unix(server.socket)
        async with open_peer(transport, "vmm", name="mute", on_request=mute.on_request) as peer:
            with trio.fail_after(STALL_LIMIT):
                await peer.request(Attach("dev1"))
                await guest_sets_up_vector_0(peer, "dev1")
                await peer.call(MmioWrite("dev1", 0, NOTIFY, 4, 0 | 1 << 16))
                await mute.irq_fd_set.wait()  # dev1 vector 0 holds the only route
            mute.mute()

            testdev = Testdev(await vm.attach("dev0"))
            await testdev.setup(range(1))
            with trio.fail_after(UNHINDERED):
                await testdev.notify(0)  # takes dev1's route: dev1's VMM is told, and hangs
                interrupt = await next_interrupt(vm)
                assert (interrupt.device, interrupt.vector) == ("dev0", 0)
                await mute.asked_while_muted.wait()
                await set_vector_mask(testdev.device, 0, True)
                await set_vector_mask(testdev.device, 0, False)
                await testdev.notify(0)
                interrupt = await next_interrupt(vm)
                assert (interrupt.device, interrupt.vector) == ("dev0", 0)
            with trio.fail_after(STALL_LIMIT):
                await peer.closed.wait()  # and the hung VMM is let go

        hub = server.hub
        dev0, dev1 = hub.devices["dev0"], hub.devices["dev1"]
        with trio.fail_after(STALL_LIMIT):
            while dev1.vmm is not None or dev1.channels.fds or set(dev0.channels.fds) != {0}:
                await vm.peer.call(StatusQuery())  # a round trip: the hub gets to run


async def test_a_daemon_hung_up_on_while_registering_is_not_reported_up(tmp_path: Path) -> None:
    """The hub's state push to a new daemon times out and the hub hangs up: the registration
    fails there, so neither the supervisor (``on_registered``) nor a VMM hears it came up."""
    async with inprocess_hub(tmp_path / "hub.sock") as server:
        hub = server.hub
        registered: list[str] = []
        hub.on_registered = lambda device, pid: registered.append(device)
        mute = MuteVmm()  # its handler serves a daemon as well: mute from the start
        mute.mute()
        transport = await connect_unix(server.socket)
        async with open_peer(transport, "device", name="mute0", on_request=mute.on_request) as peer:
            with trio.fail_after(STALL_LIMIT), pytest.raises(ConnectionClosed):
                await peer.request(RegisterDevice(TestDevice("mute0", 2, 1).info))
        async with connect(server.socket, name="vm0") as vm:
            with trio.fail_after(STALL_LIMIT):
                while hub.devices["mute0"].peer is not None:
                    await vm.peer.call(StatusQuery())  # a round trip: the hub gets to run
        assert registered == []
        assert not hub.devices["mute0"].up.is_set()
