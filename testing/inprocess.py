"""A hub and a testdev inside the test's own trio run: no process start-up, and the test sees
the hub's objects (``server.hub``). Faster and more observable than real processes; use
``msixhub.testing.processes`` where the point is a real process boundary (signals, exits).

    async with inprocess_hub(tmp_path / "hub.sock", route_policy="direct") as server:
        async with inprocess_testdev(server.socket, "dev0", vectors=4):
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from msixhub.devices.daemon import open_device
from msixhub.devices.testdev import TestDevice
from msixhub.server.hub import Hub
from msixhub.server.routes import RoutePolicy
from msixhub.server.serve import HubConfig, HubServer, run_hub


@dataclass(frozen=True, slots=True)
class InProcessHub:
    socket: str
    server: HubServer

    @property
    def hub(self) -> Hub:
        return self.server.hub


@asynccontextmanager
async def inprocess_hub(
    socket_path: str | Path,
    *,
    route_policy: str = "static",
    route_budget: int = 4096,
    tcp: tuple[str, int] | None = None,
) -> AsyncIterator[InProcessHub]:
    """``run_hub`` on ``socket_path`` (and on TCP at ``tcp``, port 0 for one of its choosing:
    ``server.tcp_addresses``) for the duration of the block (then every fd it held is
    closed and the socket file removed)."""
    config = HubConfig(
        socket=str(socket_path),
        route_policy=RoutePolicy(route_policy),
        route_budget=route_budget,
        tcp=tcp,
    )
    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_hub, config)
        try:
            yield InProcessHub(str(socket_path), server)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def inprocess_testdev(
    socket_path: str, device_id: str, *, vectors: int = 4, queues: int = 1
) -> AsyncIterator[TestDevice]:
    """A testdev registered with the hub at ``socket_path`` for the duration of the block."""
    model = TestDevice(device_id, vectors, queues)
    async with open_device(socket_path, model):
        yield model
