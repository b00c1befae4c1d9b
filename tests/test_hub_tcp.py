"""Peers that cannot take file descriptors (on TCP, or a unix peer that said it takes none).

Everything a device daemon gets from the hub is an fd (eventfds, kick fds, guest memory), and
so is guest memory from a VMM, so the hub refuses those up front with a clear ``unsupported``
error and changes nothing; a peer on TCP can still ask for status. A VMM without fds attaches
on the message path (interrupts as Irq, kicks as Kick: tests/test_hub_tcp_vmm.py). Before,
the attach went halfway: the reply (kick fds) failed to go out, the device stayed attached
to a VMM that could never use it, and no other VMM could take it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio
from msixhub.client.vmm import connect
from msixhub.devices.testdev import TestDevice
from msixhub.protocol.errors import ErrorCode, RemoteError
from msixhub.protocol.fds import eventfd
from msixhub.protocol.messages import (
    Attach,
    Attached,
    RegisterDevice,
    Role,
    SetIrqFd,
    SetMemTable,
    StatusQuery,
    StatusReport,
)
from msixhub.protocol.peer import Peer, connect_tcp, connect_unix, open_peer
from msixhub.protocol.transport import Transport
from msixhub.testing.inprocess import InProcessHub, inprocess_hub, inprocess_testdev
from msixhub.testing.system import Testdev, hub_status, next_interrupt

TIMEOUT = 5.0


def hub_with_tcp(directory: Path) -> AbstractAsyncContextManager[InProcessHub]:
    return inprocess_hub(directory / "hub.sock", tcp=("127.0.0.1", 0))


Connector = Callable[
    [InProcessHub], Awaitable[tuple[Transport, int]]
]  # a transport, the fds we take


async def over_tcp(hub: InProcessHub) -> tuple[Transport, int]:
    host, port = hub.server.tcp_addresses[0]
    return await connect_tcp(host, port), 0


async def over_unix_without_fds(hub: InProcessHub) -> tuple[Transport, int]:
    return await connect_unix(hub.socket), 0


@pytest.fixture(params=[over_tcp, over_unix_without_fds], ids=["tcp", "unix-no-fds"])
def connector(request: pytest.FixtureRequest) -> Connector:
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def fdless_peer(hub: InProcessHub, connector: Connector, role: Role) -> AsyncIterator[Peer]:
    transport, max_fds = await connector(hub)
    async with open_peer(transport, role, name=f"fdless-{role}", max_fds=max_fds) as peer:
        yield peer


async def test_memory_and_register_are_refused_and_attach_takes_the_message_path(
    tmp_path: Path, connector: Connector
) -> None:
    async with (
        hub_with_tcp(tmp_path) as server,
        inprocess_testdev(server.socket, "dev0", vectors=2),
    ):
        with trio.fail_after(TIMEOUT):
            async with fdless_peer(server, connector, "vmm") as vmm:
                with pytest.raises(RemoteError) as refused:
                    await vmm.call(SetMemTable([]))
                assert refused.value.code == ErrorCode.UNSUPPORTED
                assert "fd passing" in refused.value.message
                report = await vmm.call(StatusQuery())  # still served: status needs no fds
                assert isinstance(report, StatusReport)
                assert [d["vmm"] for d in report.report["devices"]] == [None]
                attached = await vmm.call(Attach("dev0"))  # no kick fds in the reply
                assert isinstance(attached, Attached) and attached.by_message
            async with hub_status(server.socket) as status:  # released as it leaves
                await status.wait_for(lambda r: r["devices"][0]["vmm"] is None)

            async with fdless_peer(server, connector, "device") as daemon:
                with pytest.raises(RemoteError) as refused:
                    await daemon.request(RegisterDevice(TestDevice("dev1", 2, 1).info))
                assert refused.value.code == ErrorCode.UNSUPPORTED
            assert list(server.hub.devices) == ["dev0"]

            # The device is free for a VMM that can take fds, and interrupts flow.
            async with connect(server.socket, name="vm0") as vm:
                testdev = Testdev(await vm.attach("dev0"))
                await testdev.setup(range(2))
                await testdev.notify(1)
                interrupt = await next_interrupt(vm)
                assert (interrupt.vector, interrupt.count) == (1, 1)


async def test_an_fd_the_peer_cannot_take_is_a_logged_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub's last line of defence: ``_tell`` (which route changes, attaches and restarts
    use) never lets FdPassingUnsupported escape into the task that called it."""
    async with hub_with_tcp(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            async with fdless_peer(server, over_tcp, "vmm") as peer:
                status = await peer.call(StatusQuery())  # the hub has registered it by now
                assert isinstance(status, StatusReport)
                (vmm,) = server.hub.vmms.values()
                with eventfd() as fd, caplog.at_level(logging.ERROR, "msixhub.hub"):
                    await server.hub._tell_vmm(vmm, SetIrqFd("dev0", 0), [fd])
                assert "refused to send SetIrqFd" in caplog.text
                assert vmm.peer.is_open
