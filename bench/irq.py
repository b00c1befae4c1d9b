"""``msixhub bench irq``: the interrupt path through the real system, beside bare baselines.

A hub and a ``testdev`` daemon run as processes; this process is the VMM (the client
library, as a VMM embeds it). Everything is pinned to one CPU, the baselines' children too,
so every cross-process hop is a context switch on that CPU in ours and in theirs.

* **interrupt round trip**: the VMM kicks queue 0 (an eventfd write), the daemon's kick
  reader wakes and notifies vector 0 (an eventfd write on its call fd), the VMM's reader for
  the vector wakes, reads the count and hands the Interrupt to ``VmmClient.handler``, where a
  VMM injects it into a vCPU; the handler kicks again. Vector 0 is unmasked and routed
  (``static``), so the hub is off the path. Baseline: two trio processes bouncing a count
  through two eventfds (``bench/trio_eventfd.py``). Target ratio: <= 1.1.
  Two more rows split the cost: the same round trip through the client's event queue
  (``next_event``: the reader wakes the consuming task, one more trip through trio's
  scheduler per interrupt), and with the client taken out (this task reads the irq eventfd
  itself: the kick fd, the daemon's shell and the call fd, nothing else).
* **mask+unmask**: the guest masks then unmasks a vector (two table writes: the VMM's half
  of the handoff, a request to the hub, the hub's half, the reply), per pair. Baseline: two
  bare protocol round trips (``ping``) on the same connection.
* **notifications/s**: the daemon notifies one unmasked vector 65535 times per NOTIFY
  register write; notifications are counted as the VMM accounts them (coalesced counts
  included), until all that were sent have arrived. Baseline: a Python loop writing an
  eventfd, nobody reading.

Rounds alternate (baseline, ours, ...) so that drift hits both alike; medians are reported.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from msixhub.bench.baseline import eventfd_pingpong
from msixhub.bench.report import Report, pin_to
from msixhub.bench.trio_eventfd import eventfd_write_rate, trio_pingpong
from msixhub.client.msix_guest import set_vector_mask
from msixhub.client.vmm import Event, Interrupt
from msixhub.protocol.fds import NowaitReader
from msixhub.protocol.messages import Ping
from msixhub.testing.system import MAX_NOTIFY_COUNT, TestdevSystem, running_system

ROUNDS = 5
MIN_ROUND = 0.2  # seconds
WARMUP = 500
BATCH = 50
KICKED, MASKED, STORM = 0, 1, 2  # the vectors each measurement uses
SETTLE_TIMEOUT = 30.0

Measurement = Callable[[], Awaitable[float]]  # one round: seconds per operation, or a rate


def measure(seconds: float) -> Report:
    original = os.sched_getaffinity(0)
    try:
        cpu = pin_to(0)
        report = Report(
            "irq",
            f"all on {cpu}: hub, testdev daemon, this process (VMM), baseline children",
        )
        trio.run(_measure, max(seconds / ROUNDS, MIN_ROUND), report)
        blocking = eventfd_pingpong(max(seconds / ROUNDS, MIN_ROUND), same_cpu=True)
        report.notes.append(
            f"for reference, a blocking (no event loop) eventfd ping-pong: "
            f"{blocking.round_trip_seconds * 1e6:.1f} us ({blocking.pinning})"
        )
        report.notes.append("command: msixhub bench irq [--seconds S] [--json]")
        return report
    finally:
        os.sched_setaffinity(0, original)


async def _measure(round_seconds: float, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="msixhub-bench-irq-") as directory:
        async with running_system(Path(directory), vectors=4, queues=1) as system:
            await system.testdev.setup([KICKED, MASKED, STORM])
            # As the daemons do once registered: the heap so far is permanent, so the
            # collector's full passes skip it (for ours and the baseline, which runs here too).
            gc.collect()
            gc.freeze()

            async def bare_irq() -> float:
                return await trio_pingpong(round_seconds)

            async def mask_pair() -> float:
                return await _per_iteration(round_seconds, lambda: _mask_unmask(system))

            async def ping_pair() -> float:
                return await _per_iteration(round_seconds, lambda: _two_pings(system))

            async def storm() -> float:
                return await _notification_rate(system, round_seconds)

            async def write_loop() -> float:
                return eventfd_write_rate(round_seconds)

            rows: list[tuple[str, str, Measurement, Measurement, bool]] = [
                (
                    "interrupt round trip, handled in the VMM's irq reader",
                    "us",
                    lambda: _inline_irq_round_trip(system, round_seconds),
                    bare_irq,
                    False,
                ),
                (
                    "  same, through the client's event queue",
                    "us",
                    lambda: _irq_round_trip(system, round_seconds),
                    bare_irq,
                    False,
                ),
                (
                    "  same, this task reading the irq eventfd",
                    "us",
                    lambda: _raw_irq_round_trip(system, round_seconds),
                    bare_irq,
                    False,
                ),
                ("mask+unmask pair", "us", mask_pair, ping_pair, False),
                ("notifications (coalesced)", "per s", storm, write_loop, True),
            ]
            for metric, unit, ours_round, bare_round, higher_is_better in rows:
                ours, bare = await _alternate(ours_round, bare_round)
                scale = 1.0 if higher_is_better else 1e6
                report.add(
                    metric, unit, ours * scale, bare * scale, higher_is_better=higher_is_better
                )
            report.notes.append(
                "interrupt baselines: two trio processes bouncing a count through two eventfds; "
                "mask+unmask baseline: two ping round trips on the VMM's connection; "
                "notifications baseline: a bare eventfd write loop (no reader)"
            )


async def _alternate(ours: Measurement, bare: Measurement) -> tuple[float, float]:
    """Medians of ROUNDS alternating rounds, baseline first."""
    ours_rounds, bare_rounds = [], []
    for _ in range(ROUNDS):
        bare_rounds.append(await bare())
        ours_rounds.append(await ours())
    return statistics.median(ours_rounds), statistics.median(bare_rounds)


async def _irq_round_trip(system: TestdevSystem, seconds: float) -> float:
    device, vm = system.device, system.vm

    async def once() -> None:
        device.kick(0)  # queue 0 echoes on vector 0 (KICKED)
        event = await vm.next_event()
        assert isinstance(event, Interrupt) and event.vector == KICKED and event.count == 1

    for _ in range(WARMUP):
        await once()
    return await _per_iteration(seconds, once)


async def _inline_irq_round_trip(system: TestdevSystem, seconds: float) -> float:
    """The round trip as a VMM runs it: the interrupt is handled where its eventfd is read
    (``VmmClient.handler``, the way a VMM injects it into a vCPU), and the handler kicks again."""
    device, vm = system.device, system.vm
    done = trio.Event()
    rounds = 0
    deadline = 0.0

    def handle(event: Event) -> bool:
        nonlocal rounds
        if not (isinstance(event, Interrupt) and event.vector == KICKED):
            return False
        rounds += 1
        if rounds % BATCH or time.perf_counter() < deadline:  # the clock once a batch
            device.kick(0)
        else:
            done.set()
        return True

    vm.handler = handle
    try:
        deadline = time.perf_counter() + min(seconds / 4, 0.2)  # warm-up
        device.kick(0)
        await done.wait()
        done, rounds = trio.Event(), 0
        started = time.perf_counter()
        deadline = started + seconds
        device.kick(0)
        await done.wait()
        return (time.perf_counter() - started) / rounds
    finally:
        vm.handler = None


async def _raw_irq_round_trip(system: TestdevSystem, seconds: float) -> float:
    """The same round trip with the client's event queue taken out: its reader for the
    vector is stopped and this task reads the eventfd itself. What is left is the data
    path proper (kick fd, the daemon's shell, call fd), to tell it from the client's hop
    from reader task to event queue to waiting task."""
    device = system.device
    fd = device.irq_fds[KICKED].fileno()
    read = NowaitReader().read

    async def once() -> None:
        device.kick(0)
        while True:  # the client's way: wait, then a read that cannot block
            await trio.lowlevel.wait_readable(fd)
            if count := read(fd):
                break
        assert count == 1

    device._stop_reading(KICKED)  # the client's own reader must not race us for the counts
    try:
        for _ in range(WARMUP):
            await once()
        return await _per_iteration(seconds, once)
    finally:
        device._start_reading(KICKED)


async def _mask_unmask(system: TestdevSystem) -> None:
    await set_vector_mask(system.device, MASKED, True)
    await set_vector_mask(system.device, MASKED, False)


async def _two_pings(system: TestdevSystem) -> None:
    await system.vm.peer.call(Ping())
    await system.vm.peer.call(Ping())


async def _per_iteration(seconds: float, once: Callable[[], Awaitable[None]]) -> float:
    """Seconds per call of ``once``, called for about ``seconds`` (in batches)."""
    iterations = 0
    start = time.perf_counter()
    deadline = start + seconds
    while (now := time.perf_counter()) < deadline or not iterations:
        for _ in range(BATCH):
            await once()
        iterations += BATCH
    return (now - start) / iterations


async def _notification_rate(system: TestdevSystem, seconds: float) -> float:
    """Notifications per second from the daemon's NOTIFY loop to the VMM's accounting (the
    client counts them as it reads its eventfds; a consumer keeps its event queue moving)."""
    vm, counted = system.vm, system.device.notifications
    first = counted[STORM]
    progress = trio.lowlevel.ParkingLot()

    async def consume() -> None:
        while True:
            event = await vm.next_event()
            assert isinstance(event, Interrupt) and event.vector == STORM
            progress.unpark_all()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        sent = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline or not sent:
            await system.testdev.notify(STORM, MAX_NOTIFY_COUNT)
            sent += MAX_NOTIFY_COUNT
        with trio.fail_after(SETTLE_TIMEOUT):
            while counted[STORM] - first < sent:
                await progress.park()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    if counted[STORM] - first != sent:
        raise RuntimeError(f"sent {sent} notifications, the VMM accounted {counted[STORM] - first}")
    return sent / elapsed
