"""pytest plugin: a hub, device daemons, VMMs and fault proxies for a test, torn down whatever
happens, and a seed that makes each fault reproducible.

Enable it with ``pytest_plugins = ["msixhub.testing.fixtures"]`` in the root ``conftest.py``
(or ``-p msixhub.testing.fixtures``), with pytest-trio in ``trio_mode``::

    @pytest.mark.parametrize("hub_settings", [{"route_policy": "lazy", "route_budget": 2}])
    async def test_example(hub, start_device, connect_vmm, fault_proxy, msixhub_processes):
        proxy = await fault_proxy([FaultRule(Drop(), op="irq", times=1)])
        device = await start_device("testdev", "dev0", "--vectors", "4")
        vm = await connect_vmm(socket=proxy.path)
        await kill(device)
        await msixhub_processes.restart(device)

Fixtures:
  ``msixhub_seed``       this test's seed (from ``--msixhub-seed``/``MSIXHUB_SEED`` and the
                         test's id); printed in the report of a failing test
  ``hub``                a hub process in ``tmp_path``, set up by ``hub_settings``
  ``msixhub_processes``  the test's processes: ``start``, ``device``, ``vmm``, ``restart``
  ``start_device``       ``await start_device(kind, id, *args, socket=None, nofile=None)``
  ``connect_vmm``        ``await connect_vmm(name=..., socket=None)``: an in-process VmmClient
  ``fault_proxy``        ``await fault_proxy(rules, upstream=None)``: a FaultProxy on the hub
  ``msixhub_leak_guard`` fails the test if it leaves a child process or an fd behind
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from msixhub.client.vmm import VmmClient, connect
from msixhub.testing.faults import RESTARTED, fd_targets, restart
from msixhub.testing.limited import limit_prefix
from msixhub.testing.processes import (
    STARTUP_TIMEOUT,
    HubProcess,
    ManagedProcess,
    hub_process,
    msixhub_command,
)
from msixhub.testing.proxy import FaultProxy, FaultRule
from msixhub.testing.seeds import SEED_ENV, derive_seed, run_seed
from msixhub.testing.vmm_process import READY

_SESSION_SEED = pytest.StashKey[int]()
_TEST_SEED = pytest.StashKey[int]()
T = TypeVar("T")
DeviceStarter = Callable[..., Awaitable[ManagedProcess]]


# --- seeds -----------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("msixhub").addoption(
        "--msixhub-seed",
        type=int,
        default=None,
        help=f"seed of every msixhub fault (default: ${SEED_ENV}, else random)",
    )


def session_seed(config: pytest.Config) -> int:
    """The run's seed, fixed at first use."""
    if _SESSION_SEED not in config.stash:
        config.stash[_SESSION_SEED] = run_seed(getattr(config.option, "msixhub_seed", None))
    return config.stash[_SESSION_SEED]


@pytest.fixture
def msixhub_seed(request: pytest.FixtureRequest) -> int:
    seed = derive_seed(session_seed(request.config), request.node.nodeid)
    request.node.stash[_TEST_SEED] = seed
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _TEST_SEED in item.stash:
        run_seed = session_seed(item.config)
        report.sections.append(
            (
                "msixhub seed",
                f"this test's seed {item.stash[_TEST_SEED]}; reproduce with "
                f"--msixhub-seed {run_seed} (or {SEED_ENV}={run_seed})",
            )
        )
    return report


# --- leaks -----------------------------------------------------------------------------------


def child_pids() -> set[int]:
    """Processes whose parent is this one (zombies included)."""
    children = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == me:
            children.add(int(entry))
    return children


@pytest.fixture
def msixhub_leak_guard() -> Iterator[None]:
    """Fails the test (at teardown) if it left a child process running or an fd open.

    A sync fixture, so it wraps the test's whole trio run: what it sees at the end is what
    the test left behind, not the event loop's own fds."""
    children = child_pids()
    fds = fd_targets()
    yield
    problems = []
    for pid in sorted(child_pids() - children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        problems.append(f"child process {pid} was still there (killed now)")
    for fd, target in sorted(fd_targets().items()):
        if fds.get(fd) != target:
            problems.append(f"fd {fd} ({target}) was left open")
    if problems:
        pytest.fail("the test leaked:\n  " + "\n  ".join(problems), pytrace=False)


# --- processes -------------------------------------------------------------------------------


async def _hold(
    manager: AbstractAsyncContextManager[T], *, task_status: trio.TaskStatus[T]
) -> None:
    """Enter ``manager`` in a task of the fixture's nursery and hold it until cancelled
    (a context manager that opens a nursery must be exited by the task that entered it)."""
    async with manager as value:
        task_status.started(value)
        await trio.sleep_forever()


@pytest.fixture
def hub_settings() -> dict[str, Any]:
    """Keyword arguments of the ``hub`` fixture's ``hub_process`` (plus ``nofile``); override
    per test with ``@pytest.mark.parametrize("hub_settings", [{"route_budget": 2}])``."""
    return {}


@pytest.fixture
async def hub(
    hub_settings: dict[str, Any], tmp_path: Path, msixhub_leak_guard: None
) -> AsyncIterator[HubProcess]:
    settings = dict(hub_settings)
    nofile = settings.pop("nofile", None)
    prefix = limit_prefix(nofile=nofile) if nofile else []
    async with hub_process(tmp_path, prefix=prefix, **settings) as process:
        yield process


class Processes:
    """The processes one test started: each is stopped when the test ends, whatever happened;
    their logs are drained by tasks of the fixture's nursery, so restarts outlive the test's
    own nurseries."""

    def __init__(self, nursery: trio.Nursery, hub: HubProcess) -> None:
        self.hub = hub
        self._nursery = nursery
        self._ready_again: dict[ManagedProcess, str] = {}
        self.processes: list[ManagedProcess] = []

    async def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        ready: str,
        ready_again: str | None = None,
        timeout: float = STARTUP_TIMEOUT,
    ) -> ManagedProcess:
        """Start ``command`` and wait for a log line matching ``ready`` (``ready_again``, if
        given, is what a restart waits for instead)."""
        process = ManagedProcess(name, list(command))
        self.processes.append(process)
        self._ready_again[process] = ready_again or ready
        await process.start(self._nursery)
        await process.wait_for_line(ready, timeout=timeout)
        return process

    async def device(
        self,
        kind: str,
        device_id: str,
        *args: str,
        socket: str | None = None,
        nofile: int | None = None,
    ) -> ManagedProcess:
        """A device daemon registered with the hub (through ``socket`` if given)."""
        command = msixhub_command(
            "spawn", kind, "--id", device_id, "--socket", socket or self.hub.socket, *args
        )
        return await self.start(
            device_id,
            [*(limit_prefix(nofile=nofile) if nofile else []), *command],
            ready=f"{re.escape(device_id)} registered",
            ready_again=RESTARTED,
        )

    async def vmm(
        self,
        *devices: str,
        name: str = "vm0",
        socket: str | None = None,
        kick_interval: float | None = None,
    ) -> ManagedProcess:
        """A VMM process (``msixhub.testing.vmm_process``) with ``devices`` attached."""
        command = [
            sys.executable,
            "-m",
            "msixhub.testing.vmm_process",
            "--socket",
            socket or self.hub.socket,
            "--name",
            name,
        ]
        if kick_interval:
            command += ["--kick-interval", str(kick_interval)]
        ready = re.escape(READY.format(name=name))
        return await self.start(name, [*command, *devices], ready=ready)

    async def restart(self, process: ManagedProcess, *, ready: str | None = None) -> None:
        """Kill ``process`` if it runs, start it again, wait until it is ready again."""
        await restart(process, self._nursery, ready=ready or self._ready_again[process])

    async def aclose(self) -> None:
        for process in reversed(self.processes):
            await process.stop()


@pytest.fixture
async def msixhub_processes(hub: HubProcess) -> AsyncIterator[Processes]:
    async with trio.open_nursery() as nursery:
        processes = Processes(nursery, hub)
        try:
            yield processes
        finally:
            with trio.CancelScope(shield=True):
                await processes.aclose()
            nursery.cancel_scope.cancel()


@pytest.fixture
def start_device(msixhub_processes: Processes) -> DeviceStarter:
    return msixhub_processes.device


class VmmConnector:
    """``await connect_vmm(...)``: a VmmClient connected for the rest of the test."""

    def __init__(self, nursery: trio.Nursery, hub: HubProcess) -> None:
        self._nursery = nursery
        self._hub = hub

    async def __call__(
        self, *, name: str = "vm0", socket: str | None = None, request_timeout: float = 10.0
    ) -> VmmClient:
        manager = connect(socket or self._hub.socket, name=name, request_timeout=request_timeout)
        client: VmmClient = await self._nursery.start(_hold, manager)
        return client


@pytest.fixture
async def connect_vmm(hub: HubProcess, msixhub_leak_guard: None) -> AsyncIterator[VmmConnector]:
    async with trio.open_nursery() as nursery:
        yield VmmConnector(nursery, hub)
        nursery.cancel_scope.cancel()


class ProxyFactory:
    """``await fault_proxy(rules)``: a FaultProxy in front of the hub for the rest of the test.
    The n-th proxy of a test is seeded with the test's seed + n."""

    def __init__(self, nursery: trio.Nursery, hub: HubProcess, directory: Path, seed: int) -> None:
        self._nursery = nursery
        self._hub = hub
        self._directory = directory
        self._seed = seed
        self._count = itertools.count()

    async def __call__(
        self, rules: Sequence[FaultRule] = (), *, upstream: str | None = None
    ) -> FaultProxy:
        n = next(self._count)
        proxy = FaultProxy(
            upstream or self._hub.socket,
            self._directory / f"proxy{n}.sock",
            rules,
            seed=self._seed + n,
        )
        await self._nursery.start(proxy.serve)
        return proxy


@pytest.fixture(name="fault_proxy")
async def fault_proxy_factory(
    hub: HubProcess, tmp_path: Path, msixhub_seed: int
) -> AsyncIterator[ProxyFactory]:
    async with trio.open_nursery() as nursery:
        yield ProxyFactory(nursery, hub, tmp_path, msixhub_seed)
        nursery.cancel_scope.cancel()
