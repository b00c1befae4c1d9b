"""``msixhub chaos [--seconds N] [--seed S] [--json]``: the demo's workloads under random
faults, then a check of every invariant the hub promises.

A hub is started from a config that spawns, supervised, virtio-blk ``blk0`` on a temporary
image, virtio-rng ``rng0``, and two ivshmem peers ``shm-a`` and ``shm-b`` of one domain. This
process is the VMM: it attaches blk0, shm-a and shm-b, and runs for ``--seconds`` (a warm-up
of a tenth, at most 30 s, then faults):

* virtio-blk: 8 workers, each owning 2 MiB of the disk, write and read random 4 KiB-aligned
  extents (up to 128 KiB) against a reference model; every read is verified at once and the
  image file is compared with the model at the end. Each request is counted when it
  completes; the guest's ring checks refuse a completion returned twice.
* ivshmem: shm-a rings shm-b's vectors (a Doorbell write, which this VMM turns into one write
  of its own ioeventfd: the hub is off the path), counted per vector as they are written.
* a second VMM attaches rng0 through a fault proxy that corrupts, drops, duplicates, delays,
  reorders and truncates frames; each time its connection breaks it comes back.

Faults come from one ``random.Random`` seeded from ``--seed``: SIGKILL number k is due k times
2-3 s after the warm-up (blk0 first, then a daemon drawn at random, blk0 twice as likely as
each other; the supervisor restarts it), and in between SIGSTOP/SIGCONT of a daemon for up to
0.8 s (less than the hub's 2 s patience with a peer, so a stopped daemon is slow, not
dropped) and mask storms (shm-b's vector masks and function mask, blk0's queue vector). A
SIGKILL of shm-b masks some of its vectors first, lets rings make them pending, and checks
after the restart that every pending bit, mask and table entry is still there. The workloads
draw from seeds derived from the same one, so a seed replays the same schedule and the same
data (the interleaving with the other processes still varies); a failing run prints its seed
and the command that reruns it.

Notification accounting, per shm-b vector. Every ring is one count in the vector's eventfd;
the VMM reads it while the vector is unmasked (``received``: the sum of ``Interrupt.count``),
the hub while it is masked, turning each count into ``notify``: it sets the pending bit, or is
merged into one already set (``coalesced``), or, once the hub has let go and the vector is
unmasked, is delivered. Each delivery (of a pending bit on unmask, or of a count read just
before the hub let go) is one count the hub writes back into the eventfd, so it is received
once and cancels out of the sum, whatever the interleaving. Hence, exactly::

    sent == received + coalesced + pending + cleared + dropped + intx

(``cleared``: withdrawn pending bits; ``dropped``: the vector unused; ``intx``: MSI-X off; all
three stay 0 here). After the final unmask nothing is pending; ``lost = sent - right side``
must be 0 (a negative one would be a duplicate).

Hub health. The hub's pid is the same from start to end and it never exited; it logged no
error. Its fds and VmRSS are sampled at two quiet points, after the warm-up and at the end:
the churn VMM gone, a fresh VMM has just attached rng0, read from it and left (so rng0 holds
the same vectors), every daemon up, and the hub's fds unchanged over three polls. The rule:
the fd count must not grow at all, whatever the run's length (the quiet points hold the same
connections, channels and memory, so any growth is a leak, and a leak per fault shows after
a few seconds); VmRSS must stay within 5% for runs of at least 5 minutes, and is only
reported for shorter ones (the allocator is still warming up then, and a leak per fault is
too small to see in 5%).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

import trio
from msixhub.client.demo import (
    CheckList,
    DeviceEntry,
    spawning_hub_config,
    wait_until_registered,
)
from msixhub.client.guest import Guest
from msixhub.client.msix_guest import FUNCTION_MASK, MSIX_ENABLE, set_vector_mask
from msixhub.client.virtio_driver import BlkDriver
from msixhub.client.vmm import Interrupt, VmmClient, connect
from msixhub.devices.cli_args import float_in
from msixhub.devices.ivshmem.regs import Doorbell, Register
from msixhub.devices.virtio.blk import BlkStatus, BlkType
from msixhub.protocol.errors import MsixhubError
from msixhub.testing.faults import STOPPED_STATES, FaultError, fd_targets, wait_for_state
from msixhub.testing.ivshmem import IvshmemGuest
from msixhub.testing.processes import ManagedProcess, msixhub_command, open_fds
from msixhub.testing.proxy import (
    Corrupt,
    Delay,
    Drop,
    Duplicate,
    FaultProxy,
    FaultRule,
    Reorder,
    Truncate,
    fault_proxy,
)
from msixhub.testing.seeds import derive_seed
from msixhub.testing.system import HubStatus, hub_status, message_of

DEFAULT_SECONDS = 30.0
MAX_SECONDS = 24 * 3600.0

IMAGE_SIZE = 16 << 20
SECTOR = 512
BLOCK = 4096
BLK_WORKERS = 8
REGION = IMAGE_SIZE // BLK_WORKERS  # each worker's own part of the disk
MAX_BLOCKS = 32  # 128 KiB: the driver's largest transfer
WRITE_SHARE = 0.6

SHM_NAME = "chaos"
SHM_VECTORS = 4
DAEMONS = ("blk0", "rng0", "shm-a", "shm-b")
KILL_WEIGHTS = {"blk0": 2, "rng0": 1, "shm-a": 1, "shm-b": 1}
VMM_NAME = "chaos-vm"
CHURN_NAME = "chaos-churn"

KILL_GAP = (2.0, 3.0)  # seconds between two SIGKILLs: at least one per 3 s
OTHER_GAP = (0.2, 1.0)  # seconds between other faults
STOP_FOR = (0.05, 0.8)  # under the hub's TELL_TIMEOUT (2 s)
STORM_WRITES = (5, 40)
CHURN_CYCLE = 8.0  # a churn VMM connection lives at most this long
PROXY_RULES = (  # harmful to about 1 frame in 100: most connections get through setup
    FaultRule(Corrupt(), probability=0.003),
    FaultRule(Drop(), probability=0.0015),
    FaultRule(Duplicate(), probability=0.003),
    FaultRule(Delay(0.05), probability=0.02),
    FaultRule(Reorder(hold=0.1), probability=0.002),
    FaultRule(Truncate(), probability=0.0007),
)

SETUP_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0  # restarts (supervisor backoff up to 5 s), in-flight requests, quiet points
POLL = 0.01  # status is polled (one round trip each) with this pause between polls
LONG_RUN = 300.0  # runs this long hold memory flatness as an invariant
FLAT_PERCENT = 5.0
PROGRESS_EVERY = 30.0


class ChaosError(RuntimeError):
    """The campaign could not go on (a setup step or a wait that never completed)."""


# --- pure parts ------------------------------------------------------------------------------


class Fault(Enum):
    KILL = "kill"
    STOP = "stop"
    MASK_STORM = "mask storm"


class FaultSchedule:
    """When the next fault is due, and which. SIGKILL number k is due ``k`` gaps of
    ``kill_gap`` (drawn uniformly) after the start, whatever else happens: a fault that overran
    delays it, and the kills after it catch up, so the rate holds. Other faults fill the gaps.
    Pure: the caller passes the clock."""

    def __init__(
        self,
        rng: random.Random,
        start: float,
        *,
        kill_gap: tuple[float, float] = KILL_GAP,
        other_gap: tuple[float, float] = OTHER_GAP,
    ) -> None:
        if not 0 < kill_gap[0] <= kill_gap[1] or not 0 < other_gap[0] <= other_gap[1]:
            raise ValueError(f"bad fault gaps {kill_gap}, {other_gap}")
        self.rng = rng
        self.kill_gap = kill_gap
        self.other_gap = other_gap
        self.next_kill = start + rng.uniform(*kill_gap)

    def next(self, now: float) -> tuple[float, Fault]:
        """(time, fault) of the next fault after ``now``."""
        other = now + self.rng.uniform(*self.other_gap)
        if other < self.next_kill:
            return other, self.rng.choice((Fault.STOP, Fault.MASK_STORM))
        at = max(now, self.next_kill)
        self.next_kill += self.rng.uniform(*self.kill_gap)
        return at, Fault.KILL


@dataclass(frozen=True, slots=True)
class VectorBalance:
    """Where one vector's notifications went (see the module docstring)."""

    vector: int
    sent: int
    received: int
    coalesced: int
    pending: int
    cleared: int
    dropped: int
    intx: int

    @property
    def accounted(self) -> int:
        return (
            self.received + self.coalesced + self.pending + self.cleared + self.dropped + self.intx
        )

    @property
    def lost(self) -> int:
        """Notifications nobody can account for; negative: some were delivered twice."""
        return self.sent - self.accounted


def vector_balance(vector: int, sent: int, received: int, row: Mapping[str, Any]) -> VectorBalance:
    """``row``: the hub's status row of the vector (``VectorStats`` fields; absent: zeros)."""
    return VectorBalance(
        vector,
        sent,
        received,
        coalesced=int(row.get("coalesced", 0)),
        pending=int(bool(row.get("pending", False))),
        cleared=int(row.get("cleared", 0)),
        dropped=int(row.get("dropped", 0)),
        intx=int(row.get("intx", 0)),
    )


def warmup_seconds(seconds: float) -> float:
    """How long the workloads run before the first hub sample and the first fault."""
    return min(30.0, max(1.0, seconds / 10))


def percent_change(start: int, end: int) -> float:
    return round(100.0 * (end - start) / start, 2) if start else 0.0


# --- the report ------------------------------------------------------------------------------


@dataclass(slots=True)
class ChaosReport(CheckList):
    seed: int
    seconds: float
    out: TextIO
    figures: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def command(self) -> str:
        return f"msixhub chaos --seconds {self.seconds:g} --seed {self.seed}"

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "seed": self.seed,
            "seconds": self.seconds,
            "elapsed": self.elapsed,
            "command": self.command,
            **self.figures,
            "checks": [asdict(c) for c in self.checks],
        }


class Tally:
    """How often something went wrong, with the first few instances (a run that goes badly
    wrong must not fill memory with them)."""

    KEEP = 5

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.examples) < self.KEEP:
            self.examples.append(text)

    def __len__(self) -> int:
        return self.count

    def detail(self) -> str:
        return "".join(f"; {example}" for example in self.examples[:3])


@dataclass(frozen=True, slots=True)
class HubSample:
    at: float  # seconds since the hub started
    fds: int
    rss_kib: int
    fd_kinds: Counter[str]  # what the fds are (socket, eventfd, memfd:NAME, ...)

    def __str__(self) -> str:
        return f"{self.fds} fds, VmRSS {self.rss_kib} kB at {self.at:.1f}s"


def fd_kinds(pid: int) -> Counter[str]:
    """Kinds of ``pid``'s open fds: ``socket:[123]`` counts as ``socket``, and so on."""
    return Counter(
        re.sub(r":\[\d+\]$| \(deleted\)$", "", target) for target in fd_targets(pid).values()
    )


# --- processes -------------------------------------------------------------------------------


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ChaosError(f"no VmRSS in /proc/{pid}/status")


def _live_child(pid: int, parent: int) -> bool:
    """``pid`` is a running (not zombie) child of ``parent``: safe to signal."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return state != "Z" and int(ppid) == parent


def hub_config(socket_path: Path, image: Path) -> str:
    shm = ["--name", SHM_NAME, "--size", "1M", "--vectors", str(SHM_VECTORS)]
    devices: tuple[DeviceEntry, ...] = (
        ("virtio-blk", "blk0", ["--image", str(image)]),
        ("virtio-rng", "rng0", []),
        ("ivshmem", "shm-a", shm),
        ("ivshmem", "shm-b", shm),
    )
    return spawning_hub_config(socket_path, devices)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _where(exc: BaseException) -> str:
    """``Type: message at file:line`` of the innermost frame (for an unexpected error)."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{place}"


# --- the system under test ------------------------------------------------------------------


async def poll_until(
    what: str, ready: Callable[[], Awaitable[bool]], timeout: float = SETTLE_TIMEOUT
) -> None:
    """Poll ``ready`` (an async predicate: each call is a status round trip) with a cap."""
    with trio.move_on_after(timeout):
        while not await ready():
            await trio.sleep(POLL)
        return
    raise ChaosError(f"{what}: not reached in {timeout:g} s")


async def ivshmem_peers(status: HubStatus) -> dict[str, int]:
    """Peer id of each hub device in the campaign's ivshmem domain."""
    (domain,) = (await status.report())["ivshmem"]
    return {p["device"]: p["peer_id"] for p in domain["peers"] if p["device"]}


@dataclass(frozen=True, slots=True)
class Attached:
    """What this VMM drives: blk0 (driver and queue vector) and both ivshmem peers."""

    blk: BlkDriver
    blk_vector: int
    a: IvshmemGuest
    b: IvshmemGuest
    peer_ids: dict[str, int]


async def attach_devices(vm: VmmClient, guest: Guest, status: HubStatus) -> Attached:
    """Attach and set up blk0, shm-a and shm-b as a guest would; shm-a's doorbells that ring
    shm-b must be this VMM's own ioeventfds before the rings start."""
    blk = await guest.blk("blk0")
    a = IvshmemGuest(await vm.attach("shm-a"))
    b = IvshmemGuest(await vm.attach("shm-b"))
    await a.setup()
    await b.setup()
    peer_ids = await ivshmem_peers(status)
    doorbells = {
        (0, Register.DOORBELL, 4, Doorbell(peer_ids["shm-b"], v).encode())
        for v in range(SHM_VECTORS)
    }

    async def doorbells_in_place() -> bool:
        return doorbells <= a.device.ioeventfds.keys()

    await poll_until("shm-a's ioeventfds for shm-b's doorbells", doorbells_in_place)
    return Attached(blk, guest.drivers["blk0"].plan.queues[0], a, b, peer_ids)


class HubLog:
    """The hub's log (its daemons log there too), kept whole in a file for the run: the
    process keeps only its last lines, and a failure needs its traceback."""

    def __init__(self, hub: ManagedProcess, path: Path) -> None:
        self.hub = hub
        self.path = path
        self.file = open(path, "w")  # noqa: SIM115 - open for the whole run, closed by close()
        self.seen = 0

    def new_lines(self) -> list[str]:
        """Lines logged since the last call (written to the file)."""
        lines = list(self.hub.lines)
        first = self.hub.line_count - len(lines)
        new = lines[max(0, self.seen - first) :]
        self.seen = first + len(lines)
        self.file.writelines(f"{line}\n" for line in new)
        self.file.flush()
        return new

    def close(self) -> None:
        self.file.close()


# --- the campaign ----------------------------------------------------------------------------

_DAEMON_LINE = re.compile(r"^\S+ \S+ \S+\[\d+\] ")
_ERROR_LINE = re.compile(r" (ERROR|CRITICAL) ")


class Campaign:
    """One run: the workloads, the faults, what each counted, and the judgement.

    Everything runs in this process's trio loop; the counters are plain attributes because
    only its tasks touch them. The hub is observed only from outside (status queries, its
    log, /proc), as a user would."""

    def __init__(
        self,
        report: ChaosReport,
        hub: ManagedProcess,
        status: HubStatus,
        vm: VmmClient,
        guest: Guest,
        attached: Attached,
        proxy: FaultProxy,
        image: Path,
        log: HubLog,
        hub_started: float,
    ) -> None:
        self.report = report
        self.hub = hub
        self.log = log
        self.hub_started = hub_started
        self.status = status
        self.vm = vm
        self.guest = guest
        self.proxy = proxy
        self.image = image
        self.seed = report.seed
        self.rng = random.Random(derive_seed(self.seed, "faults"))
        self.deadline = math.inf  # set once the start sample is taken
        self.started = 0.0
        self.daemon_pids: set[int] = set()
        # virtio-blk
        self.blk = attached.blk
        self.blk_vector = attached.blk_vector
        self.models = [bytearray(REGION) for _ in range(BLK_WORKERS)]
        self.request_ids = itertools.count()
        self.submitted = 0
        self.completed = 0
        self.outstanding: set[int] = set()  # submitted, not completed (lost if left at the end)
        self.in_flight_at_kills = 0
        self.failed = Tally()
        self.mismatches = Tally()
        self.reads_verified = 0
        self.bytes_written = 0
        # ivshmem
        self.a, self.b = attached.a, attached.b
        self.peer_ids = attached.peer_ids
        self.rings = [0] * SHM_VECTORS
        self.received = [0] * SHM_VECTORS  # sum of Interrupt.count, per shm-b vector
        self.stray_interrupts = Tally()
        self.b_masked = [False] * SHM_VECTORS  # the guest's view of shm-b's mask bits
        self.b_function_masked = False
        self.mask_lock = trio.Lock()
        self.carried = 0  # pending bits seen across shm-b restarts
        self.b_restart_errors = Tally()
        # faults
        self.kills: Counter[str] = Counter()
        self.killed_pids: set[int] = set()
        self.stops: Counter[str] = Counter()
        self.storms = 0
        self.mask_writes = 0
        # the churn VMM
        self.churn_lock = trio.Lock()
        self.churn_cycle = trio.CancelScope()  # the churn VMM's current connection
        self.churn: Counter[str] = Counter()
        self.churn_reads = 0
        self.churn_surprises = Tally()  # churn VMM errors that were not msixhub errors
        self.fresh_reads: list[bytes] = []  # what a fresh VMM read from rng0 at quiet points
        # the hub
        self.samples: dict[str, HubSample] = {}
        self.fd_peak = 0
        self.hub_errors = Tally()
        self.daemon_errors = Tally()
        self.tracebacks = 0

    def now(self) -> float:
        return trio.current_time() - self.started

    def say(self, text: str) -> None:
        self.report.say(f"{self.now():8.2f}s {text}")

    # --- status ------------------------------------------------------------------------------

    async def devices(self) -> dict[str, dict[str, Any]]:
        report = await self.status.report()
        devices = {d["id"]: d for d in report["devices"]}
        self.daemon_pids.update(d["pid"] for d in devices.values() if d["pid"])
        return devices

    async def vector_rows(self, device_id: str) -> dict[int, dict[str, Any]]:
        device = (await self.devices())[device_id]
        return {row["vector"]: row for row in device["vectors"]}

    def killable(self, devices: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Daemons that are up, running, children of the hub, and not killed already (the hub
        may not have noticed a kill yet: its status still says up, with the old pid)."""
        hub_pid = self.hub.pid
        return [
            d
            for d in DAEMONS
            if devices[d]["up"]
            and devices[d]["pid"] not in self.killed_pids
            and _live_child(devices[d]["pid"], hub_pid)
        ]

    async def wait_registered(self, device_id: str, registrations: int) -> None:
        async def registered() -> bool:
            device = (await self.devices())[device_id]
            return bool(device["up"]) and device["registrations"] >= registrations

        await poll_until(f"{device_id} registered {registrations} times", registered)

    # --- workloads ---------------------------------------------------------------------------

    async def blk_worker(self, index: int) -> None:
        """Random writes and reads in this worker's own region, against its model."""
        rng = random.Random(derive_seed(self.seed, f"blk{index}"))
        model = self.models[index]
        base = index * REGION
        while trio.current_time() < self.deadline:
            blocks = rng.randint(1, MAX_BLOCKS)
            offset = rng.randrange(REGION // BLOCK - blocks + 1) * BLOCK
            length = blocks * BLOCK
            sector = (base + offset) // SECTOR
            request = next(self.request_ids)
            write = rng.random() < WRITE_SHARE
            data = rng.randbytes(length) if write else b""
            self.submitted += 1
            self.outstanding.add(request)
            if write:
                status, _, _ = await self.blk.request(BlkType.OUT, sector, out=data)
            else:
                status, data, _ = await self.blk.request(BlkType.IN, sector, in_len=length)
            self.outstanding.remove(request)
            self.completed += 1
            what = f"{'write' if write else 'read'} of {length} bytes at sector {sector}"
            if status != BlkStatus.OK:
                self.failed.add(f"{what}: status {status}")
            elif write:
                model[offset : offset + length] = data
                self.bytes_written += length
            elif data != model[offset : offset + length]:
                self.mismatches.add(f"{what} differs from what was written")
            else:
                self.reads_verified += 1

    async def ring(self) -> None:
        """shm-a rings shm-b's vectors in bursts; each ring is counted as it is written."""
        rng = random.Random(derive_seed(self.seed, "rings"))
        ring, peer = self.a.ring, self.peer_ids["shm-b"]
        while trio.current_time() < self.deadline:
            for _ in range(rng.randint(1, 16)):
                vector = rng.randrange(SHM_VECTORS)
                await ring(peer, vector)
                self.rings[vector] += 1
            await trio.sleep(rng.uniform(0, 0.002))

    async def count_interrupts(self) -> None:
        """The events the guest's drivers did not take: shm-b's interrupts, counted with the
        notifications each carries (any other interrupt is a stray)."""
        async for event in self.vm.events():
            if not isinstance(event, Interrupt):
                continue
            if event.device == "shm-b" and (event.address, event.data) == message_of(event.vector):
                self.received[event.vector] += event.count
            else:
                self.stray_interrupts.add(str(event))

    async def churn_vmm(self) -> None:
        """A second VMM on rng0 through the fault proxy, reconnecting whenever it breaks."""
        rng = random.Random(derive_seed(self.seed, "churn"))
        while trio.current_time() < self.deadline:
            async with self.churn_lock:
                outcome = "clean"
                try:
                    deadline = min(trio.current_time() + CHURN_CYCLE, self.deadline)
                    with trio.move_on_at(deadline) as self.churn_cycle:
                        async with (
                            connect(self.proxy.path, name=CHURN_NAME, request_timeout=2.0) as vm,
                            Guest.open(vm, ram=1 << 20) as guest,
                        ):
                            entropy = await guest.rng("rng0")
                            for _ in range(rng.randint(2, 20)):
                                await entropy.read(rng.randint(1, 256))
                                self.churn_reads += 1
                    if self.churn_cycle.cancelled_caught:
                        outcome = "cut short"  # stalled, or a quiet point was wanted
                except* Exception as group:
                    error = _leaf(group)
                    outcome = type(error).__name__
                    if not isinstance(error, MsixhubError | trio.TooSlowError):
                        self.churn_surprises.add(_where(error))  # not a clean error: a client bug
                self.churn[outcome] += 1
            await trio.sleep(rng.uniform(0.02, 0.2))

    async def watch_hub(self) -> None:
        """Scan the hub's log (its daemons log there too) and track the hub's fd peak."""
        next_progress = PROGRESS_EVERY
        while True:
            self.scan_log()
            self.fd_peak = max(self.fd_peak, open_fds(self.hub.pid))
            if self.report.seconds >= 2 * PROGRESS_EVERY and self.now() >= next_progress:
                next_progress += PROGRESS_EVERY
                self.say(
                    f"progress: {sum(self.kills.values())} kills, {sum(self.rings)} rings, "
                    f"{self.completed} requests, hub fds {open_fds(self.hub.pid)}, "
                    f"VmRSS {vm_rss_kib(self.hub.pid)} kB"
                )
            await trio.sleep(0.25)

    def scan_log(self) -> None:
        for line in self.log.new_lines():
            if "Traceback (most recent call last)" in line:
                self.tracebacks += 1
            elif _ERROR_LINE.search(line):
                errors = self.daemon_errors if _DAEMON_LINE.match(line) else self.hub_errors
                errors.add(line)

    # --- faults ------------------------------------------------------------------------------

    async def inject_faults(self) -> None:
        schedule = FaultSchedule(self.rng, trio.current_time())
        while True:
            at, fault = schedule.next(trio.current_time())
            if at >= self.deadline:
                return
            await trio.sleep_until(at)
            if fault is Fault.KILL:
                await self.kill()
            elif fault is Fault.STOP:
                await self.stop()
            else:
                await self.mask_storm()

    async def kill(self) -> None:
        """SIGKILL a daemon: blk0 first (it always has requests in flight), then one drawn at
        random, blk0 twice as likely as each of the others; shm-b with its pending bits checked."""
        first = not self.kills
        devices: dict[str, dict[str, Any]] = {}

        async def killable() -> bool:
            nonlocal devices
            devices = await self.devices()
            victims = self.killable(devices)
            return "blk0" in victims if first else bool(victims)

        # Every daemon may be restarting at once: kill the first one back.
        await poll_until("a daemon to kill", killable)
        victims = self.killable(devices)
        weights = [KILL_WEIGHTS[victim] for victim in victims]
        victim = "blk0" if first else self.rng.choices(victims, weights)[0]
        if victim == "shm-b":
            await self.kill_peer_with_pending(devices[victim])
        else:
            self.sigkill(victim, devices[victim]["pid"])

    def sigkill(self, device_id: str, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.killed_pids.add(pid)
        self.kills[device_id] += 1
        extra = f", {len(self.outstanding)} requests in flight" if device_id == "blk0" else ""
        if device_id == "blk0":
            self.in_flight_at_kills += len(self.outstanding)
        self.say(f"SIGKILL {device_id} (pid {pid}){extra}")

    async def kill_peer_with_pending(self, device: Mapping[str, Any]) -> None:
        """SIGKILL shm-b with some vectors masked and pending; after its restart the hub must
        still hold every pending bit and mask, its peer id and its table."""
        async with self.mask_lock:
            for vector in self.rng.sample(range(SHM_VECTORS), self.rng.randint(1, SHM_VECTORS)):
                if not self.b_masked[vector]:
                    await set_vector_mask(self.b.device, vector, True)
                    self.b_masked[vector] = True
                    self.mask_writes += 1

            async def something_pending() -> bool:
                rows = await self.vector_rows("shm-b")
                return any(row["pending"] for row in rows.values())

            with contextlib.suppress(ChaosError):  # rings are random: usually at once
                await poll_until("a pending bit", something_pending, timeout=2.0)
            before = await self.vector_rows("shm-b")
            registrations = (await self.devices())["shm-b"]["registrations"]
            self.sigkill("shm-b", device["pid"])
            await self.wait_registered("shm-b", registrations + 1)
            after = await self.vector_rows("shm-b")
            peers = await ivshmem_peers(self.status)
        pending = {v for v, row in before.items() if row["pending"]}
        kept = {v for v, row in after.items() if row["pending"]}
        masks = {v: row["masked"] for v, row in before.items()}
        self.carried += len(pending)
        problems = []
        if not pending <= kept:
            problems.append(f"pending bits {sorted(pending - kept)} lost")
        if {v: row["masked"] for v, row in after.items()} != masks:
            problems.append(f"masks changed from {masks}")
        if peers != self.peer_ids:
            problems.append(f"peer ids {self.peer_ids} became {peers}")
        for vector, row in after.items():
            if (row["address"], row["data"]) != message_of(vector):
                problems.append(
                    f"vector {vector}'s message became {row['address']:#x}/{row['data']:#x}"
                )
        if problems:
            self.b_restart_errors.add(f"{self.now():.2f}s: " + "; ".join(problems))
        self.say(
            f"shm-b back: {len(pending)} pending bits kept" + "".join(f"; {p}" for p in problems)
        )

    async def stop(self) -> None:
        devices = await self.devices()
        victims = self.killable(devices)
        if not victims:
            return
        victim = self.rng.choice(victims)
        pid = devices[victim]["pid"]
        seconds = self.rng.uniform(*STOP_FOR)
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for_state(pid, STOPPED_STATES.__contains__)
            self.stops[victim] += 1
            self.say(f"SIGSTOP {victim} (pid {pid}) for {seconds:.2f}s")
            await trio.sleep(seconds)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            with trio.CancelScope(shield=True), contextlib.suppress(FaultError):
                await wait_for_state(pid, lambda state: state not in STOPPED_STATES)

    async def mask_storm(self) -> None:
        """Mask/unmask writes in a burst: shm-b's vectors (left as the storm leaves them), its
        function mask, and blk0's queue vector (left unmasked: the I/O goes on)."""
        blk = self.vm.devices["blk0"]
        blk_masked = False
        writes = self.rng.randint(*STORM_WRITES)
        async with self.mask_lock:
            for _ in range(writes):
                roll = self.rng.random()
                if roll < 0.1:
                    self.b_function_masked = not self.b_function_masked
                    control = MSIX_ENABLE | (FUNCTION_MASK if self.b_function_masked else 0)
                    await self.b.device.msix_control_write(control)
                elif roll < 0.2:
                    blk_masked = not blk_masked
                    await set_vector_mask(blk, self.blk_vector, blk_masked)
                else:
                    vector = self.rng.randrange(SHM_VECTORS)
                    self.b_masked[vector] = not self.b_masked[vector]
                    await set_vector_mask(self.b.device, vector, self.b_masked[vector])
                self.mask_writes += 1
                if self.rng.random() < 0.5:
                    await trio.sleep(self.rng.uniform(0, 0.003))
            if blk_masked:
                await set_vector_mask(blk, self.blk_vector, False)
                self.mask_writes += 1
        self.storms += 1

    # --- the run -----------------------------------------------------------------------------

    async def run(self, seconds: float) -> None:
        """Warm up, take the hub's start sample, inject faults for the rest of ``seconds``
        (counted from the sample), let the workloads finish, then judge."""
        self.started = trio.current_time()
        self.deadline = math.inf
        warmup = warmup_seconds(seconds)
        self.say(f"workloads running; faults after a {warmup:g}s warm-up")
        async with trio.open_nursery() as watchers:
            watchers.start_soon(self.watch_hub)
            watchers.start_soon(self.count_interrupts)
            with trio.CancelScope() as settle:
                async with trio.open_nursery() as workloads:
                    for index in range(BLK_WORKERS):
                        workloads.start_soon(self.blk_worker, index)
                    workloads.start_soon(self.ring)
                    workloads.start_soon(self.churn_vmm)
                    await trio.sleep(warmup)
                    self.samples["start"] = await self.quiet_sample()
                    self.say(f"hub at start: {self.samples['start']}")
                    self.deadline = trio.current_time() + seconds - warmup
                    settle.deadline = self.deadline + SETTLE_TIMEOUT
                    await self.inject_faults()
            if settle.cancelled_caught:
                self.say(
                    f"workloads still busy {SETTLE_TIMEOUT:g}s after the end: abandoned; "
                    + await self.blk_state()
                )
            self.say("faults stopped; settling")
            await self.finish()
            watchers.cancel_scope.cancel()
        self.scan_log()

    async def blk_state(self) -> str:
        """blk0's queue and vectors as the guest and the hub see them (why requests wait)."""
        driver = self.guest.drivers["blk0"]
        queue, device = driver.queues[0], self.vm.devices["blk0"]
        memory, layout = queue.memory, queue.layout
        rows = await self.vector_rows("blk0")
        return (
            f"blk0: {len(self.outstanding)} requests waiting; avail idx {memory.read_u16(layout.avail + 2)}, "
            f"used idx {memory.read_u16(layout.used + 2)}, used flags {memory.read_u16(layout.used)}; "
            f"guest masks {[device.is_masked(v) for v in range(device.info.num_vectors)]}, "
            f"notifications {list(device.notifications)}; "
            f"hub {[(v, r['masked'], r['pending'], r['hub_reading']) for v, r in rows.items()]}"
        )

    async def quiet_sample(self) -> HubSample:
        """The hub's fds and memory at a quiet point: the churn paused, a fresh VMM has just
        attached rng0, read from it and left (so rng0 holds the same vectors at every quiet
        point), every daemon up, only this VMM connected, and the hub's fds unchanged over
        three polls (a VMM's departure finishes after the status stops listing it)."""
        self.churn_cycle.cancel()  # the churn VMM leaves now rather than at its next pause
        async with self.churn_lock:
            self.fresh_reads.append(await self.fresh_vmm_reads_rng())
            pid = self.hub.pid
            previous: Counter[str] = Counter()
            stable = 0

            async def quiet() -> bool:
                nonlocal previous, stable
                report = await self.status.report()
                kinds = fd_kinds(pid)
                settled = all(d["up"] for d in report["devices"]) and report["vmms"] == [VMM_NAME]
                stable = stable + 1 if settled and kinds == previous else 0
                previous = kinds
                return stable >= 3

            await poll_until("a quiet hub", quiet)
            at = round(time.monotonic() - self.hub_started, 2)
            return HubSample(at, open_fds(pid), vm_rss_kib(pid), fd_kinds(pid))

    async def finish(self) -> None:
        """After the faults: every daemon back, shm-b unmasked, then the invariants."""

        async def restarted() -> bool:
            devices = await self.devices()
            return all(
                devices[d]["up"] and devices[d]["registrations"] - 1 >= self.kills[d]
                for d in DAEMONS
            )

        await poll_until("every killed daemon restarted", restarted)
        async with self.mask_lock:
            await self.b.device.msix_control_write(MSIX_ENABLE)
            self.b_function_masked = False
            for vector in range(SHM_VECTORS):
                await set_vector_mask(self.b.device, vector, False)
                self.b_masked[vector] = False
        balances = await self.settled_balances()
        devices = await self.devices()
        peers = await ivshmem_peers(self.status)
        rows = await self.vector_rows("shm-b")
        self.samples["end"] = await self.quiet_sample()
        self.say(f"hub at end: {self.samples['end']}")
        self.judge(balances, devices, peers, rows)

    async def settled_balances(self) -> list[VectorBalance]:
        """shm-b's balances once the last rings were read and counted (or 10 s went by)."""
        balances: list[VectorBalance] = []

        async def balanced() -> bool:
            nonlocal balances
            rows = await self.vector_rows("shm-b")
            balances = [
                vector_balance(v, self.rings[v], self.received[v], rows.get(v, {}))
                for v in range(SHM_VECTORS)
            ]
            return not len(self.vm.queue) and all(b.lost == 0 for b in balances)

        with contextlib.suppress(ChaosError):
            await poll_until("the rings accounted for", balanced, timeout=10.0)
        return balances

    async def fresh_vmm_reads_rng(self) -> bytes:
        """After the churn: a VMM that connects directly attaches rng0 and reads from it."""
        with trio.move_on_after(SETTLE_TIMEOUT):
            while True:
                try:
                    async with (
                        connect(self.hub_socket, name="chaos-check") as vm,
                        Guest.open(vm, ram=1 << 20) as guest,
                    ):
                        return await (await guest.rng("rng0")).read(64)
                except* Exception as group:  # the churn VMM's leave may still be under way
                    self.say(f"rng0 not attachable yet ({_where(_leaf(group))}); retrying")
                await trio.sleep(0.1)
        return b""

    @property
    def hub_socket(self) -> str:
        return self.proxy.upstream

    # --- invariants --------------------------------------------------------------------------

    def judge(
        self,
        balances: list[VectorBalance],
        devices: Mapping[str, Mapping[str, Any]],
        peers: Mapping[str, int],
        rows: Mapping[int, Mapping[str, Any]],
    ) -> None:
        report = self.report
        fault_seconds = self.report.seconds - warmup_seconds(self.report.seconds)
        kills = sum(self.kills.values())
        restarts = {d: devices[d]["registrations"] - 1 for d in DAEMONS}
        proxy_faults = Counter(event.action for event in self.proxy.events)
        report.check(
            "faults were injected",
            kills >= max(1, int(fault_seconds / KILL_GAP[1]) - 1),
            f"{kills} SIGKILLs in {fault_seconds:.0f}s of faults ({dict(self.kills)}), "
            f"{sum(self.stops.values())} SIGSTOPs, {self.storms} mask storms "
            f"({self.mask_writes} mask writes), {sum(proxy_faults.values())} proxy faults",
        )
        report.check(
            "the hub restarted every killed daemon, and only those",
            all(restarts[d] == self.kills[d] for d in DAEMONS),
            f"restarts {restarts}, kills {dict(self.kills)}",
        )

        totals = {
            key: sum(getattr(b, key) for b in balances)
            for key in ("sent", "received", "coalesced", "pending", "cleared", "dropped", "intx")
        }
        lost = sum(b.lost for b in balances)
        report.check(
            "ivshmem: every ring accounted for (sent == received + coalesced + pending + ...)",
            len(balances) == SHM_VECTORS and all(b.lost == 0 for b in balances),
            f"sent {totals['sent']} = received {totals['received']} + coalesced "
            f"{totals['coalesced']} + pending {totals['pending']} + cleared {totals['cleared']} "
            f"+ dropped {totals['dropped']} + intx {totals['intx']}; lost {lost} "
            f"(per vector {[b.lost for b in balances]})",
        )
        counted = list(self.b.device.notifications)
        report.check(
            "ivshmem: every interrupt went where it was programmed",
            not self.stray_interrupts and counted == self.received,
            f"{sum(self.received)} notifications in shm-b's interrupts, {sum(counted)} counted "
            f"by its reader, {len(self.stray_interrupts)} strays" + self.stray_interrupts.detail(),
        )
        report.check(
            "ivshmem: nothing pending after the final unmask",
            totals["pending"] == 0 and not any(row.get("masked") for row in rows.values()),
            f"pending {totals['pending']}",
        )
        b_kills = self.kills["shm-b"]
        report.check(
            "ivshmem: shm-b's pending bits, masks, peer id and table survived its SIGKILLs",
            not self.b_restart_errors
            and peers == self.peer_ids
            and all((row["address"], row["data"]) == message_of(v) for v, row in rows.items()),
            "; ".join(self.b_restart_errors.examples[:3])
            or f"{b_kills} restarts, {self.carried} pending bits carried over, peer ids {peers}",
        )

        # A completion returned twice, or for a request not in flight, breaks the used ring's
        # contract: the guest's driver refuses it (misbehaviour) and the request waits forever.
        misbehaviour = self.guest.misbehaviour
        lost = len(self.outstanding)
        report.check(
            "virtio-blk: every request completed exactly once",
            self.completed == self.submitted and not misbehaviour and not self.failed,
            f"{self.submitted} submitted, {self.completed} completed, {lost} lost, "
            f"{len(misbehaviour)} used-ring violations, {len(self.failed)} failed, "
            f"{self.in_flight_at_kills} in flight at blk0's kills"
            + "".join(f"; {m}" for m in misbehaviour[:3])
            + self.failed.detail(),
        )
        bad_blocks = self.image_mismatches()
        report.check(
            "virtio-blk: data verified (reads during the run, the whole image at the end)",
            not self.mismatches and not bad_blocks,
            f"{self.reads_verified} reads verified, {len(self.mismatches)} wrong; "
            f"{IMAGE_SIZE >> 20} MiB image: {len(bad_blocks)} 4 KiB blocks differ"
            + self.mismatches.detail()
            + bad_blocks.detail(),
        )
        churn = dict(self.churn)
        report.check(
            "rng0 serves a fresh VMM before and after the churn through the fault proxy",
            [len(entropy) for entropy in self.fresh_reads] == [64, 64],
            f"{sum(churn.values())} churn connections {churn}, {self.churn_reads} reads; "
            f"a fresh VMM read {[len(e) for e in self.fresh_reads]} bytes before and after; "
            f"{len(self.churn_surprises)} churn VMM errors that were not msixhub errors"
            + self.churn_surprises.detail(),
        )

        hub_alive = self.hub.process is not None and self.hub.process.returncode is None
        start, end = self.samples["start"], self.samples["end"]
        report.check(
            "the hub never restarted",
            hub_alive and not self.hub_errors,
            f"pid {self.hub.pid} up {end.at:.0f}s; "
            f"{len(self.hub_errors)} error lines in its log" + self.hub_errors.detail(),
        )
        report.check(
            "hub fds flat (no growth between the quiet points)",
            end.fds <= start.fds,
            f"{start.fds} at {start.at:.0f}s, {end.fds} at {end.at:.0f}s "
            f"({percent_change(start.fds, end.fds):+.1f}%), peak {self.fd_peak} under faults"
            + "".join(
                f"; {kind} {start.fd_kinds[kind]} -> {end.fd_kinds[kind]}"
                for kind in sorted(start.fd_kinds | end.fd_kinds)
                if start.fd_kinds[kind] != end.fd_kinds[kind]
            ),
        )
        rss_change = percent_change(start.rss_kib, end.rss_kib)
        judged = self.report.seconds >= LONG_RUN
        report.check(
            f"hub memory flat (within {FLAT_PERCENT:g}%{'' if judged else ': judged from 300 s'})",
            rss_change <= FLAT_PERCENT or not judged,
            f"VmRSS {start.rss_kib} kB -> {end.rss_kib} kB ({rss_change:+.1f}%)",
        )
        report.figures = {
            "faults": {
                "kills": dict(self.kills),
                "kills_total": kills,
                "stops": dict(self.stops),
                "mask_storms": self.storms,
                "mask_writes": self.mask_writes,
                "proxy": dict(proxy_faults),
            },
            "restarts": restarts,
            "notifications": {
                **totals,
                "lost": lost,
                "pending_kept_across_restarts": self.carried,
                "per_vector": [asdict(b) for b in balances],
            },
            "requests": {
                "submitted": self.submitted,
                "completed": self.completed,
                "duplicated": len(misbehaviour),
                "lost": lost,
                "failed": len(self.failed),
                "reads_verified": self.reads_verified,
                "bytes_written": self.bytes_written,
                "in_flight_at_blk0_kills": self.in_flight_at_kills,
            },
            "churn": {
                **churn,
                "reads": self.churn_reads,
                "surprises": self.churn_surprises.examples,
            },
            "hub": {
                "pid": self.hub.pid,
                "uptime": end.at,
                "restarts": 0 if hub_alive else 1,
                "error_lines": len(self.hub_errors),
                "fds_start": start.fds,
                "fds_end": end.fds,
                "fds_change_percent": percent_change(start.fds, end.fds),
                "fds_peak": self.fd_peak,
                "rss_kib_start": start.rss_kib,
                "rss_kib_end": end.rss_kib,
                "rss_change_percent": rss_change,
            },
            "log": {
                "daemon_error_lines": len(self.daemon_errors),
                "tracebacks": self.tracebacks,
            },
        }

    def image_mismatches(self) -> Tally:
        """The image file (as the daemons wrote it) against the model, per 4 KiB block."""
        image = self.image.read_bytes()
        model = b"".join(self.models)
        bad = Tally()
        for at in range(0, IMAGE_SIZE, BLOCK):
            if image[at : at + BLOCK] != model[at : at + BLOCK]:
                bad.add(f"block at byte {at} differs")
        return bad


# --- running it ------------------------------------------------------------------------------


async def run_campaign(report: ChaosReport) -> None:
    with tempfile.TemporaryDirectory(prefix="msixhub-chaos-") as tmp:
        directory = Path(tmp)
        image = directory / "disk.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        socket_path = directory / "hub.sock"
        config = directory / "hub.toml"
        config.write_text(hub_config(socket_path, image))
        hub = ManagedProcess("hub", msixhub_command("serve", "--config", str(config)))
        log_name = f"msixhub-chaos-seed{report.seed}-{os.getpid()}.log"  # runs may overlap
        log = HubLog(hub, Path(tempfile.gettempdir()) / log_name)
        campaign: Campaign | None = None
        async with trio.open_nursery() as nursery:
            hub_started = time.monotonic()
            await hub.start(nursery)
            try:
                with trio.fail_after(SETUP_TIMEOUT + report.seconds + 4 * SETTLE_TIMEOUT):
                    await wait_until_registered(hub, DAEMONS)
                    report.say(f"hub pid {hub.pid}: {', '.join(DAEMONS)} spawned and registered")
                    async with (
                        hub_status(str(socket_path)) as status,
                        connect(str(socket_path), name=VMM_NAME) as vm,
                        Guest.open(vm) as guest,
                        fault_proxy(
                            socket_path,
                            directory / "proxy.sock",
                            PROXY_RULES,
                            seed=derive_seed(report.seed, "proxy"),
                        ) as proxy,
                    ):
                        with trio.fail_after(SETUP_TIMEOUT):
                            attached = await attach_devices(vm, guest, status)
                        campaign = Campaign(
                            report, hub, status, vm, guest, attached, proxy, image, log, hub_started
                        )
                        await campaign.run(report.seconds)
            except Exception as exc:
                report.check("the campaign ran to the end", False, _where(_leaf(exc)))
                report.say(hub.log_tail(30))
            finally:
                with trio.CancelScope(shield=True):
                    await hub.stop()
                nursery.cancel_scope.cancel()
        log.new_lines()
        log.close()
        pids = campaign.daemon_pids if campaign is not None else set()
        report.check_nothing_left_behind(pids | {hub.pid}, socket_path)
        if report.passed:
            log.path.unlink(missing_ok=True)
        else:
            report.say(f"the hub's log (its daemons' too) is kept in {log.path}")


def render(report: ChaosReport) -> str:
    """The figures as a short table (what the README quotes)."""
    figures = report.figures
    if not figures:
        return "no figures: the campaign did not finish"
    faults, notes, requests, hub = (
        figures["faults"],
        figures["notifications"],
        figures["requests"],
        figures["hub"],
    )
    rows = [
        ("SIGKILLs", f"{faults['kills_total']} {faults['kills']}"),
        ("SIGSTOPs", f"{sum(faults['stops'].values())}"),
        ("mask storms", f"{faults['mask_storms']} ({faults['mask_writes']} mask writes)"),
        ("proxy faults", f"{sum(faults['proxy'].values())} {faults['proxy']}"),
        ("daemon restarts", f"{figures['restarts']}"),
        (
            "ivshmem rings",
            f"sent {notes['sent']}, received {notes['received']}, coalesced "
            f"{notes['coalesced']}, still pending {notes['pending']}, lost {notes['lost']}",
        ),
        (
            "blk requests",
            f"submitted {requests['submitted']}, completed {requests['completed']}, "
            f"lost {requests['lost']}, duplicated {requests['duplicated']}, "
            f"reads verified {requests['reads_verified']}",
        ),
        ("hub", f"pid {hub['pid']}, up {hub['uptime']:.0f}s, restarts {hub['restarts']}"),
        (
            "hub fds",
            f"{hub['fds_start']} -> {hub['fds_end']} ({hub['fds_change_percent']:+.1f}%), "
            f"peak {hub['fds_peak']}",
        ),
        (
            "hub VmRSS",
            f"{hub['rss_kib_start']} kB -> {hub['rss_kib_end']} kB "
            f"({hub['rss_change_percent']:+.1f}%)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds",
        type=float_in(1, MAX_SECONDS, "seconds"),
        default=DEFAULT_SECONDS,
        help=f"how long the workloads and faults run (default {DEFAULT_SECONDS:g})",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of every random choice")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (progress: stderr)"
    )


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    out = sys.stderr if args.json else sys.stdout
    logging.basicConfig(
        level=logging.WARNING,
        stream=out,
        format="%(asctime)s chaos %(name)s %(levelname)s %(message)s",
    )
    # The churn VMM's connection breaks on purpose: its closing warnings are the proxy's work.
    logging.getLogger(f"msixhub.peer.{CHURN_NAME}").setLevel(logging.ERROR)
    report = ChaosReport(seed=seed, seconds=args.seconds, out=out)
    report.say(f"msixhub chaos: {args.seconds:g}s, seed {seed}")
    started = time.monotonic()
    trio.run(run_campaign, report)
    report.elapsed = round(time.monotonic() - started, 2)
    report.say(render(report))
    passed = sum(c.passed for c in report.checks)
    verdict = "PASS" if report.passed else f"FAIL (seed {seed}); reproduce with: {report.command}"
    report.say(f"{passed}/{len(report.checks)} checks passed in {report.elapsed}s: {verdict}")
    if args.json:
        print(json.dumps(report.to_json()))
    return 0 if report.passed else 1
