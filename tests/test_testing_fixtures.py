"""The pytest plugin, run for real in a pytest of its own: a failing test's report names its
seed, its hub and daemons are gone afterwards, and the leak guard catches an fd or a child
process that a test left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from msixhub.testing.faults import FaultError, process_state
from msixhub.testing.seeds import SEED_ENV, derive_seed, run_seed

INNER = """
import os, subprocess
from pathlib import Path

CHILDREN = []  # referenced, so that only the guard notices the child

async def test_fails_with_processes_running(hub, start_device, msixhub_seed):
    device = await start_device("testdev", "dev0")
    Path(os.environ["INNER_OUT"]).write_text(f"{hub.pid} {device.pid} {msixhub_seed}")
    assert False, "on purpose"

def test_leaks_an_fd(msixhub_leak_guard):
    os.pipe()

def test_leaks_a_child(msixhub_leak_guard):
    CHILDREN.append(subprocess.Popen(["sleep", "60"]))
"""


async def run_inner(directory: Path, *args: str, env: dict[str, str]) -> str:
    (directory / "test_inner.py").write_text(INNER)
    (directory / "pytest.ini").write_text("[pytest]\ntrio_mode = true\nfilterwarnings = error\n")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "msixhub.testing.fixtures",
        "-p",
        "no:cacheprovider",
        *args,
        "test_inner.py",
    ]
    with trio.fail_after(60):
        result = await trio.run_process(
            command,
            cwd=directory,
            env={**os.environ, **env, "INNER_OUT": str(directory / "out.txt")},
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
    return result.stdout.decode()


def gone(pid: int) -> bool:
    try:
        return process_state(pid) == "Z"  # a zombie has been killed, only not reaped yet
    except FaultError:
        return True


async def test_failing_test_reports_its_seed_and_leaves_nothing(tmp_path: Path) -> None:
    output = await run_inner(tmp_path, "--msixhub-seed", "1234", env={})
    hub_pid, device_pid, seed = map(int, (tmp_path / "out.txt").read_text().split())
    assert seed == derive_seed(1234, "test_inner.py::test_fails_with_processes_running")
    assert "msixhub seed" in output
    assert f"this test's seed {seed}; reproduce with --msixhub-seed 1234" in output
    assert gone(hub_pid) and gone(device_pid)
    assert "fd " in output and "was left open" in output
    assert "child process" in output and "was still there (killed now)" in output
    assert "1 failed, 2 passed, 2 errors" in output


def test_run_seed_comes_from_the_option_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SEED_ENV, "99")
    assert run_seed(7) == 7
    assert run_seed(None) == 99
    monkeypatch.delenv(SEED_ENV)
    assert 0 <= run_seed(None) < 1 << 32


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(1, "a") == derive_seed(1, "a")
    assert len({derive_seed(1, "a"), derive_seed(2, "a"), derive_seed(1, "b")}) == 3
