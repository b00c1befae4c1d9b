"""Device daemons the hub spawns from its config, restarted with backoff when they die.

A daemon re-registers under its stable id and gets back its memory table, call fds, kick
fds and in-flight region; its MSI-X state never left the hub.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import trio

log = logging.getLogger("msixhub.supervisor")

INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 5.0
STABLE_AFTER = 10.0  # a daemon that ran this long gets its backoff reset


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
    process: trio.Process | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.daemons: dict[str, Supervised] = {}

    async def supervise(self, spec: DeviceSpec) -> None:
        """Run ``spec``'s daemon for as long as we are not cancelled, restarting it."""
        entry = self.daemons[spec.id] = Supervised(spec)
        backoff = INITIAL_BACKOFF
        while True:
            started = trio.current_time()
            entry.starts += 1
            process = await trio.lowlevel.open_process(
                spec.command(self.socket_path), stdin=subprocess.DEVNULL
            )
            entry.process = process
            log.info("spawned %s %s as pid %d", spec.kind, spec.id, process.pid)
            try:
                code = await process.wait()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await _terminate(process)
                raise
            entry.exits.append(code)
            log.warning("daemon %s (pid %d) exited with %d", spec.id, process.pid, code)
            if trio.current_time() - started > STABLE_AFTER:
                backoff = INITIAL_BACKOFF
            await trio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


async def _terminate(process: trio.Process, grace: float = 2.0) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace):
        await process.wait()
        return
    process.kill()
    await process.wait()
