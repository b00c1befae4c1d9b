"""Fuzzing the hub's message handling (``msixhub.testing.fuzz``): a short run here, a long one
with ``python -m msixhub.testing.fuzz --seconds 600``. ``MSIXHUB_FUZZ_EXAMPLES=N`` makes the
in-suite run longer.

Each case: structured frames or raw bytes from a device or a VMM, fds attached at random;
the hub answers every request it must (the protocol's decoder says which) or closes that
connection cleanly, then answers a status query on a fresh connection; in process, no fd
survives the hub's shutdown; across processes, the hub's fd count returns to its baseline.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from msixhub.protocol.connection import Connection
from msixhub.protocol.errors import ConnectionClosed
from msixhub.protocol.fds import OwnedFd, close_all, memfd
from msixhub.protocol.messages import Region, SetMemTable
from msixhub.protocol.peer import connect_unix, open_peer
from msixhub.protocol.transport import Transport
from msixhub.server.serve import bind_unix
from msixhub.testing.faults import fd_targets
from msixhub.testing.fuzz import (
    REQUEST,
    Case,
    FuzzFailure,
    Send,
    cases,
    check_in_process,
    expectation,
    frame,
    run_case,
    status_answers,
)
from msixhub.testing.processes import msixhub_command

EXAMPLES = int(os.environ.get("MSIXHUB_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(autouse=True)
def _quiet_hub() -> Iterator[None]:
    """The hub logs every refusal; thousands of warnings would only slow the run down."""
    logger = logging.getLogger("msixhub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


# --- in process ------------------------------------------------------------------------------


@FUZZ
@given(cases(role="device", shape="sound"))
def test_sound_frames_from_a_device_are_each_answered(case: Case) -> None:
    check_in_process(case)


@FUZZ
@given(cases(role="vmm", shape="sound"))
def test_sound_frames_from_a_vmm_are_each_answered(case: Case) -> None:
    check_in_process(case)


@FUZZ
@given(cases(shape="structured"))
def test_frames_that_may_break_the_stream(case: Case) -> None:
    check_in_process(case)


@FUZZ
@given(cases(shape="raw"))
def test_raw_and_damaged_streams(case: Case) -> None:
    check_in_process(case)


def test_the_model_predicts_answers_and_breaks() -> None:
    """The oracle itself: a sound request is owed an answer; a bad envelope breaks."""
    ping = Send(frame([REQUEST, 5, "ping", {}], 0))
    unknown = Send(frame([REQUEST, 6, "no-such-op", {}], 0))
    wrong_fds = Send(frame([REQUEST, 7, "ping", {}], 1), ("eventfd",))
    bad_id = Send(frame([REQUEST, 0, "ping", {}], 0))
    case = Case("vmm", False, "static", 4096, True, (ping, unknown, wrong_fds))
    sound = expectation(case)
    assert dict(sound.answers) == {5: 1, 6: 1, 7: 1} and not sound.broken
    assert expectation(Case("vmm", False, "static", 4096, True, (ping, bad_id))).broken


@asynccontextmanager
async def fake_hub(path: Path, behaviour: str) -> AsyncIterator[str]:
    """A hub that breaks the contract: it handshakes, then never answers ('silent') or
    closes at the first frame ('closes')."""

    async def serve(listener: trio.socket.SocketType) -> None:
        sock, _ = await listener.accept()
        transport = Transport(sock)
        try:
            await transport.send(Connection("admin").hello())
            data, fds = await transport.receive()  # the client's hello
            while behaviour == "silent" and data:
                close_all([OwnedFd(fd) for fd in fds])
                data, fds = await transport.receive()
        finally:
            await transport.aclose()

    listener = await bind_unix(str(path))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, listener)
            yield str(path)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("behaviour", "complaint"),
    [("silent", "left unanswered"), ("closes", "closed a sound connection")],
)
async def test_a_hub_that_breaks_the_contract_is_caught(
    tmp_path: Path, behaviour: str, complaint: str
) -> None:
    case = Case("vmm", False, "static", 4096, True, (Send(frame([REQUEST, 5, "ping", {}], 0)),))
    async with fake_hub(tmp_path / "fake.sock", behaviour) as path:
        with pytest.RaisesGroup(
            pytest.RaisesExc(FuzzFailure, match=complaint), flatten_subgroups=True
        ):
            await run_case(path, case, timeout=0.5)


# --- across processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class HubUnderFuzz:
    pid: int
    socket: str
    log: Path
    baseline: int


async def _settled_fd_count(pid: int, target: int | None = None, timeout: float = 5.0) -> int:
    """The hub's fd count once it stops changing (or reaches ``target``)."""
    with trio.fail_after(timeout):
        previous = -1
        while True:
            count = len(fd_targets(pid))
            if count == target or (target is None and count == previous):
                return count
            previous = count
            await trio.sleep(0.02)


async def _wait_ready(pid: int, socket: str) -> int:
    with trio.fail_after(15):
        while True:
            try:
                await status_answers(socket)
                break
            except ConnectionClosed:  # not listening yet
                await trio.sleep(0.05)
    return await _settled_fd_count(pid)


@pytest.fixture(scope="module")
def hub_under_fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubUnderFuzz]:
    directory = tmp_path_factory.mktemp("fuzzhub")
    socket, log = directory / "hub.sock", directory / "hub.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            msixhub_command("serve", "--socket", str(socket)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        baseline = trio.run(_wait_ready, process.pid, str(socket))
        yield HubUnderFuzz(process.pid, str(socket), log, baseline)
        assert process.poll() is None, f"the hub died:\n{log.read_text()[-3000:]}"
        assert "Traceback" not in log.read_text()
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@settings(
    max_examples=max(10, EXAMPLES // 2),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases(role="vmm", setup=False))
def test_hub_process_survives_and_keeps_no_fd(hub_under_fuzz: HubUnderFuzz, case: Case) -> None:
    trio.run(_check_process, hub_under_fuzz, case)


async def _check_process(hub: HubUnderFuzz, case: Case) -> None:
    await run_case(hub.socket, case)
    await status_answers(hub.socket)
    try:
        await _settled_fd_count(hub.pid, hub.baseline)
    except trio.TooSlowError:
        raise FuzzFailure(
            f"the hub holds {len(fd_targets(hub.pid))} fds, {hub.baseline} before the case"
        ) from None


def test_the_fd_check_sees_a_held_fd(hub_under_fuzz: HubUnderFuzz) -> None:
    """A VMM that stays connected after set_mem_table: the hub holds its memory fd."""

    async def main() -> None:
        transport = await connect_unix(hub_under_fuzz.socket)
        async with open_peer(transport, "vmm", name="holder") as peer:
            with memfd(4096) as memory:
                await peer.call(SetMemTable([Region(0, 4096, 0)]), [memory.fileno()])
            held = await _settled_fd_count(hub_under_fuzz.pid)
            assert held == hub_under_fuzz.baseline + 2  # the connection and the memory
        await _settled_fd_count(hub_under_fuzz.pid, hub_under_fuzz.baseline)

    trio.run(main)
