"""Stores into memory another process reads at the same time (ring indices, event fields) are
single stores: the reader sees the old value or the new one, never a transient 0.

``struct.pack_into`` would fail this: it zeroes its destination before it writes the value,
and a reader in another process catches the 0 several percent of the time. A child process
stores non-zero values in a loop while this one reads the same words through its own mapping.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio
from msixhub.devices.guestmem import GuestMemory
from msixhub.protocol.fds import memfd

SIZE = 1 << 16
STORES = 200_000

WRITER = """
import sys
from msixhub.devices.guestmem import GuestMemory
fd, size, width, stores = map(int, sys.argv[1:])
memory = GuestMemory.from_memfd(fd, size)
store = {2: memory.write_u16, 4: memory.write_u32, 8: memory.write_u64}[width]
for i in range(stores):
    store(64, (i % 255 + 1) << 8 * (width - 1))  # never 0, and the top byte changes
memory.write_u16(128, 1)  # the end
"""


@pytest.mark.parametrize("width", [2, 4, 8])
async def test_no_transient_zero(width: int) -> None:
    fd = memfd(SIZE, "shared-stores")
    with fd, GuestMemory.from_memfd(fd, SIZE) as memory:
        read = {2: memory.read_u16, 4: memory.read_u32, 8: memory.read_u64}[width]
        memory.write_u64(64, 1 << 8 * (width - 1))  # non-zero before the writer starts
        command = [sys.executable, "-c", WRITER, str(fd.fileno()), str(SIZE), str(width)]
        with trio.fail_after(30):
            process = await trio.lowlevel.open_process(
                [*command, str(STORES)], pass_fds=[fd.fileno()], stdin=subprocess.DEVNULL
            )
            try:
                reads = 0
                while not memory.read_u16(128):
                    assert read(64) != 0, f"read a transient 0 after {reads} reads"
                    reads += 1
                    if reads % 1000 == 0:
                        await trio.lowlevel.checkpoint()
                assert await process.wait() == 0, "the writer failed"
                assert reads > 1000  # the two loops did overlap
            finally:
                process.kill()
                await process.wait()
