"""Admin connections to a hub: status queries."""

from __future__ import annotations

from typing import Any

from msixhub.protocol.messages import StatusQuery, StatusReport
from msixhub.protocol.peer import connect_unix, open_peer


async def fetch_status(socket_path: str, timeout: float = 5.0) -> dict[str, Any]:
    transport = await connect_unix(socket_path)
    async with open_peer(transport, "admin", name="status") as peer:
        reply = await peer.call(StatusQuery(), timeout=timeout)
    assert isinstance(reply, StatusReport)
    return dict(reply.report)
