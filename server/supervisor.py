"""Device daemons the hub spawns from its config, restarted with backoff when they die.

A daemon re-registers under its stable id and gets back its memory table, call fds, kick
fds and in-flight region; its MSI-X state never left the hub.

The restart rule (``RestartBackoff``): a daemon that *served* -- registered with the hub and
stayed up HEALTHY_AFTER seconds after that -- is restarted after INITIAL_BACKOFF whatever
its history, so an operator's SIGKILL, or a chaos test's every few seconds, costs one quick
restart each time and never climbs to MAX_BACKOFF. Any other exit (it died before it
registered, or right after) is a crash loop: the wait doubles each time, up to MAX_BACKOFF,
until a run serves again. (The rule before this one reset the wait only after 10 s of
uptime, so a daemon killed every 2-3 s was restarted 5 s late every time.) A daemon that
crashes each time after serving a while is restarted every HEALTHY_AFTER seconds or so at
worst; that costs little, and the log says so at every exit.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

log = logging.getLogger("msixhub.supervisor")

INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 5.0
HEALTHY_AFTER = 1.0  # served this long after registering: its next restart is a quick one


class RestartBackoff:
    """How long to wait before restarting a daemon that exited (pure: the caller measures)."""

    def __init__(self) -> None:
        self._next = INITIAL_BACKOFF

    def after_exit(self, served: float | None) -> float:
        """The wait before the next start; ``served``: seconds the run was registered with
        the hub before it exited, None if it never registered."""
        if served is not None and served >= HEALTHY_AFTER:
            self._next = INITIAL_BACKOFF
        delay = self._next
        self._next = min(delay * 2, MAX_BACKOFF)
        return delay


class DaemonProcess(Protocol):
    """What the supervisor needs of a process (``trio.Process``, or a test's stand-in)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


Spawn = Callable[[list[str]], Awaitable[DaemonProcess]]


async def _open_process(command: list[str]) -> DaemonProcess:
    return await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One ``[[device]]`` entry: ``msixhub spawn KIND --id ID ARGS...``."""

    kind: str
    id: str
    args: tuple[str, ...] = ()

    def command(self, socket_path: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "msixhub.client.cli",
            "spawn",
            self.kind,
            "--id",
            self.id,
            "--socket",
            socket_path,
            *self.args,
        ]


@dataclass(eq=False)
class Supervised:
    spec: DeviceSpec
    process: DaemonProcess | None = None
    registered_at: float | None = None  # when the running process registered with the hub
    starts: int = 0
    exits: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, socket_path: str, *, spawn: Spawn = _open_process) -> None:
        self.socket_path = socket_path
        self.daemons: dict[str, Supervised] = {}
        self._spawn = spawn

    def registered(self, device_id: str, pid: int | None) -> None:
        """The hub registered ``device_id`` from ``pid``: if that is the process we run, it
        is serving from now on (a registration from another process is not ours)."""
        entry = self.daemons.get(device_id)
        if entry is not None and entry.process is not None and entry.process.pid == pid:
            entry.registered_at = trio.current_time()

    async def supervise(self, spec: DeviceSpec) -> None:
        """Run ``spec``'s daemon for as long as we are not cancelled, restarting it."""
        entry = self.daemons[spec.id] = Supervised(spec)
        backoff = RestartBackoff()
        while True:
            entry.starts += 1
            entry.registered_at = None
            process = await self._spawn(spec.command(self.socket_path))
            entry.process = process
            log.info("spawned %s %s as pid %d", spec.kind, spec.id, process.pid)
            try:
                code = await process.wait()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await _terminate(process)
                raise
            entry.exits.append(code)
            served = (
                None if entry.registered_at is None else trio.current_time() - entry.registered_at
            )
            delay = backoff.after_exit(served)
            log.warning(
                "daemon %s (pid %d) exited with %d after %s; restarting in %g s",
                spec.id,
                process.pid,
                code,
                "never registering" if served is None else f"serving {served:.1f} s",
                delay,
            )
            await trio.sleep(delay)


async def _terminate(process: DaemonProcess, grace: float = 2.0) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace):
        await process.wait()
        return
    process.kill()
    await process.wait()
