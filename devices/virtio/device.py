"""What a virtio device type (blk, rng) provides to the transport, independent of PCI.

A device type owns its feature bits, its configuration space and the meaning of the chains
on its queues. It never touches rings, interrupts or registers: the transport does. Work is
split in two so the daemon can run I/O off its event loop:

* :meth:`VirtioDevice.parse` runs on the event loop, cheap, and raises
  :class:`~msixhub.devices.virtio.ring.VirtqueueError` for a chain the device cannot even
  answer (no room for a status byte...), which makes the device need a reset;
* :meth:`DeviceRequest.execute` does the work (in a worker thread when ``blocking``) and
  never raises: every failure becomes a status the driver reads.
"""

from __future__ import annotations

from typing import Protocol

from msixhub.devices.virtio.ring import Chain


class DeviceRequest(Protocol):
    """One parsed request; ``chain`` is the transport's to complete and release."""

    chain: Chain
    blocking: bool  # True: run execute() off the event loop (it does file I/O)

    def execute(self) -> int:
        """Carry the request out; returns the bytes written into the writable buffers."""
        ...

    def execute_nowait(self) -> int | None:
        """For a blocking request: carry it out now if that cannot block (a read the page
        cache holds), as :meth:`execute` would; else None, leaving it for :meth:`execute`."""
        ...


class VirtioDevice(Protocol):
    device_id: int
    pci_class: int  # 24-bit PCI class code
    num_queues: int
    max_queue_size: int

    def device_features(self) -> int:
        """Device-type feature bits offered (the transport adds the ring/version bits)."""
        ...

    def negotiate(self, features: int) -> bool:
        """Accept the driver's feature set at FEATURES_OK (False refuses FEATURES_OK)."""
        ...

    def config_space(self) -> bytes:
        """The device-specific configuration structure as the driver reads it."""
        ...

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into the configuration structure (ignored where read-only)."""
        ...

    def parse(self, queue: int, chain: Chain) -> DeviceRequest: ...

    def reset(self) -> None:
        """Forget negotiated state (device status was written 0)."""
        ...
