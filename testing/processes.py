"""Real processes for tests: a hub and device daemons started as ``msixhub`` subprocesses,
readiness awaited on their log lines (never on a sleep), every process killed and reaped
when the block ends, even if the test failed.

    async with hub_process(tmp_path, route_policy="lazy") as hub:
        async with device_process(hub, "testdev", "dev0", "--vectors", "8") as dev:
            dev.kill()                       # SIGKILL, for real
            await dev.wait_for_line("registered")
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

STARTUP_TIMEOUT = 15.0


class ManagedProcess:
    """A child process whose stderr is drained into a bounded log we can wait on."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        self.command = command
        self.process: trio.Process | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self._seen = 0
        self._new_line = trio.lowlevel.ParkingLot()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, nursery: trio.Nursery) -> None:
        self.process = await trio.lowlevel.open_process(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        nursery.start_soon(self._drain_stderr)

    async def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        pending = b""
        async with self.process.stderr:
            async for chunk in self.process.stderr:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    self.lines.append(raw.decode(errors="replace"))
                    self._seen += 1
                self._new_line.unpark_all()
        self._new_line.unpark_all()

    async def wait_for_line(
        self, pattern: str, *, after: int = 0, timeout: float = STARTUP_TIMEOUT
    ) -> str:
        """The first log line (counting from line ``after``) that matches ``pattern``."""
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                first = self._seen - len(self.lines)
                for index, line in enumerate(self.lines):
                    if first + index >= after and regex.search(line):
                        return line
                if self.process is not None and self.process.returncode is not None:
                    raise RuntimeError(
                        f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}"
                    )
                await self._new_line.park()

    @property
    def line_count(self) -> int:
        return self._seen

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.lines)[-lines:])

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def stop(self, grace: float = 3.0) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.process.wait()
            return
        self.kill()
        await self.process.wait()


def msixhub_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "msixhub.client.cli", *args]


class HubProcess(ManagedProcess):
    def __init__(self, socket_path: Path, args: list[str]) -> None:
        super().__init__("hub", msixhub_command("serve", "--socket", str(socket_path), *args))
        self.socket = str(socket_path)


@asynccontextmanager
async def hub_process(
    directory: Path,
    *,
    route_policy: str = "static",
    route_budget: int = 4096,
    extra: tuple[str, ...] = (),
    prefix: Sequence[str] = (),
) -> AsyncIterator[HubProcess]:
    """A running hub (``msixhub serve``) with its socket in ``directory``; ``prefix`` goes in
    front of the command (e.g. ``msixhub.testing.limited.limit_prefix(nofile=64)``)."""
    hub = HubProcess(
        directory / "hub.sock",
        ["--route-policy", route_policy, "--route-budget", str(route_budget), *extra],
    )
    hub.command = [*prefix, *hub.command]
    async with trio.open_nursery() as nursery:
        await hub.start(nursery)
        try:
            await hub.wait_for_line("hub listening")
            yield hub
        finally:
            with trio.CancelScope(shield=True):
                await hub.stop()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def device_process(
    hub: HubProcess,
    kind: str,
    device_id: str,
    *args: str,
    socket: str | None = None,
    prefix: Sequence[str] = (),
) -> AsyncIterator[ManagedProcess]:
    """A device daemon (``msixhub spawn``) registered with ``hub`` before the block starts.
    ``socket`` replaces the hub's (a fault proxy's, say); ``prefix`` goes in front of the
    command."""
    command = msixhub_command("spawn", kind, "--id", device_id, "--socket", socket or hub.socket)
    device = ManagedProcess(device_id, [*prefix, *command, *args])
    async with trio.open_nursery() as nursery:
        await device.start(nursery)
        try:
            await device.wait_for_line(f"{re.escape(device_id)} registered")
            yield device
        finally:
            with trio.CancelScope(shield=True):
                await device.stop()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def hub_with_device(
    directory: Path,
    kind: str,
    device_id: str,
    device_args: Sequence[str] = (),
    *,
    supervised: bool = False,
    route_policy: str = "static",
    route_budget: int = 4096,
) -> AsyncIterator[tuple[HubProcess, ManagedProcess | None]]:
    """A hub and one device daemon registered with it before the block starts.

    ``supervised``: the hub spawns the daemon from a ``[[device]]`` entry of its config and
    restarts it when it dies (the daemon given back is None); otherwise this process starts
    it (``device_process``)."""
    async with AsyncExitStack() as stack:
        extra: tuple[str, ...] = ()
        if supervised:
            config = directory / "hub.toml"
            config.write_text(
                f"[[device]]\nkind = {json.dumps(kind)}\nid = {json.dumps(device_id)}\n"
                f"args = {json.dumps(list(device_args))}\n"
            )
            extra = ("--config", str(config))
        hub = await stack.enter_async_context(
            hub_process(
                directory, route_policy=route_policy, route_budget=route_budget, extra=extra
            )
        )
        daemon = None
        if supervised:
            await hub.wait_for_line(
                f"device {re.escape(device_id)} \\({re.escape(kind)}\\) registered"
            )
        else:
            daemon = await stack.enter_async_context(
                device_process(hub, kind, device_id, *device_args)
            )
        yield hub, daemon


async def restart(device: ManagedProcess, nursery: trio.Nursery) -> None:
    """Start ``device``'s command again (after a kill) and wait until it re-registered."""
    mark = device.line_count
    await device.start(nursery)
    await device.wait_for_line(r"registered \(restarted\)", after=mark)


def open_fds(pid: int | None = None) -> int:
    """How many fds a process has open (this one by default)."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
