"""Numbers on msixhub's command lines: a bad one is a usage error naming the range, before
anything starts; a daemon that cannot reach the hub or open its image says so in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from msixhub.devices.cli_args import float_in, int_in, power_of_two_up_to


def test_int_in_takes_the_range_and_prefixes() -> None:
    parse = int_in(1, 64, "vector count")
    assert [parse("1"), parse("64"), parse("0x10")] == [1, 64, 16]
    for bad, message in [("0", "1..64, not 0"), ("65", "not 65"), ("x", "not an integer")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(bad)


def test_float_in_refuses_nan_and_out_of_range() -> None:
    parse = float_in(0.05, 3600, "seconds")
    assert parse("0.5") == 0.5
    for bad in ("nan", "-1", "3601", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_power_of_two_up_to() -> None:
    parse = power_of_two_up_to(32768, "queue size")
    assert [parse("1"), parse("256"), parse("32768")] == [1, 256, 32768]
    for bad in ("3", "0", "65536"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def _msixhub(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msixhub.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_bad_queue_size_is_a_usage_error(tmp_path: Path) -> None:
    done = _msixhub("spawn", "virtio-blk", "--image", str(tmp_path / "x"), "--queue-size", "3")
    assert done.returncode == 2
    assert "queue size must be a power of two, not 3" in done.stderr


def test_a_daemon_that_cannot_reach_the_hub_says_so_in_one_line(tmp_path: Path) -> None:
    done = _msixhub("spawn", "testdev", "--socket", str(tmp_path / "no-hub.sock"))
    assert done.returncode == 1
    assert "cannot connect to" in done.stderr and "Traceback" not in done.stderr
