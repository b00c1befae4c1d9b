"""Numbers from the virtio 1.x specification that more than one module needs.

Device-type specifics (virtio-blk request types, config offsets) stay in their device module.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Status(IntFlag):
    """Device status bits (virtio 1.x section 2.1)."""

    ACKNOWLEDGE = 0x01
    DRIVER = 0x02
    DRIVER_OK = 0x04
    FEATURES_OK = 0x08
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class DeviceId(IntEnum):
    """Virtio device ids; the PCI device id of a modern device is 0x1040 + id."""

    BLOCK = 2
    ENTROPY = 4


# Transport/ring feature bits (bit numbers, not masks).
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32

# Split virtqueue descriptor flags and ring flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Largest split-queue size (a power of two, 2.7 "Split Virtqueues").
MAX_QUEUE_SIZE = 32768

# virtio-pci
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_MSI_NO_VECTOR = 0xFFFF
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2


def bit(feature: int) -> int:
    """The mask of feature bit number ``feature``."""
    return 1 << feature
