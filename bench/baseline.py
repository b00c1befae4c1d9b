"""Bare baselines that several benchmarks measure themselves against.

``eventfd_pingpong``: two processes bounce a count through two eventfds with blocking reads,
nothing else in between. It is the floor for any interrupt that crosses processes over an
eventfd (msixhub's irq path, ivshmem doorbells): one round trip is two eventfd writes and two
wake-ups. The child is a fresh interpreter (no fork of a process that may run threads), and
both sides are pinned, to one CPU or to two, which the result reports.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from msixhub.protocol.fds import OwnedFd

_WARMUP_ROUND_TRIPS = 1000
_BATCH = 200
_PING = 1
_STOP = 2  # any other count ends the child; a ping is always read before the next is sent
GONE = 1 << 32  # what an exit watch writes into the fds it wakes: no ping-pong count comes near


@dataclass(frozen=True, slots=True)
class PingPong:
    round_trip_seconds: float
    round_trips: int
    pinning: str


def eventfd_pingpong_latency(seconds: float, same_cpu: bool) -> float:
    """Seconds per eventfd round trip between two processes (see ``eventfd_pingpong``)."""
    return eventfd_pingpong(seconds, same_cpu=same_cpu).round_trip_seconds


def eventfd_pingpong(seconds: float, *, same_cpu: bool) -> PingPong:
    """Bounce a count between this process and a child for about ``seconds``; both pinned to
    one CPU if ``same_cpu`` else to two different ones (one, if that is all we may use)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    original = os.sched_getaffinity(0)
    cpus = sorted(original)
    ours = cpus[0]
    theirs = ours if same_cpu or len(cpus) < 2 else cpus[1]
    pinning = f"parent cpu{ours}, child cpu{theirs}"
    if not same_cpu and theirs == ours:
        pinning += " (only one CPU available)"
    ping = os.eventfd(0, os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_CLOEXEC)
    child: subprocess.Popen[bytes] | None = None
    try:
        os.sched_setaffinity(0, {ours})
        child = subprocess.Popen(
            [sys.executable, "-m", "msixhub.bench.baseline", str(ping), str(pong), str(theirs)],
            pass_fds=(ping, pong),
        )
        with (
            OwnedFd(os.pidfd_open(child.pid), "child-pidfd") as child_exit,
            ExitWatch(child_exit.fileno(), (pong,)),
        ):
            _take(os.eventfd_read(pong))  # the child is pinned and waiting
            for _ in range(_WARMUP_ROUND_TRIPS):
                _round_trip(ping, pong)
            round_trips = 0
            start = time.perf_counter()
            deadline = start + seconds
            while True:
                for _ in range(_BATCH):
                    _round_trip(ping, pong)
                round_trips += _BATCH
                now = time.perf_counter()
                if now >= deadline:
                    break
        os.eventfd_write(ping, _STOP)
        if child.wait(timeout=10) != 0:
            raise RuntimeError(f"eventfd ping-pong child exited with {child.returncode}")
        return PingPong((now - start) / round_trips, round_trips, pinning)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        os.close(ping)
        os.close(pong)
        os.sched_setaffinity(0, original)


def _round_trip(ping: int, pong: int) -> None:
    os.eventfd_write(ping, _PING)
    _take(os.eventfd_read(pong))


def _take(count: int) -> None:
    if count != 1:  # GONE: the exit watch woke us
        raise RuntimeError("the eventfd ping-pong child exited")


def _child(ping: int, pong: int, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    parent = os.pidfd_open(os.getppid())
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    os.eventfd_write(pong, 1)
    while os.eventfd_read(ping) == _PING:
        os.eventfd_write(pong, 1)


class ExitWatch:
    """Wakes the blocking reads of ``fds`` if the process behind ``pidfd`` exits, by writing a
    count no ping-pong makes: a blocking read has no timeout and waits on one fd, so a thread waits
    on the other side's pidfd for them, off the timed path (blocked in poll, it never takes the
    GIL from the timed loop)."""

    def __init__(self, pidfd: int, fds: tuple[int, ...]) -> None:
        self._pidfd, self._fds = pidfd, fds
        self._stop = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), "exit-watch-stop")
        self._thread = threading.Thread(target=self._watch, name="exit-watch", daemon=True)

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        poller.register(self._stop.fileno(), select.POLLIN)
        if any(fd == self._pidfd for fd, _ in poller.poll()):
            for fd in self._fds:
                os.eventfd_write(fd, GONE)

    def __enter__(self) -> ExitWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.eventfd_write(self._stop.fileno(), 1)
        self._thread.join()
        self._stop.close()


def _exit_with_parent(parent: int) -> None:
    """A parent killed mid-run would leave us blocked in a read for ever. This thread waits on
    its pidfd, off the timed loop (blocked in poll, it never takes the GIL from it)."""
    select.select([parent], [], [])
    os._exit(1)


if __name__ == "__main__":
    _child(*(int(arg) for arg in sys.argv[1:4]))
