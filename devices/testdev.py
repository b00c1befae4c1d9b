"""``testdev``: a minimal device whose registers let a VMM (or a test) make it notify, deassert,
use and unuse vectors and drive INTx, so the hub's interrupt paths can be exercised across
real processes without virtio.

BAR0 registers (writes of 4 or 8 bytes):
    0x00 NOTIFY    vector | count << 16: notify ``vector`` ``count`` times (count 0 means 1)
    0x08 DEASSERT  vector
    0x10 USE       vector; the result is read back at 0x18
    0x18 RESULT    0 ok, 1 refused (no route / bad vector)
    0x20 UNUSE     vector
    0x28 INTX      level (0 or 1)
    0x30 SENT      read: notifications sent so far
A kick of queue ``q`` notifies vector ``q`` once (the queue echoes).
BAR1 holds the MSI-X table at 0 and the PBA after it; the hub answers those.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from msixhub.devices.cli_args import int_in
from msixhub.devices.daemon import HubLink, NoVectorError, run_device
from msixhub.protocol.fds import OwnedFd, close_all
from msixhub.protocol.messages import MAX_QUEUES, MAX_VECTORS, Bar, DeviceInfo, MsixLayout, Region

NOTIFY, DEASSERT, USE, RESULT, UNUSE, INTX, SENT = range(0, 0x38, 8)


def msix_bar_layout(num_vectors: int) -> tuple[MsixLayout, int]:
    """Table at 0, PBA at the next 4 KiB boundary-free 8-byte slot; the BAR size, a power of two."""
    table = num_vectors * 16
    pba = (num_vectors + 63) // 64 * 8
    size = 4096
    while size < table + pba:
        size *= 2
    return MsixLayout(bar=1, table_offset=0, pba_offset=table), size


class TestDevice:
    __test__ = False  # not a pytest class

    def __init__(self, device_id: str, num_vectors: int, num_queues: int) -> None:
        layout, msix_size = msix_bar_layout(num_vectors)
        self.info = DeviceInfo(
            device=device_id,
            kind="testdev",
            num_vectors=num_vectors,
            num_queues=num_queues,
            bars=[Bar(0, 4096), Bar(1, msix_size)],
            msix=layout,
            intx=True,
        )
        self.hub: HubLink | None = None
        self.result = 0
        self.memory: list[OwnedFd] = []

    def attach_hub(self, hub: HubLink) -> None:
        self.hub = hub

    def set_memory(self, regions: Sequence[Region], fds: list[OwnedFd]) -> None:
        close_all(self.memory)
        self.memory = fds

    def set_inflight(self, fd: OwnedFd | None, restarted: bool) -> None:
        if fd is not None:
            fd.close()

    async def bar_read(self, bar: int, offset: int, size: int) -> int:
        assert self.hub is not None
        if bar == 0 and offset == RESULT:
            return self.result
        if bar == 0 and offset == SENT:
            return self.hub.notifications
        return 0

    async def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        hub = self.hub
        assert hub is not None
        if bar != 0:
            return
        vector = value & 0xFFFF
        if offset == NOTIFY:
            for _ in range(max(1, (value >> 16) & 0xFFFF_FFFF)):
                await hub.notify(vector)
        elif offset == DEASSERT:
            await hub.deassert(vector)
        elif offset == USE:
            try:
                await hub.use(vector)
                self.result = 0
            except NoVectorError:
                self.result = 1
        elif offset == UNUSE:
            await hub.unuse(vector)
        elif offset == INTX:
            await hub.set_intx(bool(value & 1))

    async def kicked(self, queue: int) -> None:
        assert self.hub is not None
        await self.hub.notify(queue % self.info.num_vectors)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vectors",
        type=int_in(1, MAX_VECTORS, "vector count"),
        default=4,
        help=f"MSI-X table size, 1..{MAX_VECTORS} (default 4)",
    )
    parser.add_argument(
        "--queues",
        type=int_in(0, MAX_QUEUES, "queue count"),
        default=1,
        help=f"kick channels, 0..{MAX_QUEUES} (default 1)",
    )


async def serve(args: argparse.Namespace) -> None:
    await run_device(args.socket, TestDevice(args.id, args.vectors, args.queues))
