"""ivshmem through the hub, across real processes: a hub, one ivshmem daemon per peer, and a
VMM per peer (this process hosts one, ``msixhub.testing.ivshmem`` processes the others).

Every wait is on an event (an interrupt, a peer event, a log line, a status report) with a
cap. "Exactly one" is proved with a sentinel ring: the next interrupt must carry exactly it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from ivshmem_harness import (
    NAME,
    SIZE,
    VECTORS,
    Local,
    SpecPeer,
    daemon_args,
    ivshmem_hub,
    local_peer,
)
from msixhub.client.msix_guest import pba_pending, set_vector_mask
from msixhub.devices.ivshmem.regs import Doorbell, Register
from msixhub.protocol.errors import RemoteError
from msixhub.testing.ivshmem import RemoteVmm, remote_vmm, ring_values
from msixhub.testing.processes import HubProcess, ManagedProcess, device_process
from msixhub.testing.system import EVENT_TIMEOUT, HubStatus, hub_status, message_of

POLICIES = ["static", "lazy", "direct"]


@dataclass(eq=False)
class Peers:
    hub: HubProcess
    status: HubStatus
    daemons: dict[str, ManagedProcess]
    local: Local  # device "a"
    remote: dict[str, RemoteVmm]  # devices "b", "c"


@asynccontextmanager
async def three_peers(
    directory: Path, *, policy: str = "static", budget: int = 4096
) -> AsyncIterator[Peers]:
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(ivshmem_hub(directory, policy=policy, budget=budget))
        daemons = {
            d: await stack.enter_async_context(device_process(hub, "ivshmem", d, *daemon_args()))
            for d in "abc"
        }
        local = await stack.enter_async_context(local_peer(hub, "a"))
        remote = {d: await stack.enter_async_context(remote_vmm(hub, d)) for d in "bc"}
        status = await stack.enter_async_context(hub_status(hub.socket))
        b, c = remote["b"], remote["c"]
        # Each hears of the others (after the doorbells that ring them are in place).
        await local.wait_for_peer(b.peer_id, True)
        await local.wait_for_peer(c.peer_id, True)
        await b.wait_for_peer(local.peer_id, True)
        await b.wait_for_peer(c.peer_id, True)
        await c.wait_for_peer(local.peer_id, True)
        await c.wait_for_peer(b.peer_id, True)
        yield Peers(hub, status, daemons, local, remote)


async def vector_row(status: HubStatus, device: str, vector: int) -> dict[str, object]:
    return await status.vector(device, vector)


@pytest.mark.parametrize("policy", POLICIES)
async def test_three_peers_in_three_processes_ring_each_other_on_every_vector(
    tmp_path: Path, policy: str
) -> None:
    async with three_peers(tmp_path, policy=policy) as peers:
        local, b, c = peers.local, peers.remote["b"], peers.remote["c"]
        ids = {"a": local.peer_id, "b": b.peer_id, "c": c.peer_id}
        assert sorted(ids.values()) == [0, 1, 2]
        every_ring = ring_values(ids.values(), VECTORS)  # ourselves included, as in QEMU
        assert local.guest.doorbells() == every_ring
        assert await b.call("doorbells") == every_ring == await c.call("doorbells")

        async def expect(target: str, vector: int) -> None:
            if target == "a":
                event = await local.next_irq()
                got = (event.vector, event.count, (event.address, event.data))
            else:
                irq = await peers.remote[target].next_irq()
                got = (irq["vector"], irq["count"], (irq["address"], irq["data"]))
            assert got == (vector, 1, message_of(vector))

        rings = 0
        for ringer in "abc":
            for target in "abc":
                for vector in range(VECTORS):
                    if ringer == "a":
                        await local.guest.ring(ids[target], vector)
                    else:
                        await peers.remote[ringer].ring(ids[target], vector)
                    await expect(target, vector)
                    rings += 1
        assert rings == 3 * 3 * VECTORS
        assert list(local.guest.device.notifications) == [3] * VECTORS
        assert await b.call("counts") == [3] * VECTORS == await c.call("counts")

        for device in "abc":
            for vector in range(VECTORS):
                row = await peers.status.vector(device, vector)
                assert row["used"] == 1 and not row["pending"]
                if policy == "static":  # routed from the start: the hub never saw a ring
                    assert row["route"] is not None
                    assert (row["delivered"], row["hub_reading"]) == (0, False)
                elif policy == "direct":  # every ring read by the hub, delivered by message
                    assert (row["delivered"], row["route"], row["hub_reading"]) == (3, None, True)
                else:  # the first ring took a route; the VMM reads the later ones
                    assert 1 <= row["delivered"] <= 3 and row["route"] is not None
        report = await peers.status.report()
        (domain,) = report["ivshmem"]
        assert (domain["name"], domain["size"], domain["vectors"]) == (NAME, SIZE, VECTORS)
        assert {p["device"]: p["peer_id"] for p in domain["peers"]} == ids


async def test_lazy_routes_evicted_and_retaken_lose_no_ring(tmp_path: Path) -> None:
    """Budget 2 for 6 vectors: routes move all the time, and each move hands a vector's
    eventfd between its VMM and the hub (drained first); every ring arrives exactly once."""
    async with three_peers(tmp_path, policy="lazy", budget=2) as peers:
        local, remote = peers.local, peers.remote
        ids = {"a": local.peer_id, "b": remote["b"].peer_id, "c": remote["c"].peer_id}
        rounds = 10
        for _ in range(rounds):
            for target in "bca":
                for vector in range(VECTORS):
                    await local.guest.ring(ids[target], vector)
                    if target == "a":
                        event = await local.next_irq()
                        got = (event.vector, event.count)
                    else:
                        irq = await remote[target].next_irq()
                        got = (irq["vector"], irq["count"])
                    assert got == (vector, 1)
        assert list(local.guest.device.notifications) == [rounds] * VECTORS
        for target in "bc":
            assert await remote[target].call("counts") == [rounds] * VECTORS
        routes = await peers.status.routes()
        assert routes["evictions"] > 0 and routes["in_use"] <= 2


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_masked_target_goes_pending_and_unmask_delivers_it_once(
    tmp_path: Path, policy: str
) -> None:
    async with three_peers(tmp_path, policy=policy) as peers:
        local, b = peers.local, peers.remote["b"]
        await b.call("mask", vector=1, masked=True)
        for _ in range(3):
            await local.guest.ring(b.peer_id, 1)
        assert await b.call("pending", vector=1)
        assert not await b.call("pending", vector=0)
        row = await peers.status.vector("b", 1)
        assert (row["pending"], row["coalesced"], row["hub_reading"]) == (True, 2, True)
        assert b.queued_events() == 0

        await b.call("mask", vector=1, masked=False)
        irq = await b.next_irq()
        assert (irq["vector"], irq["count"]) == (1, 1)
        assert not await b.call("pending", vector=1)
        await local.guest.ring(b.peer_id, 1)  # the sentinel: exactly one, nothing replayed
        irq = await b.next_irq()
        assert (irq["vector"], irq["count"]) == (1, 1)
        row = await peers.status.vector("b", 1)
        assert (row["coalesced"], row["pending"], row["cleared"]) == (2, False, 0)

        # The same with the ringer and the target in this process, and the function mask.
        await local.guest.device.msix_control_write(0x8000 | 0x4000)
        await peers.remote["c"].ring(local.peer_id, 0)
        await b.ring(local.peer_id, 1)
        assert await pba_pending(local.guest.device, 0)
        assert await pba_pending(local.guest.device, 1)
        await local.guest.device.msix_control_write(0x8000)
        got = sorted([(e.vector, e.count) for e in [await local.next_irq() for _ in range(2)]])
        assert got == [(0, 1), (1, 1)]


async def test_msix_disabled_rings_raise_intr_status_and_intx(tmp_path: Path) -> None:
    async with (
        ivshmem_hub(tmp_path) as hub,
        device_process(hub, "ivshmem", "a", *daemon_args()),
        device_process(hub, "ivshmem", "b", *daemon_args()),
        local_peer(hub, "a") as local,
        remote_vmm(hub, "b", msix=False) as b,
        hub_status(hub.socket) as status,
    ):
        await local.wait_for_peer(b.peer_id, True)
        await b.wait_for_peer(local.peer_id, True)
        await b.call("write", bar=0, offset=Register.INTR_MASK, size=4, value=1)
        await local.guest.ring(b.peer_id, 1)
        assert await b.next_event() == {"event": "intx", "level": True}
        assert (await status.vector("b", 1))["intx"] == 1
        assert (await status.device("b"))["intx"]

        # IntrStatus reads 1 and clears; the line drops.
        assert await b.call("read", bar=0, offset=Register.INTR_STATUS, size=4) == 1
        assert await b.next_event() == {"event": "intx", "level": False}
        assert await b.call("read", bar=0, offset=Register.INTR_STATUS, size=4) == 0

        # Masked by IntrMask: the status is set, the line stays low.
        await b.call("write", bar=0, offset=Register.INTR_MASK, size=4, value=0)
        await local.guest.ring(b.peer_id, 0)
        with trio.fail_after(EVENT_TIMEOUT):
            while (await status.vector("b", 0))["intx"] != 1:
                pass
        assert await b.call("read", bar=0, offset=Register.INTR_STATUS, size=4) == 1
        assert b.queued_events() == 0

        # MSI-X enabled: rings are vectors again.
        await b.call("control", value=0x8000)
        await local.guest.ring(b.peer_id, 0)
        irq = await b.next_irq()
        assert (irq["vector"], irq["count"]) == (0, 1)


async def test_a_spec_peer_shares_the_region_rings_and_is_rung(tmp_path: Path) -> None:
    async with (
        ivshmem_hub(tmp_path) as hub,
        device_process(hub, "ivshmem", "a", *daemon_args()) as daemon,
        local_peer(hub, "a") as local,
        hub_status(hub.socket) as status,
    ):
        spec = await SpecPeer.connect(tmp_path / "qemu.sock", VECTORS)
        try:
            assert spec.id != local.peer_id
            await spec.wait_for_join(local.peer_id, VECTORS)  # the msixhub peer's vectors
            await local.wait_for_peer(spec.id, True)
            assert local.guest.doorbells() == ring_values([local.peer_id, spec.id], VECTORS)

            # One region: what one writes, the other reads.
            assert os.fstat(spec.shm).st_size == SIZE
            with mmap.mmap(spec.shm, SIZE) as region:
                region[SIZE - 5 :] = b"hello"
                assert bytes(local.guest.shared_memory[SIZE - 5 :]) == b"hello"
                local.guest.shared_memory[:5] = b"world"
                assert region[:5] == b"world"

            # The spec peer rings us (our eventfd, read by our VMM) and we ring it (our VMM
            # writes its eventfd: an ioeventfd, no hub).
            spec.ring(local.peer_id, 1)
            event = await local.next_irq()
            assert (event.vector, event.count, (event.address, event.data)) == (1, 1, message_of(1))
            for vector in range(VECTORS):
                await local.guest.ring(spec.id, vector)
                assert await spec.wait_rung(vector) == 1

            # Masked: the hub reads what the spec peer writes, so the pending bit is exact.
            await set_vector_mask(local.guest.device, 0, True)
            spec.ring(local.peer_id, 0)
            spec.ring(local.peer_id, 0)
            assert await pba_pending(local.guest.device, 0)
            await set_vector_mask(local.guest.device, 0, False)
            event = await local.next_irq()
            assert (event.vector, event.count) == (0, 1)
            assert (await status.vector("a", 0))["coalesced"] == 1

            (domain,) = (await status.report())["ivshmem"]
            assert {p["peer_id"]: p["device"] for p in domain["peers"]} == {
                local.peer_id: "a",
                spec.id: None,
            }
        finally:
            spec.close()
        # It left: we hear of it, its doorbells are gone, and ringing it is a counted no-op.
        await local.wait_for_peer(spec.id, False)
        assert local.guest.doorbells() == ring_values([local.peer_id], VECTORS)
        await local.guest.ring(spec.id, 0)
        await daemon.wait_for_line(f"ignored doorbell to peer {spec.id} vector 0: no such peer")


async def test_a_doorbell_the_vmm_cannot_ring_itself_is_rung_by_the_hub(tmp_path: Path) -> None:
    async with (
        ivshmem_hub(tmp_path) as hub,
        device_process(hub, "ivshmem", "a", *daemon_args()),
        device_process(hub, "ivshmem", "b", *daemon_args()),
        local_peer(hub, "a") as local,
        remote_vmm(hub, "b") as b,
        hub_status(hub.socket) as status,
    ):
        await local.wait_for_peer(b.peer_id, True)
        await b.wait_for_peer(local.peer_id, True)
        ring = Doorbell(b.peer_id, 1).encode()
        local.guest.device.ioeventfds.pop((0, Register.DOORBELL, 4, ring)).close()
        await local.guest.ring(b.peer_id, 1)  # through the hub, which writes b's eventfd
        irq = await b.next_irq()
        assert (irq["vector"], irq["count"]) == (1, 1)
        (domain,) = (await status.report())["ivshmem"]
        relayed = {p["device"]: p["relayed_doorbells"] for p in domain["peers"]}
        assert relayed == {"a": 1, "b": 0}


async def test_registers_and_malformed_doorbells(tmp_path: Path) -> None:
    async with (
        ivshmem_hub(tmp_path) as hub,
        device_process(hub, "ivshmem", "a", *daemon_args()) as daemon,
        device_process(hub, "ivshmem", "b", *daemon_args()),
        local_peer(hub, "a") as local,
        remote_vmm(hub, "b") as b,
    ):
        device = local.guest.device
        await local.wait_for_peer(b.peer_id, True)
        await b.wait_for_peer(local.peer_id, True)
        assert (device.info.pci_id, device.info.kind) == (0x1AF41110, "ivshmem")
        assert [bar.size for bar in device.info.bars] == [256, 4096, SIZE]
        assert await device.mmio_read(0, Register.IV_POSITION + 2, 2) == local.peer_id >> 16

        # To a peer or a vector that does not exist: counted, ignored, nothing breaks.
        await local.guest.ring(0xBEEF, 0)
        await daemon.wait_for_line("ignored doorbell to peer 48879 vector 0: no such peer [(]1 ")
        await local.guest.ring(b.peer_id, VECTORS)
        await daemon.wait_for_line(
            f"ignored doorbell to peer {b.peer_id} vector {VECTORS}: no such vector [(]2 "
        )
        # Malformed accesses: a clear error, nothing changed.
        for bar, offset, size in ((0, Register.DOORBELL, 8), (0, 13, 4), (0, 256, 4), (2, 0, 4)):
            with pytest.raises(RemoteError, match="bad-range"):
                await device.mmio_write(bar, offset, size, 1)
        assert b.queued_events() == 0
        # A narrow write of the doorbell's high half rings peer P's vector 0 (no ioeventfd
        # matches it: the hub rings it).
        await device.mmio_write(0, Register.DOORBELL + 2, 2, b.peer_id)
        irq = await b.next_irq()
        assert (irq["vector"], irq["count"]) == (0, 1)
