"""The trio shell of a virtio-pci device daemon: the pure transport and device model
(``pci.py``, ``blk.py``, ``rng.py``) wired to the hub connection.

* Registers: BAR 4 holds the virtio-pci structures (answered by the transport); BAR 1 the
  MSI-X table and PBA (answered by the hub, never seen here).
* Vectors: ``queue_msix_vector`` / ``config_msix_vector`` writes become ``use``/``unuse``
  in the hub; a refusal reads back ``0xffff``.
* Queues: a kick is served in the task that read it when the queue's task is idle, else it
  wakes that task; either pops requests and runs each one, completing them in the used ring
  as they finish: at once if that cannot block (a read the page cache holds, see
  ``BlkRequest.execute_nowait``), else in a worker thread, up to ``MAX_IN_FLIGHT`` per queue
  so a deep queue keeps the disk busy. Completions made at once interrupt the
  driver once per batch (and always before the task waits), as vhost signals once per
  batch of used buffers.
* Crash recovery: the device-state region the hub keeps records each request taken and
  not completed; a restarted daemon re-runs exactly those, then carries on.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import trio
from msixhub.devices import guestmem
from msixhub.devices.cli_args import power_of_two_up_to
from msixhub.devices.daemon import HubLink, NoVectorError, run_device
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.testdev import msix_bar_layout
from msixhub.devices.virtio.blk import BlkDevice
from msixhub.devices.virtio.constants import MAX_QUEUE_SIZE
from msixhub.devices.virtio.device import VirtioDevice
from msixhub.devices.virtio.inflight import DeviceStateRegion
from msixhub.devices.virtio.pci import (
    BarLayout,
    PciIdentity,
    Request,
    VectorRefused,
    VirtioPciTransport,
)
from msixhub.devices.virtio.rng import RngDevice
from msixhub.protocol.fds import OwnedFd, close_all
from msixhub.protocol.messages import Bar, DeviceInfo, Region, StatusQuery, StatusReport

_QUEUE_SIZE = power_of_two_up_to(MAX_QUEUE_SIZE, "queue size")
log = logging.getLogger("msixhub.virtio")

VIRTIO_BAR = 4
MAX_IN_FLIGHT = 32
BATCH = 16  # inline completions per interrupt at most, and between two yields to the loop
SIGNAL_BYTES = 4 << 20  # and data completed per interrupt at most (a few large requests)


class VirtioDaemon:
    """A ``DeviceModel`` for the hub shell around one virtio device."""

    def __init__(self, device_id: str, kind: str, device: VirtioDevice) -> None:
        self.device = device
        self.layout = BarLayout()
        num_vectors = device.num_queues + 1  # one per queue and one for config changes
        msix, msix_size = msix_bar_layout(num_vectors)
        identity = PciIdentity.of(device)
        self.info = DeviceInfo(
            device=device_id,
            kind=kind,
            num_vectors=num_vectors,
            num_queues=device.num_queues,
            bars=[Bar(1, msix_size), Bar(VIRTIO_BAR, self.layout.size)],
            msix=msix,
            intx=True,
            pci_id=identity.vendor_id << 16 | identity.device_id,
            inflight_size=DeviceStateRegion.size_for(device.num_queues, device.max_queue_size),
        )
        self.hub: HubLink | None = None
        self.memory = GuestMemory()
        self.transport: VirtioPciTransport | None = None
        self._state_fd: OwnedFd | None = None
        self._register_lock = trio.Lock()
        self._queues: list[_QueueWorker] = []
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    # --- DeviceModel -----------------------------------------------------------------------

    def attach_hub(self, hub: HubLink) -> None:
        self.hub = hub
        hub.on_msix_enabled = self._msix_enabled

    def set_memory(self, regions: Sequence[Region], fds: list[OwnedFd]) -> None:
        try:
            memory = GuestMemory.map(
                [guestmem.Region(r.gpa, r.size, r.offset) for r in regions], fds
            )
        finally:
            close_all(fds)  # the mappings keep their own references
        old, self.memory = self.memory, memory
        if self.transport is not None:
            self.transport.set_memory(memory)
        old.close()

    def set_inflight(self, fd: OwnedFd | None, restarted: bool) -> None:
        """Registration finished: build the transport over the state region and resume."""
        assert self.hub is not None and fd is not None
        self._state_fd = fd
        state = DeviceStateRegion.from_fd(fd, self.device.num_queues, self.device.max_queue_size)
        self.transport = VirtioPciTransport(
            self.device,
            self.memory,
            vectors=self,
            interrupts=self,
            runner=self,
            state=state,
            layout=self.layout,
        )
        self.transport.set_msix_enabled(self.hub.msix_enabled)
        nursery = self.hub.nursery
        self._queues = [
            _QueueWorker(self, self.transport, index) for index in range(self.device.num_queues)
        ]
        for worker in self._queues:
            nursery.start_soon(worker.run)
        self.transport.resume()  # re-queues unfinished requests, kicks live queues
        if restarted:
            live = self.transport.live_queues()
            again = sum(self.transport.requeued(queue) for queue in live)
            log.info("resumed: live queues %s, %d requests taken before run again", live, again)
            nursery.start_soon(self._reconcile_vectors)

    async def _reconcile_vectors(self) -> None:
        """A kill inside a vector write or a reset left the hub references that the saved
        registers do not hold (see ``pci.py``): give them back, under the register lock."""
        assert self.hub is not None and self.transport is not None
        async with self._register_lock:
            reply = await self.hub.peer.call(StatusQuery())
            assert isinstance(reply, StatusReport)
            (device,) = (d for d in reply.report["devices"] if d["id"] == self.info.device)
            held = {row["vector"]: row["used"] for row in device["vectors"] if row["used"]}
            registers = dict(self.transport.vector_uses())
            await self.transport.reconcile_vectors(held)
            if held != registers:
                log.warning(
                    "vector references reconciled: hub held %s, registers %s", held, registers
                )

    async def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != VIRTIO_BAR or self.transport is None:
            return 0
        async with self._register_lock:
            return self.transport.read(offset, size)

    async def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != VIRTIO_BAR or self.transport is None:
            return
        async with self._register_lock:
            await self.transport.write(offset, size, value)

    async def kicked(self, queue: int) -> None:
        """A kick, read by the hub link's reader task: the queue is served right there when
        its worker is idle (one task switch less per kick), else the worker is woken."""
        if 0 <= queue < len(self._queues):
            self._queues[queue].serve_kick()

    # --- VectorResources, InterruptSink, QueueRunner (for the transport) -------------------

    async def use(self, vector: int) -> None:
        assert self.hub is not None
        try:
            await self.hub.use(vector)
        except NoVectorError as exc:
            raise VectorRefused(str(exc)) from None

    async def unuse(self, vector: int) -> None:
        assert self.hub is not None
        await self.hub.unuse(vector)

    def notify(self, vector: int) -> None:
        assert self.hub is not None
        self.hub.notify_soon(vector)

    def set_intx(self, asserted: bool) -> None:
        assert self.hub is not None
        self.hub.set_intx_soon(asserted)

    def kick(self, queue: int) -> None:
        if 0 <= queue < len(self._queues):
            self._queues[queue].wake()

    async def quiesce(self) -> None:
        await self._idle.wait()

    def _msix_enabled(self, enabled: bool) -> None:
        if self.transport is not None:
            self.transport.set_msix_enabled(enabled)

    # --- request execution -----------------------------------------------------------------

    def _started(self) -> None:
        self._in_flight += 1
        if self._in_flight == 1:
            self._idle = trio.Event()

    def _finished(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def close(self) -> None:
        """After the queue workers stopped: let go of guest memory (what was taken and not
        completed stays logged in the state region, for the next daemon)."""
        if self.transport is not None:
            self.transport.close()
        if not self.memory.close():
            log.warning("guest memory still pinned by a view at close")
        if self._state_fd is not None:
            self._state_fd.close()


class _QueueWorker:
    """Pops one queue's requests and runs them: inline when that cannot block, else in
    worker threads, up to ``MAX_IN_FLIGHT`` of those at once.

    Inline completions are published on the used ring as they finish and signalled once per
    batch (vhost's ``add_used_n`` then ``signal``): when the ring is found empty, every
    ``BATCH`` requests (where the worker also lets other tasks run) or ``SIGNAL_BYTES`` of
    data (so large requests, tens of microseconds of copying each, are not all held back
    for a whole batch; signalling each one was measured slower at QD16 on a loaded machine,
    where every interrupt costs the VMM a wakeup), and before it waits for a thread slot.
    So a completion waits at most one batch of inline requests (tens of microseconds) for
    its interrupt, and the driver, which harvests everything the used ring holds per
    interrupt, takes one interrupt per batch instead of one per request. A batch
    of half a deep queue lets the two sides overlap: the driver refills what it was given
    while the device works through the rest, instead of each waiting for the other's whole
    turn (measured at QD32 against 8 and 32, noisily: 16 was never worse).

    Stopping: the worker is cancelled with the daemon. A request popped and not completed
    (handed over by a kick, waiting for a slot, or its thread not started) is abandoned:
    its views of guest memory are released and its head stays taken in the in-flight log,
    so the next daemon runs it. A thread already running is waited for and completes.
    """

    def __init__(self, daemon: VirtioDaemon, transport: VirtioPciTransport, index: int) -> None:
        self.daemon = daemon
        self.transport = transport
        self.index = index
        self._wakeup = trio.Event()
        self._idle = False  # True while the worker task waits for a wakeup with nothing held
        self._handed: Request | None = None  # popped by serve_kick, for a worker thread
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._logged_error: str | None = None

    def wake(self) -> None:
        self._idle = False
        self._wakeup.set()

    def serve_kick(self) -> None:
        """Serve a kick synchronously in the caller's task when the worker is idle: one
        inline batch; a request that needs a thread, or a longer stream, is left to the
        worker (woken). Nothing here awaits, so nothing popped can be abandoned by a
        cancelled caller."""
        if not self._idle:
            self.wake()
            return
        needs_thread, full = self._run_inline_batch()
        if needs_thread is not None or full:
            self._handed = needs_thread
            self.wake()
        else:
            self._log_stop()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as requests:
                while True:
                    self._idle = True
                    await self._wakeup.wait()
                    self._idle = False
                    self._wakeup = trio.Event()
                    handed, self._handed = self._handed, None
                    if handed is not None:  # serve_kick tried it inline already
                        await self._start_in_thread(requests, handed)
                    while True:
                        needs_thread, full = self._run_inline_batch()
                        if needs_thread is not None:
                            await self._start_in_thread(requests, needs_thread)
                        elif full:  # a long stream lets other tasks run
                            await trio.lowlevel.checkpoint()
                        else:
                            break
                    self._log_stop()
        finally:
            # Stopped (the daemon is going away): a kick that comes later must not pop a
            # request for a worker that will never take it.
            self._idle = False
            if self._handed is not None:
                self.transport.abandon(self._handed)
                self._handed = None

    def _run_inline_batch(self) -> tuple[Request | None, bool]:
        """Pop and run up to ``BATCH`` requests inline, completing each on the used ring
        and signalling them once at the end (and every ``SIGNAL_BYTES`` of data). Stops at
        the first request that cannot run inline and returns it, popped, for a thread;
        the flag says the batch was full (more requests may be waiting)."""
        transport = self.transport
        index, pop, complete = self.index, transport.pop, transport.complete
        served = unsignalled_bytes = 0
        needs_thread = None
        while served < BATCH:
            request = pop(index)
            if request is None:
                break
            work = request.work
            written = work.execute_nowait() if work.blocking else work.execute()
            if written is None:
                needs_thread = request
                break
            complete(request, written, notify=False)
            served += 1
            unsignalled_bytes += written
            if unsignalled_bytes >= SIGNAL_BYTES:
                unsignalled_bytes = 0
                transport.notify_used(index)  # later ones find nothing new to signal
        if served:
            transport.notify_used(index)
        return needs_thread, served == BATCH

    async def _start_in_thread(self, requests: trio.Nursery, request: Request) -> None:
        """Start ``request`` in a worker thread once one of the ``MAX_IN_FLIGHT`` slots is
        free. A cancel while waiting (the daemon stops) abandons it, logged as taken, so
        the next daemon runs it."""
        try:
            await self._slots.acquire()
        except BaseException:
            self.transport.abandon(request)
            raise
        self.daemon._started()
        requests.start_soon(self._execute_in_thread, request)

    def _log_stop(self) -> None:
        """Say once why the guest made this queue stop (it waits for a reset)."""
        error = self.transport.queue_error(self.index)
        if error is not None and error != self._logged_error:
            log.warning("queue %d stopped: %s (device needs reset)", self.index, error)
        self._logged_error = error

    async def _execute_in_thread(self, request: Request) -> None:
        try:
            written = await trio.to_thread.run_sync(request.execute)
        except BaseException:  # cancelled before the thread started: the daemon stops
            self.transport.abandon(request)
            raise
        else:
            self.transport.complete(request, written)
        finally:
            self._slots.release()
            self.daemon._finished()


# --- msixhub spawn virtio-blk / virtio-rng --------------------------------------------------


def sector_ranges(text: str) -> list[tuple[int, int]]:
    """``START-END[,START-END...]`` (inclusive 512-byte sectors; ``N`` alone is ``N-N``)."""
    ranges = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            start = int(first)
            end = int(last) if dash else start
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not START-END") from None
        if not 0 <= start <= end:
            raise argparse.ArgumentTypeError(f"{part!r}: want 0 <= START <= END")
        ranges.append((start, end))
    return ranges


def configure_blk(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="raw image file")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--queue-size", type=_QUEUE_SIZE, default=256)
    parser.add_argument("--serial", default="msixhub")
    parser.add_argument(
        "--fail-sectors",
        type=sector_ranges,
        default=[],
        metavar="START-END[,...]",
        help="answer requests touching these sectors (inclusive) with IOERR, moving no data: "
        "a guest's error paths, tested without root",
    )


async def serve_blk(args: argparse.Namespace) -> None:
    flags = os.O_RDONLY if args.read_only else os.O_RDWR
    image = OwnedFd(os.open(args.image, flags | os.O_CLOEXEC), "image")
    with image:
        device = BlkDevice(
            image,
            read_only=args.read_only,
            queue_size=args.queue_size,
            serial=args.serial.encode()[:20],
            fail_sectors=args.fail_sectors,
        )
        await _serve(args, "virtio-blk", device)


def configure_rng(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue-size", type=_QUEUE_SIZE, default=64)


async def serve_rng(args: argparse.Namespace) -> None:
    await _serve(args, "virtio-rng", RngDevice(queue_size=args.queue_size))


async def _serve(args: argparse.Namespace, kind: str, device: VirtioDevice) -> None:
    daemon = VirtioDaemon(args.id, kind, device)
    try:
        await run_device(args.socket, daemon)
    finally:
        daemon.close()
