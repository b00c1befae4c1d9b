"""A whole msixhub system for tests and benchmarks: a hub and a ``testdev`` daemon as real
processes, this process as the VMM, and the guest's driver for testdev's registers.

    async with running_system(tmp_path, policy="lazy", vectors=8) as system:
        await system.testdev.setup(range(4))          # program, use, unmask, enable MSI-X
        await system.testdev.notify(0)
        interrupt = await next_interrupt(system.vm)

Status is read over one admin connection (``HubStatus``), so waiting for the hub to reach a
state is a loop of request round trips with a cap, never a sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from msixhub.client.msix_guest import MSIX_ENABLE, program_vector
from msixhub.client.vmm import AttachedDevice, Event, Interrupt, VmmClient, connect
from msixhub.devices.testdev import DEASSERT, INTX, NOTIFY, RESULT, SENT, UNUSE, USE
from msixhub.protocol.messages import StatusQuery, StatusReport
from msixhub.protocol.peer import Peer, connect_unix, open_peer
from msixhub.testing.processes import HubProcess, ManagedProcess, hub_with_device

EVENT_TIMEOUT = 5.0
MAX_NOTIFY_COUNT = 0xFFFF  # NOTIFY's count field is 16 bits wide (vector | count << 16, in 4 bytes)


def message_of(vector: int) -> tuple[int, int]:
    """A distinct, recognisable (address, data) for ``vector``: LAPIC-style address, data 0x40+v."""
    return 0xFEE0_0000 | (vector & 0xFF) << 12, 0x40 + vector


class Testdev:
    """The guest's driver for testdev's BAR0 registers (see devices/testdev.py)."""

    __test__ = False  # not a pytest class

    def __init__(self, device: AttachedDevice) -> None:
        self.device = device

    async def notify(self, vector: int, count: int = 1) -> None:
        """Make the device notify ``vector`` ``count`` times (one register write per 65535)."""
        while count > 0:
            chunk = min(count, MAX_NOTIFY_COUNT)
            await self.device.mmio_write(0, NOTIFY, 4, vector | chunk << 16)
            count -= chunk

    async def deassert(self, vector: int) -> None:
        await self.device.mmio_write(0, DEASSERT, 4, vector)

    async def use(self, vector: int) -> bool:
        """Ask the device to ``use`` ``vector``; whether the hub granted it."""
        await self.device.mmio_write(0, USE, 4, vector)
        return await self.device.mmio_read(0, RESULT, 4) == 0

    async def unuse(self, vector: int) -> None:
        await self.device.mmio_write(0, UNUSE, 4, vector)

    async def set_intx(self, level: bool) -> None:
        await self.device.mmio_write(0, INTX, 4, int(level))

    async def sent(self) -> int:
        """Notifications the daemon has sent since it started."""
        return await self.device.mmio_read(0, SENT, 8)

    async def setup(
        self, vectors: Iterable[int], *, masked: bool = False, enable: bool = True
    ) -> None:
        """What a driver does at probe: program each vector, ``use`` it, enable MSI-X."""
        for vector in vectors:
            address, data = message_of(vector)
            await program_vector(self.device, vector, address, data, masked=masked)
            if not await self.use(vector):
                raise RuntimeError(f"the hub refused vector {vector}")
        if enable:
            await self.device.msix_control_write(MSIX_ENABLE)


class HubStatus:
    """Status queries over one admin connection."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def report(self) -> dict[str, Any]:
        reply = await self.peer.call(StatusQuery())
        assert isinstance(reply, StatusReport)
        return dict(reply.report)

    async def device(self, device_id: str) -> dict[str, Any]:
        report = await self.report()
        for device in report["devices"]:
            if device["id"] == device_id:
                return dict(device)
        raise LookupError(f"the hub has no device {device_id!r}")

    async def vector(self, device_id: str, vector: int) -> dict[str, Any]:
        """The vector's row (VectorStats plus hub_reading); zeros if the hub lists none."""
        for row in (await self.device(device_id))["vectors"]:
            if row["vector"] == vector:
                return dict(row)
        return {"vector": vector, "used": 0, "pending": False, "delivered": 0, "coalesced": 0}

    async def routes(self) -> dict[str, Any]:
        return dict((await self.report())["routes"])

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = EVENT_TIMEOUT
    ) -> dict[str, Any]:
        """The first report that satisfies ``predicate`` (each poll is one round trip)."""
        with trio.fail_after(timeout):
            while not predicate(report := await self.report()):
                pass
            return report


@asynccontextmanager
async def hub_status(socket_path: str) -> AsyncIterator[HubStatus]:
    transport = await connect_unix(socket_path)
    async with open_peer(transport, "admin", name="test-status") as peer:
        yield HubStatus(peer)


@dataclass(eq=False)
class TestdevSystem:
    __test__ = False  # not a pytest class

    hub: HubProcess
    daemon: ManagedProcess | None  # None when the hub spawned it (``supervised``)
    vm: VmmClient
    device: AttachedDevice
    testdev: Testdev
    status: HubStatus


@asynccontextmanager
async def running_system(
    directory: Path,
    *,
    policy: str = "static",
    budget: int = 4096,
    vectors: int = 4,
    queues: int = 1,
    device_id: str = "dev0",
    memory: int = 1 << 20,
    supervised: bool = False,
) -> AsyncIterator[TestdevSystem]:
    """Hub + testdev daemon (real processes) and this process as the VMM, device attached.

    ``supervised``: the hub spawns the daemon itself from a ``--config`` file (``[[device]]``)
    and restarts it when it dies; otherwise this process starts it (``device_process``)."""
    device_args = ["--vectors", str(vectors), "--queues", str(queues)]
    async with AsyncExitStack() as stack:
        hub, daemon = await stack.enter_async_context(
            hub_with_device(
                directory,
                "testdev",
                device_id,
                device_args,
                supervised=supervised,
                route_policy=policy,
                route_budget=budget,
            )
        )
        vm = await stack.enter_async_context(connect(hub.socket, name="vm0"))
        status = await stack.enter_async_context(hub_status(hub.socket))
        if memory:
            await vm.add_memory(memory)
        device = await vm.attach(device_id)
        yield TestdevSystem(hub, daemon, vm, device, Testdev(device), status)


async def next_event(vm: VmmClient, *, timeout: float = EVENT_TIMEOUT) -> Event:
    with trio.fail_after(timeout):
        return await vm.next_event()


async def next_interrupt(vm: VmmClient, *, timeout: float = EVENT_TIMEOUT) -> Interrupt:
    """The next event, which must be an interrupt."""
    event = await next_event(vm, timeout=timeout)
    if not isinstance(event, Interrupt):
        raise AssertionError(f"expected an interrupt, got {event}")
    return event
