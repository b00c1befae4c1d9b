"""``msixhub client``: its step grammar, and the command run for real (a hub and a testdev
daemon as processes, the command as a third) the way someone debugging a device would.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import trio
from msixhub.client.poke import Step, StepError, parse_steps
from msixhub.devices.testdev import NOTIFY, SENT, USE
from msixhub.testing.processes import HubProcess, device_process, hub_process, msixhub_command

COMMAND_TIMEOUT = 20.0


def test_steps_take_their_optional_argument_only_when_a_number_follows() -> None:
    steps = parse_steps(
        shlex.split(
            "info read 0 0x30 write 0 0 0x10000 8 read 1 64 8 msix 1 0xfee00000 65 "
            "mask 1 unmask 1 pba 1 enable disable control 0xc000 kick 0 wait wait 3"
        )
    )
    assert steps == [
        Step("info", ()),
        Step("read", (0, 0x30)),
        Step("write", (0, 0, 0x10000, 8)),
        Step("read", (1, 64, 8)),
        Step("msix", (1, 0xFEE00000, 65)),
        Step("mask", (1,)),
        Step("unmask", (1,)),
        Step("pba", (1,)),
        Step("enable", ()),
        Step("disable", ()),
        Step("control", (0xC000,)),
        Step("kick", (0,)),
        Step("wait", ()),
        Step("wait", (3,)),
    ]


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("", "no steps"),
        ("poke 0", "unknown step 'poke'"),
        ("read 0", "OFFSET is missing"),
        ("read 0 wait", "OFFSET is missing"),
        ("write 0 0 x10", "is not a number"),
        ("read 0 0 3", "SIZE must be one of"),
        ("write 0 0 0x100 1", "does not fit 1 bytes"),
        ("msix 0 0x1 0x100000000", "DATA 32 bits"),
        ("control 0x10000", "16 bits"),
        ("kick -1", "negative"),
    ],
)
def test_malformed_steps_are_refused(line: str, complaint: str) -> None:
    with pytest.raises(StepError, match=complaint):
        parse_steps(shlex.split(line))


async def client(
    hub: HubProcess, *args: str, wait_timeout: float = 5.0
) -> subprocess.CompletedProcess[bytes]:
    command = ["client", "--socket", hub.socket, "--timeout", str(wait_timeout), *args]
    with trio.fail_after(COMMAND_TIMEOUT):
        return await trio.run_process(
            msixhub_command(*command),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


async def test_program_notify_wait_and_read_in_one_invocation(tmp_path: Path) -> None:
    async with (
        hub_process(tmp_path) as hub,
        device_process(hub, "testdev", "dev0", "--vectors", "4"),
    ):
        steps = (
            f"info write 0 {USE} 2 msix 2 0xfee01000 0x42 enable "
            f"write 0 {NOTIFY} {2 | 1 << 16:#x} wait 1 read 0 {SENT} 8"
        )
        output = lines(await client(hub, "dev0", *shlex.split(steps)))
        assert output[0].startswith("dev0 (testdev): 4 vectors, 1 queues")
        assert output[1:] == [
            "interrupt dev0 vector 2 address 0xfee01000 data 0x42 count 1",
            f"bar0+{SENT:#x} = 0x1 (1)",
        ]


async def test_pending_bits_wait_in_the_hub_between_invocations(tmp_path: Path) -> None:
    async with (
        hub_process(tmp_path) as hub,
        device_process(hub, "testdev", "dev0", "--vectors", "4"),
    ):
        setup = shlex.split(f"write 0 {USE} 0 msix 0 0xfee00000 0x40 enable")
        notify = shlex.split(f"write 0 {NOTIFY} 0")  # returns once the device has notified
        assert lines(await client(hub, "dev0", *setup, "mask", "0", *notify, "pba", "0")) == [
            "vector 0 pending 1"
        ]
        # Detached (and function-masked) in between: the hub keeps the bit.
        assert lines(await client(hub, "dev0", "pba", "0")) == ["vector 0 pending 1"]
        # The next invocation that unmasks gets it, once.
        assert lines(await client(hub, "dev0", *setup, "wait", "1", "pba", "0")) == [
            "interrupt dev0 vector 0 address 0xfee00000 data 0x40 count 1",
            "vector 0 pending 0",
        ]


async def test_refusals_and_timeouts_exit_1(tmp_path: Path) -> None:
    async with (
        hub_process(tmp_path) as hub,
        device_process(hub, "testdev", "dev0", "--vectors", "4"),
    ):
        result = await client(hub, "nope", "info")
        assert result.returncode == 1
        assert result.stderr == b"msixhub client: not-found: no device 'nope'\n"
        result = await client(hub, "dev0", "read", "5", "0")
        assert result.returncode == 1 and b"bad-range" in result.stderr
        result = await client(hub, "dev0", "bogus")
        assert result.returncode == 2 and b"unknown step 'bogus'" in result.stderr
        result = await client(hub, "dev0", "wait", wait_timeout=0.2)  # nothing is enabled
        assert result.returncode == 1 and b"no more interrupts within 0.2 s" in result.stderr
