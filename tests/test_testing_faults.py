"""Process and resource faults on real processes, through the pytest fixtures: each fault is
shown to happen (the process really is stopped, killed, limited), and the hub survives it."""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from msixhub.client.admin import fetch_status
from msixhub.client.vmm import DeviceEvent, VmmClient
from msixhub.protocol.errors import ConnectionClosed
from msixhub.testing.faults import (
    RouteExhaustion,
    exhaust_routes,
    fd_limit,
    full_image,
    kill,
    process_state,
    stopped,
)
from msixhub.testing.limited import limit_prefix
from msixhub.testing.processes import HubProcess
from msixhub.testing.proxy import FaultRule, Truncate
from msixhub.testing.system import Testdev, next_event, next_interrupt

if TYPE_CHECKING:  # the plugin module is imported by pytest_plugins, to be assertion-rewritten
    from msixhub.testing.fixtures import DeviceStarter, Processes, ProxyFactory, VmmConnector

pytest_plugins = ["msixhub.testing.fixtures"]

TIMEOUT = 10.0


async def device_report(hub: HubProcess, device_id: str) -> dict[str, object]:
    report = await fetch_status(hub.socket)
    return next(d for d in report["devices"] if d["id"] == device_id)


async def wait_for_device(hub: HubProcess, device_id: str, **expected: object) -> None:
    """Poll the hub's status (one round trip each) until the device's fields match."""
    with trio.fail_after(TIMEOUT):
        while True:
            report = await device_report(hub, device_id)
            if all(report[key] == value for key, value in expected.items()):
                return


async def attached_testdev(vm: VmmClient, device_id: str, vectors: int = 4) -> Testdev:
    await vm.add_memory(1 << 20)
    testdev = Testdev(await vm.attach(device_id))
    await testdev.setup(range(vectors))
    return testdev


# --- process faults --------------------------------------------------------------------------


async def test_stopped_device_is_hung_then_continues(
    hub: HubProcess, start_device: DeviceStarter, connect_vmm: VmmConnector
) -> None:
    device = await start_device("testdev", "dev0")
    vm = await connect_vmm(request_timeout=0.5)
    testdev = await attached_testdev(vm, "dev0")
    async with stopped(device) as pid:
        assert process_state(pid) == "T"
        with pytest.raises(trio.TooSlowError):  # the daemon cannot answer its registers
            await testdev.sent()
        await fetch_status(hub.socket)  # the hub itself is not held up
    assert process_state(device.pid) != "T"
    await testdev.notify(1)
    assert (await next_interrupt(vm)).vector == 1


async def test_killed_device_restarts_and_resumes(
    hub: HubProcess, msixhub_processes: Processes, connect_vmm: VmmConnector
) -> None:
    device = await msixhub_processes.device("testdev", "dev0")
    vm = await connect_vmm()
    testdev = await attached_testdev(vm, "dev0")
    assert await kill(device) == -9
    await wait_for_device(hub, "dev0", up=False)
    await msixhub_processes.restart(device)
    await wait_for_device(hub, "dev0", up=True, registrations=2, pid=device.pid)
    assert await next_event(vm) == DeviceEvent("dev0", "down")
    assert await next_event(vm) == DeviceEvent("dev0", "up")
    await testdev.notify(2)
    assert (await next_interrupt(vm)).vector == 2


async def test_vmm_process_killed_or_stopped(hub: HubProcess, msixhub_processes: Processes) -> None:
    await msixhub_processes.device("testdev", "dev0")
    vmm = await msixhub_processes.vmm("dev0", kick_interval=0.01)
    await vmm.wait_for_line(r"irq dev0 0 \d+")  # kicks come back as interrupts
    async with stopped(vmm):
        assert process_state(vmm.pid) == "T"
        await wait_for_device(hub, "dev0", vmm="vm0", up=True)
    mark = vmm.line_count
    await vmm.wait_for_line(r"irq dev0 0 \d+", after=mark)  # it runs again
    await kill(vmm)
    await wait_for_device(hub, "dev0", vmm=None, up=True)  # the hub let the device go
    await msixhub_processes.restart(vmm)  # and a VMM can take it again
    await wait_for_device(hub, "dev0", vmm="vm0")


# --- resource faults -------------------------------------------------------------------------


@pytest.mark.parametrize("hub_settings", [{"route_budget": 2}])
async def test_route_budget_exhaustion(
    hub: HubProcess, start_device: DeviceStarter, connect_vmm: VmmConnector
) -> None:
    await start_device("testdev", "dev0", "--vectors", "4")
    vm = await connect_vmm()
    testdev = Testdev(await vm.attach("dev0"))
    assert await exhaust_routes(testdev.use, range(4)) == RouteExhaustion([0, 1], 2)
    routes = (await fetch_status(hub.socket))["routes"]
    assert routes["in_use"] == 2 and routes["alloc_failures"] >= 1


async def test_fd_limit_really_limits_a_daemon(
    hub: HubProcess, msixhub_processes: Processes
) -> None:
    small = await msixhub_processes.device("testdev", "small", "--queues", "2", nofile=24)
    assert fd_limit(small.pid) == 24
    # 64 kick fds do not fit under 24: the kernel drops those it cannot install.
    command = [
        *limit_prefix(nofile=24),
        sys.executable,
        "-m",
        "msixhub.client.cli",
        "spawn",
        "testdev",
        "--id",
        "big",
        "--socket",
        hub.socket,
        "--queues",
        "64",
    ]
    big = await msixhub_processes.start("big", command, ready="truncated in transit")
    with trio.fail_after(TIMEOUT):
        assert await big.wait() != 0
    unlimited = await msixhub_processes.device("testdev", "big2", "--queues", "64")
    assert unlimited.process is not None and unlimited.process.returncode is None
    await wait_for_device(hub, "small", up=True)


@pytest.mark.parametrize("hub_settings", [{"nofile": 40}])
async def test_hub_out_of_fds_serves_on(hub: HubProcess) -> None:
    """Connections beyond the hub's fd limit are refused or dropped; the hub stays up and
    serves again once they are gone."""
    assert fd_limit(hub.pid) == 40
    sockets = []
    try:
        for _ in range(60):
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            sockets.append(sock)
            await sock.connect(hub.socket)
        await hub.wait_for_line("(?i)too many open files")
    finally:
        for sock in sockets:
            sock.close()
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                await fetch_status(hub.socket, timeout=1.0)
                break
            except (ConnectionClosed, trio.TooSlowError, OSError):
                continue
    assert hub.process is not None and hub.process.returncode is None


def test_full_image_fails_writes_with_enospc(tmp_path: Path) -> None:
    path = full_image(tmp_path)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as failure:
            os.pwrite(fd, b"\0" * 512, 0)
        assert failure.value.errno == errno.ENOSPC
        assert os.pread(fd, 4, 0) == b"\0" * 4
    finally:
        os.close(fd)


async def test_fsize_limit_fails_writes_past_an_offset(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(bytes(8192))
    script = (
        "import os, sys\n"
        f"fd = os.open({str(image)!r}, os.O_RDWR)\n"
        "os.pwrite(fd, b'x', 100)\n"
        "try:\n"
        "    os.pwrite(fd, b'x', 4096)\n"
        "except OSError as e:\n"
        "    sys.exit(e.errno)\n"
    )
    result = await trio.run_process(
        [*limit_prefix(fsize=4096), sys.executable, "-c", script], check=False
    )
    assert result.returncode == errno.EFBIG
    assert image.read_bytes()[100:101] == b"x"


# --- a channel fault against the hub process -------------------------------------------------


async def test_hub_process_survives_a_truncated_connection(
    hub: HubProcess,
    start_device: DeviceStarter,
    connect_vmm: VmmConnector,
    fault_proxy: ProxyFactory,
) -> None:
    await start_device("testdev", "dev0")
    proxy = await fault_proxy()
    vm = await connect_vmm(socket=proxy.path)
    testdev = await attached_testdev(vm, "dev0")
    proxy.set_rules([FaultRule(Truncate(), op="mmio_read")])
    with pytest.raises(ConnectionClosed):
        await testdev.sent()
    await hub.wait_for_line(re.escape("peer closed the connection in the middle of a frame"))
    await wait_for_device(hub, "dev0", up=True, vmm=None)
    other = await connect_vmm(name="vm1")
    testdev = await attached_testdev(other, "dev0")
    await testdev.notify(3)
    assert (await next_interrupt(other)).vector == 3
