"""ivshmem: shared-memory peers with doorbells, and QEMU's ivshmem server protocol."""
