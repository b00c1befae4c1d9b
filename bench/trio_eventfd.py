"""Bare trio baselines for anything that moves interrupts over eventfds under trio.

``trio_pingpong``: two processes, each running trio, bounce a count through two eventfds:
write, then ``wait_readable`` and read, nothing else. It is the floor for an interrupt round
trip between two trio processes (msixhub's kick -> device -> irq path is this plus the
VMM client and the device shell), measured the same way as the real thing: same eventfd
helpers, same event loop, whatever CPU pinning the caller has (the child inherits it).
``blocking`` baselines without trio are in ``bench/baseline.py``.

``eventfd_write_rate``: how fast one process can write an eventfd in a Python loop, the
ceiling for notifications per second from a Python device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import trio
from msixhub.protocol.fds import OwnedFd, eventfd, eventfd_read, eventfd_write

_WARMUP = 500
_BATCH = 100
_PING = 1
_STOP = 2  # any other count ends the child


async def trio_pingpong(seconds: float, child_cpu: int | None = None) -> float:
    """Seconds per round trip between this trio process and a trio child (about ``seconds``).
    The child runs on ``child_cpu`` if given, else wherever this process may run."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    with eventfd() as ping, eventfd() as pong:
        command = [sys.executable, "-m", __name__, str(ping.fileno()), str(pong.fileno())]
        if child_cpu is not None:
            command.append(str(child_cpu))
        process = await trio.lowlevel.open_process(
            command, pass_fds=(ping.fileno(), pong.fileno()), stdin=subprocess.DEVNULL
        )
        try:
            await _wait_read(pong)  # the child is up
            for _ in range(_WARMUP):
                await _round_trip(ping, pong)
            round_trips = 0
            start = time.perf_counter()
            deadline = start + seconds
            while (now := time.perf_counter()) < deadline or not round_trips:
                for _ in range(_BATCH):
                    await _round_trip(ping, pong)
                round_trips += _BATCH
            eventfd_write(ping.fileno(), _STOP)
            with trio.fail_after(10):
                if await process.wait() != 0:
                    raise RuntimeError(f"trio ping-pong child exited with {process.returncode}")
            return (now - start) / round_trips
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()


async def _round_trip(ping: OwnedFd, pong: OwnedFd) -> None:
    eventfd_write(ping.fileno(), _PING)
    await _wait_read(pong)


async def _wait_read(fd: OwnedFd) -> int:
    while not (count := eventfd_read(fd.fileno())):
        await trio.lowlevel.wait_readable(fd.fileno())
    return count


def eventfd_write_rate(seconds: float) -> float:
    """Eventfd writes per second from a Python loop (nobody reads; the counter just grows)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    with eventfd() as fd:
        number = fd.fileno()
        writes = 0
        start = time.perf_counter()
        deadline = start + seconds
        while (now := time.perf_counter()) < deadline or not writes:
            for _ in range(1000):
                eventfd_write(number)
            writes += 1000
            eventfd_read(number)  # keep the counter far from its limit
        return writes / (now - start)


async def _child(ping: OwnedFd, pong: OwnedFd) -> None:
    eventfd_write(pong.fileno())
    while await _wait_read(ping) == _PING:
        eventfd_write(pong.fileno())


if __name__ == "__main__":
    if len(sys.argv) > 3:
        os.sched_setaffinity(0, {int(sys.argv[3])})
    trio.run(_child, OwnedFd(int(sys.argv[1]), "ping"), OwnedFd(int(sys.argv[2]), "pong"))
