"""Process and resource faults, for a device daemon, a VMM process or any other peer started
as a ``ManagedProcess``.

Process faults::

    await kill(device)                    # SIGKILL; returns once the process is reaped
    async with stopped(device):           # SIGSTOP: a hung peer (state 'T' in /proc)
        ...                               # SIGCONT on the way out, whatever happened
    await restart(device, nursery, ready=RESTARTED)

Resource faults:

* routes: a hub started with a tiny ``route_budget``, and ``exhaust_routes`` to use vectors
  until the hub refuses (for a testdev: ``exhaust_routes(Testdev(device).use, range(n))``);
* fds: run a daemon under ``msixhub.testing.limited`` (``limit_prefix(nofile=N)``), and read
  the limit back with ``fd_limit(pid)``;
* image writes: ``full_image(dir)`` is a path whose writes fail with ENOSPC (``/dev/full``),
  ``limit_prefix(fsize=B)`` makes writes at or past byte B fail with EFBIG. There is no
  root-free way to make a file fail with EIO; a block daemon that wants that fault should
  take it as an option of its own (the seam: an image path that fails as asked).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from msixhub.testing.processes import STARTUP_TIMEOUT, ManagedProcess

RESTARTED = r"registered \(restarted\)"  # a device daemon's line once it re-registered
POLL_INTERVAL = 0.005  # /proc has no change notification; state waits poll it, with a cap
STOPPED_STATES = frozenset("Tt")


class FaultError(RuntimeError):
    """A fault could not be applied (the process was gone, or did not change state)."""


# --- process faults --------------------------------------------------------------------------


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` in ``/proc/<pid>/stat`` ('R', 'S', 'T', 'Z', ...)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise FaultError(f"process {pid} does not exist") from None
    return stat[stat.rindex(")") + 2]  # the name may contain spaces and parentheses


async def wait_for_state(pid: int, accept: Callable[[str], bool], *, timeout: float = 5.0) -> str:
    """Poll ``pid``'s state until ``accept(state)``; the state reached."""
    with trio.fail_after(timeout):
        while not accept(state := process_state(pid)):
            await trio.sleep(POLL_INTERVAL)
    return state


async def kill(process: ManagedProcess, *, timeout: float = 5.0) -> int:
    """SIGKILL ``process`` and reap it; its exit status (``-9``)."""
    if process.process is None or process.process.returncode is not None:
        raise FaultError(f"{process.name} is not running")
    process.kill()
    with trio.fail_after(timeout):
        return await process.wait()


@asynccontextmanager
async def stopped(process: ManagedProcess, *, timeout: float = 5.0) -> AsyncIterator[int]:
    """Freeze ``process`` (SIGSTOP) for the block, then continue it (SIGCONT), even if the
    block failed; yields the pid. Both changes are awaited in ``/proc``."""
    if process.process is None or process.process.returncode is not None:
        raise FaultError(f"{process.name} is not running")
    pid = process.pid
    process.send_signal(signal.SIGSTOP)
    try:
        await wait_for_state(pid, STOPPED_STATES.__contains__, timeout=timeout)
        yield pid
    finally:
        process.send_signal(signal.SIGCONT)
        with trio.CancelScope(shield=True):
            await _wait_continued(pid, timeout)


async def _wait_continued(pid: int, timeout: float) -> None:
    def running(state: str) -> bool:
        return state not in STOPPED_STATES

    with contextlib.suppress(FaultError):  # it died while stopped (SIGKILL reaches it)
        await wait_for_state(pid, running, timeout=timeout)


async def restart(
    process: ManagedProcess,
    nursery: trio.Nursery,
    *,
    ready: str = RESTARTED,
    timeout: float = STARTUP_TIMEOUT,
) -> None:
    """Kill ``process`` if it still runs, start its command again (its log drained by a task
    in ``nursery``, which must outlive the process) and wait for the ``ready`` log line."""
    if process.process is not None and process.process.returncode is None:
        await kill(process)
    mark = process.line_count
    await process.start(nursery)
    await process.wait_for_line(ready, after=mark, timeout=timeout)


def fd_targets(pid: int | None = None) -> dict[int, str]:
    """The open fds of ``pid`` (this process by default) and what each refers to."""
    directory = f"/proc/{pid or 'self'}/fd"
    targets = {}
    for entry in os.listdir(directory):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own fd, say)
            targets[int(entry)] = os.readlink(f"{directory}/{entry}")
    return targets


def fd_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of ``pid``, from ``/proc/<pid>/limits``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise FaultError(f"no open-files limit in /proc/{pid}/limits")


# --- route budget ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteExhaustion:
    granted: list[int]
    refused: int | None  # the first vector the hub refused, None if every one was granted


async def exhaust_routes(
    use: Callable[[int], Awaitable[bool]], vectors: Iterable[int]
) -> RouteExhaustion:
    """Use ``vectors`` in order until the hub refuses one (``use`` returns False)."""
    granted: list[int] = []
    for vector in vectors:
        if not await use(vector):
            return RouteExhaustion(granted, vector)
        granted.append(vector)
    return RouteExhaustion(granted, None)


# --- image files -----------------------------------------------------------------------------


def full_image(directory: Path, name: str = "image.raw") -> Path:
    """A path in ``directory`` whose writes fail with ENOSPC (reads return zeros): a symlink
    to ``/dev/full``. It has no size, so a block daemon needs its capacity given."""
    path = directory / name
    path.symlink_to("/dev/full")
    return path
