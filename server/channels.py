"""A device's vector channels as the hub holds them: one eventfd per routed vector (the hub
keeps its own copy; the device and the VMM get duplicates), and the hub's reader for each
vector that is effectively masked.

The mask handoff of DESIGN.md lives here. While a vector is masked the hub reads its
eventfd and turns every count into ``notify`` on the MSI-X model (so the pending bit is
exact); while it is unmasked the VMM reads and the hub does not. The hub never writes
these eventfds: what it delivers goes to the VMM by message (a count of its own would be
read back by its reader at the next mask, as a new notification). The hub's owner drains a
vector before a write that may unmask it, so counts that arrived before the unmask become
pending first and are delivered by it exactly once; ``stop_reading`` drains again, and
what arrived in between is delivered as the unmasked vector's (the model says so).
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from msixhub.protocol.fds import NowaitReader, OwnedFd, vector_eventfd

CountSink = Callable[[int, int], None]  # (vector, count) -> None


class VectorChannels:
    def __init__(self, nursery: trio.Nursery, on_counts: CountSink) -> None:
        self._nursery = nursery
        self._on_counts = on_counts
        self.fds: dict[int, OwnedFd] = {}
        self._readers: dict[int, trio.CancelScope] = {}
        self._reader = NowaitReader()  # the hub's tasks share it: none awaits while it reads

    def open(self, vector: int) -> OwnedFd:
        """The eventfd of a newly routed vector (the hub's own copy)."""
        if vector in self.fds:
            raise ValueError(f"vector {vector} already has a channel")
        fd = self.fds[vector] = vector_eventfd()
        fd.name = f"call{vector}"
        return fd

    def close(self, vector: int) -> None:
        """The route is gone: drain into the model, stop reading, close the hub's copy."""
        self.stop_reading(vector)
        fd = self.fds.pop(vector, None)
        if fd is not None:
            self._drain(vector, fd)
            trio.lowlevel.notify_closing(fd.fileno())
            fd.close()

    def is_reading(self, vector: int) -> bool:
        return vector in self._readers

    def start_reading(self, vector: int) -> None:
        """The hub becomes the reader of ``vector`` (it is masked, or no VMM holds it)."""
        fd = self.fds.get(vector)
        if fd is None or vector in self._readers:
            return
        scope = trio.CancelScope()
        self._readers[vector] = scope
        self._nursery.start_soon(self._read, vector, fd, scope)

    def stop_reading(self, vector: int) -> None:
        """Stop reading and drain what is there now, before the caller changes the mask."""
        scope = self._readers.pop(vector, None)
        if scope is None:
            return
        scope.cancel()
        fd = self.fds.get(vector)
        if fd is not None:
            self._drain(vector, fd)

    def drain(self, vector: int) -> None:
        """Deliver what the hub's reader has not read yet (only if the hub is the reader)."""
        if vector in self._readers:
            self._drain(vector, self.fds[vector])

    def drain_all(self) -> None:
        for vector in list(self._readers):
            self._drain(vector, self.fds[vector])

    def _drain(self, vector: int, fd: OwnedFd) -> None:
        count = self._reader.read(fd.fileno())  # never blocks: the fd is a blocking file
        if count:
            self._on_counts(vector, count)

    async def _read(self, vector: int, fd: OwnedFd, scope: trio.CancelScope) -> None:
        """Checks ``scope`` before each wait, not only after: a reader stopped before it first
        ran must not wait on the fd, which its successor (a restart in the same batch of
        tasks) may be waiting on already; trio would raise BusyResourceError in the hub."""
        with scope:
            try:
                while not scope.cancel_called:
                    await trio.lowlevel.wait_readable(fd.fileno())
                    if not scope.cancel_called:
                        self._drain(vector, fd)
            except trio.ClosedResourceError:
                return

    def close_all(self) -> None:
        for vector in list(self.fds):
            self.close(vector)
