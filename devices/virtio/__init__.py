"""Virtio 1.x: split virtqueues in guest memory, the virtio-pci modern transport, blk and rng."""
