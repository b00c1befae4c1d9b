"""virtio-rng (virtio 1.x section 5.4, "entropy device"): fill the driver's buffers.

One queue of device-writable buffers; the device puts random bytes from ``os.urandom``
at their start. 5.4.6.1 lets it use less than the whole buffer, so one request gets at most
``max_bytes`` (a guest cannot make one request allocate without bound). Device-readable
buffers carry nothing for this device and are ignored.
"""

from __future__ import annotations

import os

from msixhub.devices.virtio.constants import DeviceId
from msixhub.devices.virtio.ring import Chain, write_views


class RngDevice:
    device_id = DeviceId.ENTROPY
    pci_class = 0xFF0000  # "unassigned class", as QEMU's virtio-rng-pci
    num_queues = 1

    def __init__(self, *, queue_size: int = 64, max_bytes: int = 4096) -> None:
        if queue_size < 1 or queue_size & (queue_size - 1):
            raise ValueError(f"queue size {queue_size} is not a power of two")
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_queue_size = queue_size
        self.max_bytes = max_bytes

    def device_features(self) -> int:
        return 0

    def negotiate(self, features: int) -> bool:
        return True

    def reset(self) -> None:
        pass

    def config_space(self) -> bytes:
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The entropy device has no configuration space."""

    def parse(self, queue: int, chain: Chain) -> RngRequest:
        return RngRequest(chain, min(chain.write_len, self.max_bytes))


class RngRequest:
    blocking = False  # urandom of a few KiB does not block

    def __init__(self, chain: Chain, length: int) -> None:
        self.chain = chain
        self.length = length

    def execute(self) -> int:
        return write_views(self.chain.writable, os.urandom(self.length))

    def execute_nowait(self) -> int:
        return self.execute()
