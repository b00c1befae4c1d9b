"""The hub's fd table stays flat across many attachments: 1,000 attach/detach cycles, then
1,000 VMM connections that vanish without detaching (some with an attach and a memory
table still in flight, some while the hub hands their new memory table to the daemon).

Each attachment moves fds both ways (kick fds and irq fds to the VMM, guest memory to the
hub and on to the daemon), so a leak of one fd per cycle shows as hundreds. The count is
read from /proc/<pid>/fd once the hub has no VMM but ours; the hub releases a vanished VMM
in the background, so the check waits (with a cap) for the count to come back to where it
was: a leak never does, and neither does an fd closed by mistake.
"""

from __future__ import annotations

from pathlib import Path

import trio
from msixhub.client.vmm import connect
from msixhub.protocol.fds import close_all, memfd
from msixhub.protocol.messages import Attach, Region, SetMemTable
from msixhub.protocol.peer import connect_unix, handshake, open_peer
from msixhub.testing.processes import open_fds
from msixhub.testing.system import Testdev, TestdevSystem, next_interrupt, running_system

CYCLES = 1000
SETTLE_TIMEOUT = 10.0


async def settled_fd_count(system: TestdevSystem, expected: int) -> int:
    """Wait until only our VMM is left and the hub's fd count is ``expected``; the count."""
    assert system.daemon is not None
    with trio.move_on_after(SETTLE_TIMEOUT):
        while True:
            report = await system.status.report()  # a round trip: the hub gets to run
            if report["vmms"] == ["vm0"] and open_fds(system.hub.pid) == expected:
                break
    return open_fds(system.hub.pid)


async def check_still_works(system: TestdevSystem) -> None:
    """The device still attaches and interrupts after all that."""
    device = await system.vm.attach("dev0")
    await Testdev(device).setup(range(2))
    device.kick(0)
    interrupt = await next_interrupt(system.vm)
    assert (interrupt.vector, interrupt.count) == (0, 1)
    await system.vm.detach("dev0")


async def test_attach_detach_cycles_leak_no_fd(tmp_path: Path) -> None:
    async with running_system(tmp_path, vectors=2, queues=2) as system:
        await system.testdev.setup(range(2))  # routed vectors: irq fds travel on attach
        vm = system.vm
        await vm.detach("dev0")
        await vm.attach("dev0")  # warm up: everything lazily created exists now
        await vm.detach("dev0")
        assert system.daemon is not None
        hub_before, daemon_before, ours_before = (
            open_fds(system.hub.pid),
            open_fds(system.daemon.pid),
            open_fds(),
        )

        for _ in range(CYCLES):
            await vm.attach("dev0")
            await vm.detach("dev0")

        assert await settled_fd_count(system, hub_before) == hub_before
        assert open_fds(system.daemon.pid) == daemon_before
        assert open_fds() == ours_before
        await check_still_works(system)


async def vanish_after_attach(socket: str, index: int) -> None:
    """A VMM that attached (with guest memory) and went away without detaching."""
    async with connect(socket, name=f"gone{index}") as vm:
        await vm.add_memory(4096)
        await vm.attach("dev0")


async def vanish_mid_request(socket: str, index: int) -> None:
    """A VMM that sends a memory table and an attach, and is gone before any reply."""
    transport = await connect_unix(socket)
    try:
        connection = await handshake(transport, "vmm", name=f"gone{index}")
        with memfd(4096, "doomed") as memory:
            _, table = connection.send_request(SetMemTable([Region(0, 4096, 0)]), [memory.fileno()])
            await transport.send(table, [memory.fileno()])
        _, attach = connection.send_request(Attach("dev0"))
        await transport.send(attach)
    finally:
        await transport.aclose()


async def vanish_replacing_memory(socket: str, index: int) -> None:
    """A VMM that attached, and is gone while the hub hands its new memory table on."""
    transport = await connect_unix(socket)
    async with open_peer(transport, "vmm", name=f"gone{index}") as peer:
        with memfd(4096, "first") as memory:
            await peer.call(SetMemTable([Region(0, 4096, 0)]), [memory.fileno()])
        _, kicks = await peer.request(Attach("dev0"))
        close_all(kicks)
        with memfd(8192, "second") as memory:
            table = SetMemTable([Region(0, 8192, 0)])
            _, data = peer.connection.send_request(table, [memory.fileno()])
            await peer.transport.send(data, [memory.fileno()])


VANISHING = (vanish_after_attach, vanish_mid_request, vanish_replacing_memory)


async def test_vanishing_vmms_leak_no_fd(tmp_path: Path) -> None:
    async with running_system(tmp_path, vectors=2, queues=2) as system:
        await system.testdev.setup(range(2))
        await system.vm.detach("dev0")  # returns once the hub has released it
        hub_before = open_fds(system.hub.pid)

        for index in range(CYCLES):
            await VANISHING[index % len(VANISHING)](system.hub.socket, index)

        assert await settled_fd_count(system, hub_before) == hub_before
        device = await system.status.device("dev0")
        assert device["vmm"] is None
        assert device["msix_control"] & 0x4000  # each departure function-masked it
        await check_still_works(system)
