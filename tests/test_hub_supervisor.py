"""The supervisor's restart rule, on trio's MockClock with stand-in processes: a crash loop
backs off (doubling to MAX_BACKOFF), a daemon that registered and served is restarted at
once however often it is killed (before, only 10 s of uptime reset the backoff, so a daemon
SIGKILLed every 2-3 s came back 5 s late every time)."""

from __future__ import annotations

import itertools
import signal

import pytest
import trio
import trio.testing
from msixhub.server.supervisor import (
    HEALTHY_AFTER,
    INITIAL_BACKOFF,
    MAX_BACKOFF,
    DeviceSpec,
    RestartBackoff,
    Supervisor,
)

SPEC = DeviceSpec("testdev", "dev0")
CAP = 60.0  # virtual seconds: every wait below is capped by this on the mock clock


class FakeProcess:
    """A daemon process the test ends when it likes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = trio.Event()

    def exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.exit(-sig)

    def kill(self) -> None:
        self.exit(-signal.SIGKILL)


class FakeSpawner:
    """Records when each process started; ``next_start`` waits for the next one."""

    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []
        self.started_at: list[float] = []
        self._started = trio.lowlevel.ParkingLot()

    async def __call__(self, command: list[str]) -> FakeProcess:
        assert command[-4:] == ["--id", "dev0", "--socket", "hub.sock"]
        process = FakeProcess(1000 + len(self.processes))
        self.processes.append(process)
        self.started_at.append(trio.current_time())
        self._started.unpark_all()
        return process

    async def next_start(self, count: int) -> FakeProcess:
        """The ``count``-th process (1-based), once it has started."""
        with trio.fail_after(CAP):
            while len(self.processes) < count:
                await self._started.park()
        return self.processes[count - 1]

    def gaps(self) -> list[float]:
        """Time from each start to the next: how long the run lasted plus the backoff."""
        return [round(b - a, 6) for a, b in itertools.pairwise(self.started_at)]


async def run_supervisor(
    nursery: trio.Nursery, spawner: FakeSpawner
) -> tuple[Supervisor, trio.CancelScope]:
    supervisor = Supervisor("hub.sock", spawn=spawner)
    scope = trio.CancelScope()

    async def supervise() -> None:
        with scope:
            await supervisor.supervise(SPEC)

    nursery.start_soon(supervise)
    return supervisor, scope


def test_backoff_rule() -> None:
    backoff = RestartBackoff()
    crash_loop = [backoff.after_exit(None) for _ in range(10)]
    assert crash_loop[:4] == [INITIAL_BACKOFF, 2 * INITIAL_BACKOFF, 4 * INITIAL_BACKOFF, 0.4]
    assert crash_loop[-1] == MAX_BACKOFF
    assert backoff.after_exit(HEALTHY_AFTER / 2) == MAX_BACKOFF  # died right after registering
    assert backoff.after_exit(HEALTHY_AFTER) == INITIAL_BACKOFF  # it served: start again quick
    assert backoff.after_exit(None) == 2 * INITIAL_BACKOFF


async def test_a_crash_loop_backs_off_to_the_maximum(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        _, scope = await run_supervisor(nursery, spawner)
        for count in range(1, 12):
            (await spawner.next_start(count)).exit(1)  # dies before it ever registers
        scope.cancel()
    expected = [min(INITIAL_BACKOFF * 2**i, MAX_BACKOFF) for i in range(10)]
    assert spawner.gaps() == pytest.approx(expected)
    assert expected[-1] == MAX_BACKOFF


async def test_a_daemon_that_served_is_restarted_at_once_every_time(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A chaos test's SIGKILL every 2 s, 30 times: every restart is INITIAL_BACKOFF late."""
    mock_clock.autojump_threshold = 0
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        supervisor, scope = await run_supervisor(nursery, spawner)
        for count in range(1, 32):
            process = await spawner.next_start(count)
            await trio.sleep(0.3)  # virtual time: python starting up
            supervisor.registered("dev0", process.pid)
            await trio.sleep(2.0)  # virtual time: serving
            process.kill()
        scope.cancel()
    assert spawner.gaps() == pytest.approx([2.3 + INITIAL_BACKOFF] * 30)
    assert supervisor.daemons["dev0"].exits == [-signal.SIGKILL] * 31


async def test_registering_is_not_enough_without_serving(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Dying right after registering is a crash loop too; one healthy run resets it. A
    registration from a process that is not the supervised one does not count."""
    mock_clock.autojump_threshold = 0
    spawner = FakeSpawner()
    async with trio.open_nursery() as nursery:
        supervisor, scope = await run_supervisor(nursery, spawner)
        for count in range(1, 5):
            process = await spawner.next_start(count)
            supervisor.registered("dev0", process.pid)
            supervisor.registered("dev1", process.pid)  # not supervised: ignored
            await trio.sleep(HEALTHY_AFTER / 4)
            process.exit(1)
        process = await spawner.next_start(5)
        supervisor.registered("dev0", 1)  # someone else's registration under our id
        await trio.sleep(HEALTHY_AFTER * 2)
        process.exit(1)
        process = await spawner.next_start(6)
        supervisor.registered("dev0", process.pid)
        await trio.sleep(HEALTHY_AFTER)
        process.exit(1)
        await spawner.next_start(7)
        scope.cancel()
    run = HEALTHY_AFTER / 4
    assert spawner.gaps() == pytest.approx(
        [
            run + INITIAL_BACKOFF,
            run + 2 * INITIAL_BACKOFF,
            run + 4 * INITIAL_BACKOFF,
            run + 8 * INITIAL_BACKOFF,
            2 * HEALTHY_AFTER + 16 * INITIAL_BACKOFF,  # it never registered: still a loop
            HEALTHY_AFTER + INITIAL_BACKOFF,  # it served: reset
        ]
    )
    # Cancelled while one runs: the supervisor terminates it on the way out.
    assert spawner.processes[-1].returncode == -signal.SIGTERM
