"""A peer that dies in the middle of a request (found by ``msixhub chaos``: rng0 killed while
the hub applied its ``unuse``; from then on every ``use`` of that vector failed with an
internal error, the route released but its channel left open).

* The hub applies a route change whole even when the request that caused it is cancelled
  because its daemon went away; the restarted daemon can use the vector again.
* A connection that ends fails its pending requests at once, not after its request handlers
  finish: a handler that must finish (shielded) and waits for a reply on that connection
  would otherwise wait for ever.

Raw peers play the dying side, so the moment of death is exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from msixhub.client.vmm import connect
from msixhub.devices.testdev import TestDevice
from msixhub.protocol.connection import Request
from msixhub.protocol.errors import ConnectionClosed
from msixhub.protocol.messages import ClearCallFd, RegisterDevice, Unuse, Use
from msixhub.protocol.ops import Empty
from msixhub.protocol.peer import Peer, connect_unix, open_peer
from msixhub.protocol.schema import Message
from msixhub.testing.inprocess import InProcessHub, inprocess_hub
from protocol_helpers import peer_pair

Handler = Callable[[Peer, Request], Awaitable[Message]]
TIMEOUT = 5.0


async def answer_everything(peer: Peer, request: Request) -> Message:
    for fd in request.fds:
        fd.close()
    return Empty()


@asynccontextmanager
async def raw_device(
    server: InProcessHub, handler: Handler = answer_everything
) -> AsyncIterator[Peer]:
    """A registered device connection for testdev ``dev0`` that answers with ``handler``."""
    transport = await connect_unix(server.socket)
    async with open_peer(transport, "device", name="dev0", on_request=handler) as peer:
        _, fds = await peer.request(RegisterDevice(TestDevice("dev0", 4, 1).info))
        for fd in fds:
            fd.close()
        yield peer


@pytest.mark.parametrize("vector", [0, 3])
async def test_a_daemon_killed_during_unuse_can_use_the_vector_again(
    tmp_path: Path, vector: int
) -> None:
    async with inprocess_hub(tmp_path / "hub.sock") as server:
        asked_to_clear = trio.Event()

        async def die_before_answering_clear(peer: Peer, request: Request) -> Message:
            if isinstance(request.body, ClearCallFd):
                asked_to_clear.set()
                await trio.sleep_forever()  # it never answers: it is killed first
            return await answer_everything(peer, request)

        with trio.fail_after(TIMEOUT):
            async with (
                raw_device(server, die_before_answering_clear) as peer,
                connect(server.socket, name="vm") as vm,
            ):
                attached = await vm.attach("dev0")
                await peer.call(Use(vector))
                async with trio.open_nursery() as nursery:

                    async def unuse() -> None:
                        with pytest.raises(ConnectionClosed):
                            await peer.call(Unuse(vector))

                    nursery.start_soon(unuse)
                    await asked_to_clear.wait()
                    await peer.aclose("killed")  # the hub's ClearCallFd to it is pending

                device = server.hub.devices["dev0"]
                while device.peer is not None:  # until the hub has seen the death
                    await trio.sleep(0.001)
                # The release was applied whole: no route, no channel, the VMM told.
                assert device.msix.vector_stats(vector).used == 0
                assert vector not in device.channels.fds
                assert vector not in attached.irq_fds

                async with raw_device(server) as restarted:
                    await restarted.call(Use(vector))  # an internal error before the fix
                    assert vector in device.channels.fds
                    assert device.msix.vector_stats(vector).route is not None
                    assert vector in attached.irq_fds


async def test_a_connection_that_ends_fails_its_pending_requests_at_once() -> None:
    calling_back = trio.Event()
    outcome: list[str] = []

    async def call_back_shielded(peer: Peer, request: Request) -> Message:
        with trio.CancelScope(shield=True):  # this handler must finish
            calling_back.set()
            try:
                with trio.fail_after(TIMEOUT):
                    await peer.call(Use(1))  # never answered: the other side goes away
            except ConnectionClosed:
                outcome.append("failed")
            except trio.TooSlowError:
                outcome.append("waited for a reply that could not come")
        return Empty()

    async def never_answer(peer: Peer, request: Request) -> Message:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(2 * TIMEOUT):
        async with peer_pair(
            server_options={"on_request": call_back_shielded},
            client_options={"on_request": never_answer},
        ) as (client, server):
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    with pytest.raises(ConnectionClosed):
                        await client.call(Use(0))

                nursery.start_soon(ask)
                await calling_back.wait()
                await client.aclose("gone")
            await server.closed.wait()
            while not outcome:  # the shielded handler got its answer: closed
                await trio.sleep(0.001)
    assert outcome == ["failed"]
