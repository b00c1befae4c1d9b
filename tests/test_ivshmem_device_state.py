"""The ivshmem daemon keeps IntrMask and IntrStatus in the hub's in-flight region, where the
next incarnation of the daemon finds them after a kill. A kill can fall between any two
stores, so every state of the region a store passes through must be one the registers were
in: each register old or new, never a transient 0 (``struct.pack_into`` zeroes both words
before it writes them).

A register value that is a :class:`Witness` records the region, as a reader in another
process would map it, at the moment the daemon converts the value to store it.
"""

from __future__ import annotations

import mmap
import os
import struct

from msixhub.devices.ivshmem.daemon import IvshmemDevice
from msixhub.protocol.fds import OwnedFd, memfd

_WORDS = struct.Struct("=II")  # IntrMask, IntrStatus in host order


class Witness:
    """A register value that records what a reader of ``region`` sees when it is stored."""

    def __init__(self, value: int, region: mmap.mmap, seen: list[tuple[int, int]]) -> None:
        self.value, self.region, self.seen = value, region, seen

    def __index__(self) -> int:
        self.seen.append(_WORDS.unpack_from(self.region))
        return self.value

    def __and__(self, other: int) -> int:  # the INTx level is IntrStatus & IntrMask
        return self.value & other

    __rand__ = __and__


def _device(region: OwnedFd, *, restarted: bool) -> IvshmemDevice:
    device = IvshmemDevice("ivs0", "shm", 1 << 20, 2)
    device.set_inflight(OwnedFd(os.dup(region.fileno()), "inflight"), restarted)
    return device


async def test_a_restart_finds_each_register_old_or_new_never_zeroed() -> None:
    with memfd(_WORDS.size, "ivshmem-inflight") as region:
        reader = mmap.mmap(region.fileno(), _WORDS.size)  # the next incarnation's mapping
        device = _device(region, restarted=False)
        device.registers.intr_mask, device.registers.intr_status = 0xF0, 0x0F
        await device._registers_changed()
        assert _WORDS.unpack_from(reader) == (0xF0, 0x0F)

        seen: list[tuple[int, int]] = []
        device.registers.intr_mask = Witness(0xF1, reader, seen)  # type: ignore[assignment]
        device.registers.intr_status = Witness(0x1F, reader, seen)  # type: ignore[assignment]
        await device._registers_changed()
        assert seen == [(0xF0, 0x0F), (0xF1, 0x0F)]  # before each store: old, then half new
        assert _WORDS.unpack_from(reader) == (0xF1, 0x1F)

        restarted = _device(region, restarted=True)
        assert (restarted.registers.intr_mask, restarted.registers.intr_status) == (0xF1, 0x1F)
        reader.close()
