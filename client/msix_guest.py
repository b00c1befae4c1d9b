"""What a guest's MSI-X driver does to a device, through an :class:`AttachedDevice`: program a
table entry, mask or unmask a vector, read its pending bit, set Message Control.

Every access is an ordinary guest access (``mmio_write`` of the table in the device's MSI-X
BAR, ``msix_control_write``), so the VMM client does its half of the mask handoff exactly as
it would for a real guest; nothing here reaches around it.
"""

from __future__ import annotations

from msixhub.client.vmm import ENTRY_SIZE, FUNCTION_MASK, MSIX_ENABLE, AttachedDevice

ADDRESS_LO, ADDRESS_HI, DATA, VECTOR_CONTROL = 0, 4, 8, 12
MASK_BIT = 1

__all__ = [
    "FUNCTION_MASK",
    "MSIX_ENABLE",
    "entry_offset",
    "pba_pending",
    "program_vector",
    "set_vector_mask",
]


def entry_offset(device: AttachedDevice, vector: int) -> int:
    """Offset of ``vector``'s 16-byte table entry in the MSI-X BAR."""
    if not 0 <= vector < device.info.num_vectors:
        raise ValueError(
            f"{device.id} has no vector {vector} (its table has {device.info.num_vectors})"
        )
    return device.info.msix.table_offset + vector * ENTRY_SIZE


async def program_vector(
    device: AttachedDevice, vector: int, address: int, data: int, *, masked: bool = False
) -> None:
    """Write ``vector``'s message (address, data), then its mask bit, as a guest driver does."""
    if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
        raise ValueError(f"address {address:#x} / data {data:#x} do not fit an MSI-X entry")
    base = entry_offset(device, vector)
    bar = device.info.msix.bar
    await device.mmio_write(bar, base + ADDRESS_LO, 4, address & 0xFFFF_FFFF)
    await device.mmio_write(bar, base + ADDRESS_HI, 4, address >> 32)
    await device.mmio_write(bar, base + DATA, 4, data)
    await set_vector_mask(device, vector, masked)


async def set_vector_mask(device: AttachedDevice, vector: int, masked: bool) -> None:
    """Set or clear the mask bit in ``vector``'s Vector Control."""
    offset = entry_offset(device, vector) + VECTOR_CONTROL
    await device.mmio_write(device.info.msix.bar, offset, 4, MASK_BIT if masked else 0)


async def pba_pending(device: AttachedDevice, vector: int) -> bool:
    """``vector``'s Pending Bit, read from the PBA as a guest would (one aligned QWORD)."""
    entry_offset(device, vector)  # validates the vector
    layout = device.info.msix
    qword = await device.mmio_read(layout.bar, layout.pba_offset + vector // 64 * 8, 8)
    return bool(qword >> (vector % 64) & 1)
