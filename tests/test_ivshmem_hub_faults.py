"""ivshmem through the hub when things go wrong: peers killed with SIGKILL, join/leave storms
(no fd leaks in the hub), and requests the hub must refuse with a clear error, nothing changed.
Real processes; every wait is on an event with a cap.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from ivshmem_harness import (
    NAME,
    SIZE,
    VECTORS,
    SpecPeer,
    daemon_args,
    ivshmem_hub,
    local_peer,
)
from msixhub.devices.daemon import open_device
from msixhub.devices.ivshmem.daemon import IvshmemDevice
from msixhub.protocol.errors import RemoteError
from msixhub.testing.ivshmem import remote_vmm, ring_values
from msixhub.testing.processes import (
    HubProcess,
    device_process,
    hub_process,
    msixhub_command,
    open_fds,
    restart,
)
from msixhub.testing.system import EVENT_TIMEOUT, hub_status


async def test_a_peer_killed_with_sigkill_leaves_and_everyone_hears_of_it(tmp_path: Path) -> None:
    async with (
        ivshmem_hub(tmp_path) as hub,
        device_process(hub, "ivshmem", "a", *daemon_args()) as daemon_a,
        device_process(hub, "ivshmem", "b", *daemon_args()) as daemon_b,
        local_peer(hub, "a") as local,
        hub_status(hub.socket) as status,
        trio.open_nursery() as nursery,
    ):
        spec = await SpecPeer.connect(tmp_path / "qemu.sock", VECTORS)
        try:
            async with remote_vmm(hub, "b") as b:
                victim = b.peer_id
                await local.wait_for_peer(victim, True)  # there before us: in our snapshot
                await local.wait_for_peer(spec.id, True)
                await spec.wait_for_join(victim, VECTORS)
                b.kill()  # the VMM process, for real
                assert await b.wait() == -signal.SIGKILL
                # The pair is gone: the peer leaves, its eventfds are closed, others are told.
                await local.wait_for_peer(victim, False)
                await spec.wait_for_departure(victim)
            assert local.guest.doorbells() == ring_values([local.peer_id, spec.id], VECTORS)
            device = await status.device("b")
            assert (device["up"], device["vmm"]) == (True, None)  # its daemon is still there
            (domain,) = (await status.report())["ivshmem"]
            assert victim not in [p["peer_id"] for p in domain["peers"]]
            await local.guest.ring(victim, 0)  # a stale id: counted, ignored
            await daemon_a.wait_for_line(f"ignored doorbell to peer {victim} vector 0")

            # Its daemon dies too, and comes back: a new peer (nobody holds the old id).
            daemon_b.kill()
            assert await daemon_b.wait() == -signal.SIGKILL
            await restart(daemon_b, nursery)
            (domain,) = (await status.report())["ivshmem"]
            (reborn,) = [p["peer_id"] for p in domain["peers"] if p["device"] == "b"]
            assert reborn > victim
            await local.wait_for_peer(reborn, True)
            await spec.wait_for_join(reborn, VECTORS)
            spec.ring(reborn, 1)  # rung while no VMM holds it: pending in the hub
            with trio.fail_after(EVENT_TIMEOUT):
                while not (await status.vector("b", 1))["pending"]:
                    pass
        finally:
            spec.close()
            await daemon_b.stop()


async def test_a_daemon_killed_under_its_vmm_keeps_the_peer_and_its_id(tmp_path: Path) -> None:
    async with (
        ivshmem_hub(tmp_path) as hub,
        device_process(hub, "ivshmem", "a", *daemon_args()),
        device_process(hub, "ivshmem", "b", *daemon_args()) as daemon_b,
        local_peer(hub, "a") as local,
        remote_vmm(hub, "b") as b,
        trio.open_nursery() as nursery,
    ):
        await local.wait_for_peer(b.peer_id, True)
        await b.wait_for_peer(local.peer_id, True)
        daemon_b.kill()
        assert await daemon_b.wait() == -signal.SIGKILL
        assert await b.next_event() == {"event": "device", "state": "down"}

        # The daemon is not on the doorbell path: b is still rung, by its own eventfd.
        await local.guest.ring(b.peer_id, 1)
        irq = await b.next_irq()
        assert (irq["vector"], irq["count"]) == (1, 1)

        await restart(daemon_b, nursery)
        assert await b.next_event() == {"event": "device", "state": "up"}
        assert await b.call("read", bar=0, offset=8, size=4) == b.peer_id  # told its id again
        await b.ring(local.peer_id, 0)
        event = await local.next_irq()
        assert (event.vector, event.count) == (0, 1)
        assert len(local.vm.queue) == 0  # nobody heard of a departure: there was none
        await daemon_b.stop()


async def test_join_leave_storms_leak_no_fd_in_the_hub(tmp_path: Path) -> None:
    cycles = 200
    async with (
        ivshmem_hub(tmp_path) as hub,
        device_process(hub, "ivshmem", "a", *daemon_args()),
        device_process(hub, "ivshmem", "b", *daemon_args()),
        local_peer(hub, "a") as local,
    ):
        qemu = tmp_path / "qemu.sock"

        async def spec_cycle() -> int:
            spec = await SpecPeer.connect(qemu, VECTORS)
            spec.close()
            await local.wait_for_peer(spec.id, True)
            await local.wait_for_peer(spec.id, False)
            return spec.id

        async def msixhub_cycle() -> int:
            # Another VMM takes device b and lets it go: a join and a departure each time.
            async with local_peer(hub, "b", setup=False) as other:
                peer_id = other.peer_id
            await local.wait_for_peer(peer_id, True)
            await local.wait_for_peer(peer_id, False)
            return peer_id

        await local.wait_for_peer(1, True)  # b: a member since it registered...
        async with local_peer(hub, "b", setup=False):
            pass
        await local.wait_for_peer(1, False)  # ...until a VMM took it and let it go
        await msixhub_cycle()
        await spec_cycle()
        hub_fds, our_fds = open_fds(hub.pid), open_fds()
        ids = []
        for _ in range(cycles):
            ids.append(await spec_cycle())
            ids.append(await msixhub_cycle())
        assert ids == sorted(set(ids))  # never reused
        assert open_fds(hub.pid) == hub_fds
        assert open_fds() == our_fds  # the VMM side closed each ioeventfd and mapping once
        assert local.guest.doorbells() == ring_values([local.peer_id], VECTORS)


async def spawn_fails(hub: HubProcess, *args: str) -> str:
    """Run ``msixhub spawn ivshmem`` expecting it to fail; its stderr."""
    command = msixhub_command("spawn", "ivshmem", "--socket", hub.socket, *args)
    with trio.fail_after(EVENT_TIMEOUT * 2):
        result = await trio.run_process(command, capture_stderr=True, check=False)
    assert result.returncode != 0
    return result.stderr.decode()


async def test_bad_sizes_vectors_and_name_collisions_are_clear_errors(tmp_path: Path) -> None:
    async with ivshmem_hub(tmp_path) as hub, hub_status(hub.socket) as status:
        assert "too large" in await spawn_fails(hub, "--id", "x", "--size", "2G")
        assert "invalid size" in await spawn_fails(hub, "--id", "x", "--size", "lots")
        assert "vector count must be in 1..64" in await spawn_fails(
            hub, "--id", "x", "--vectors", "65"
        )
        # The hub's QEMU socket made domain NAME with 1M and 2 vectors.
        refused = await spawn_fails(hub, "--id", "x", *daemon_args(size="2M"))
        assert (
            f"conflict: ivshmem name {NAME!r} exists with size {SIZE} and {VECTORS} vectors; "
            f"device 'x' asked for size {2 * SIZE} and {VECTORS} vectors"
        ) in refused
        refused = await spawn_fails(hub, "--id", "x", *daemon_args(vectors=3))
        assert "asked for size 1048576 and 3 vectors" in refused
        # A daemon that is not ours: sizes the hub cannot give a region.
        for size, why in ((1 << 31, "invalid ivshmem size"), (4095, "invalid ivshmem size")):
            model = IvshmemDevice("y", NAME + "2", size, VECTORS)
            with pytest.raises(ExceptionGroup) as refused_group:
                async with open_device(hub.socket, model):
                    pass
            assert refused_group.group_contains(RemoteError, match=why)
        report = await status.report()
        assert report["devices"] == []  # nothing of any of them stayed
        (domain,) = report["ivshmem"]
        assert (domain["name"], domain["size"], domain["vectors"]) == (NAME, SIZE, VECTORS)


async def test_a_route_budget_too_small_refuses_the_device_up_front(tmp_path: Path) -> None:
    async with (
        ivshmem_hub(tmp_path, budget=3) as hub,
        hub_status(hub.socket) as status,
        device_process(hub, "ivshmem", "a", *daemon_args()),
    ):
        refused = await spawn_fails(hub, "--id", "b", *daemon_args())
        assert "no-route: ivshmem device 'b' needs a route for each of its 2 vectors" in refused
        assert [d["id"] for d in (await status.report())["devices"]] == ["a"]


async def test_an_ivshmem_device_in_the_hub_config_is_spawned(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(
        f'[[device]]\nkind = "ivshmem"\nid = "a"\nargs = {json.dumps(list(daemon_args()))}\n'
    )
    async with hub_process(tmp_path, extra=("--config", str(config))) as hub:
        await hub.wait_for_line(r"device a \(ivshmem\) registered")
        async with local_peer(hub, "a") as local:
            assert local.peer_id == 0
            await local.guest.ring(local.peer_id, 1)  # ourselves, as QEMU allows
            event = await local.next_irq()
            assert (event.vector, event.count) == (1, 1)


async def test_ivshmem_server_is_backed_by_a_hub(tmp_path: Path) -> None:
    shm_name = f"msixhub-test-{tmp_path.name}"[:200]
    qemu = tmp_path / "qemu.sock"
    server = HubProcess(tmp_path / "hub.sock", [])
    # Its verbose log goes to stdout, as QEMU's server's: make it the stderr we read.
    server.command = [
        *("sh", "-c", 'exec "$@" >&2', "sh"),
        *msixhub_command("ivshmem-server", "-F", "-v", "-S", str(qemu), "-M", shm_name),
        *("-l", "1M", "-n", str(VECTORS), "--hub-socket", server.socket),
    ]
    try:
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            try:
                await server.wait_for_line("listening on")
                async with (
                    device_process(server, "ivshmem", "a", *daemon_args(name=shm_name)),
                    local_peer(server, "a") as local,
                    hub_status(server.socket) as status,
                ):
                    spec = await SpecPeer.connect(qemu, VECTORS)
                    try:
                        await local.wait_for_peer(spec.id, True)
                        await spec.wait_for_join(local.peer_id, VECTORS)
                        spec.ring(local.peer_id, 1)
                        event = await local.next_irq()
                        assert (event.vector, event.count) == (1, 1)
                        await local.guest.ring(spec.id, 0)
                        assert await spec.wait_rung(0) == 1
                        local.guest.shared_memory[:4] = b"posx"
                        assert Path("/dev/shm", shm_name).read_bytes()[:4] == b"posx"
                        (domain,) = (await status.report())["ivshmem"]
                        assert domain["name"] == shm_name
                        with trio.fail_after(EVENT_TIMEOUT * 2):
                            shown = await trio.run_process(
                                msixhub_command("status", "--socket", server.socket),
                                capture_stdout=True,
                            )
                        assert (
                            f"ivshmem {shm_name}: {SIZE} bytes, {VECTORS} vectors, 2 joins, "
                            f"0 leaves; peers: {local.peer_id} (a), {spec.id} (QEMU protocol)"
                        ) in shown.stdout.decode()
                    finally:
                        spec.close()
            finally:
                server.send_signal(signal.SIGTERM)
                with trio.fail_after(EVENT_TIMEOUT):
                    assert await server.wait() == 0
        assert not qemu.exists() and not Path(server.socket).exists()
    finally:
        Path("/dev/shm", shm_name).unlink(missing_ok=True)
