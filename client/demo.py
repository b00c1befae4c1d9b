"""``msixhub demo``: the whole system in half a minute, checking itself as it goes.

A hub is started with a config that spawns virtio-blk (on a temporary image) and virtio-rng
as supervised daemons; this process is the VMM with a pretend guest. It writes and reads
back data, reads entropy, masks the blk queue's vector to show the pending bit and its one
delivery on unmask, then SIGKILLs the blk daemon with requests in flight and shows each
completed exactly once after the hub restarted it. Exit status 0 only if every check passed;
nothing is left behind (processes, sockets, files).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from msixhub.client.admin import fetch_status
from msixhub.client.guest import Guest
from msixhub.client.virtio_driver import BlkDriver
from msixhub.client.vmm import AttachedDevice, VmmClient, connect
from msixhub.testing.processes import ManagedProcess, msixhub_command

IMAGE_SIZE = 16 << 20
SECTOR = 512
TIMEOUT = 25.0


@dataclass(slots=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(slots=True)
class CheckList:
    """Pass/fail checks, each printed as it is made: the report of the demo, of ``msixhub
    chaos`` and of the QEMU interoperability check."""

    checks: list[Check] = field(default_factory=list, kw_only=True)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def check(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append(Check(name, passed, detail))
        self.say(f"  [{'ok' if passed else 'FAIL'}] {name}: {detail}")
        return passed

    def check_nothing_left_behind(self, pids: set[int], socket_path: Path) -> bool:
        """After the hub stopped: none of ``pids`` (hub and daemons) alive, socket gone."""
        left = sorted(pid for pid in pids if _alive(pid))
        return self.check(
            "nothing left behind",
            not left and not socket_path.exists(),
            f"processes left {left or 'none'}, socket removed: {not socket_path.exists()}",
        )


DeviceEntry = tuple[str, str, list[str]]  # kind, id, daemon arguments


def spawning_hub_config(socket_path: Path, devices: Sequence[DeviceEntry]) -> str:
    """A hub config (TOML) whose hub spawns and supervises ``devices``. Paths and arguments
    are quoted with JSON's escapes, which TOML's basic strings share (quotes, backslashes)."""
    text = f'[hub]\nsocket = {json.dumps(str(socket_path))}\nroute_policy = "static"\n'
    for kind, device_id, args in devices:
        text += f'\n[[device]]\nkind = "{kind}"\nid = "{device_id}"\nargs = {json.dumps(args)}\n'
    return text


async def wait_until_registered(hub: ManagedProcess, device_ids: Sequence[str]) -> None:
    """Wait until the hub listens and each of the daemons it spawned registered."""
    await hub.wait_for_line("hub listening")
    for device_id in device_ids:
        await hub.wait_for_line(rf"device {re.escape(device_id)} \(\S+\) registered")


@dataclass(slots=True)
class DemoReport(CheckList):
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


async def run_demo(report: DemoReport, seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="msixhub-demo-") as tmp:
        directory = Path(tmp)
        image = directory / "disk.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        socket_path = directory / "hub.sock"
        config = directory / "hub.toml"
        devices = [("virtio-blk", "blk0", ["--image", str(image)]), ("virtio-rng", "rng0", [])]
        config.write_text(spawning_hub_config(socket_path, devices))
        hub = ManagedProcess("hub", msixhub_command("serve", "--config", str(config)))
        daemon_pids: set[int] = set()
        async with trio.open_nursery() as nursery:
            await hub.start(nursery)
            try:
                with trio.fail_after(TIMEOUT):
                    await wait_until_registered(hub, ["blk0", "rng0"])
                    print(f"hub pid {hub.pid}: blk0 and rng0 spawned and registered", flush=True)
                    async with (
                        connect(str(socket_path), name="demo-vm") as vm,
                        Guest.open(vm) as guest,
                    ):
                        await _exercise(
                            report,
                            vm,
                            guest,
                            str(socket_path),
                            hub,
                            daemon_pids,
                            random.Random(seed),
                        )
            except Exception as exc:
                report.check("the demo ran to the end", False, f"{type(exc).__name__}: {exc}")
                print(hub.log_tail(20))
            finally:
                with trio.CancelScope(shield=True):
                    await hub.stop()
                nursery.cancel_scope.cancel()
        report.check_nothing_left_behind(daemon_pids | {hub.pid}, socket_path)


async def _exercise(
    report: DemoReport,
    vm: VmmClient,
    guest: Guest,
    socket_path: str,
    hub: ManagedProcess,
    daemon_pids: set[int],
    rng: random.Random,
) -> None:
    blk = await guest.blk("blk0")
    plan = guest.drivers["blk0"].plan
    report.facts["blk_vectors"] = {"config": plan.config, "queues": list(plan.queues)}
    data = rng.randbytes(64 << 10)
    await blk.write(2048, data)
    back = await blk.read(2048, len(data))
    report.check(
        "virtio-blk write then read back", back == data, f"{len(data)} bytes at sector 2048"
    )
    ident = await blk.get_id()
    report.check("virtio-blk GET_ID", ident.startswith(b"msixhub"), repr(ident))

    entropy = await (await guest.rng("rng0")).read(64)
    report.check(
        "virtio-rng entropy", len(entropy) == 64 and len(set(entropy)) > 8, f"{len(entropy)} bytes"
    )

    await _mask_demo(report, vm.devices["blk0"], blk, plan.queues[0])
    await _kill_demo(report, blk, socket_path, hub, daemon_pids, rng)
    report.check(
        "the guest's rings stayed consistent",
        not guest.misbehaviour,
        "; ".join(guest.misbehaviour) or "no duplicate or unknown used entries",
    )


async def _mask_demo(
    report: DemoReport, device: AttachedDevice, blk: BlkDriver, vector: int
) -> None:
    """Mask the queue's vector, complete a request behind it, show PBA, unmask."""
    layout = device.info.msix
    control = layout.table_offset + vector * 16 + 12
    pba = layout.pba_offset + (vector // 64) * 8
    bit = 1 << (vector % 64)
    before = device.interrupts[vector]
    await device.mmio_write(layout.bar, control, 4, 1)  # mask, as a guest OS would
    done = trio.Event()

    async def read() -> None:
        await blk.read(0, 4096)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        # The guest polls the PBA, as a driver with the vector masked would.
        pending = await _poll(lambda: device.mmio_read(layout.bar, pba, 8), lambda v: bool(v & bit))
        report.check(
            "masked vector: the completion sets the pending bit",
            pending and not done.is_set() and device.interrupts[vector] == before,
            f"vector {vector} PBA bit set, request not yet seen by the guest",
        )
        await device.mmio_write(layout.bar, control, 4, 0)  # unmask
        with trio.fail_after(5):
            await done.wait()
    cleared = not (await device.mmio_read(layout.bar, pba, 8)) & bit
    delivered = device.interrupts[vector] - before
    report.check(
        "unmask delivers the pending interrupt exactly once",
        delivered == 1 and cleared,
        f"{delivered} interrupt on vector {vector}, PBA bit clear: {cleared}",
    )


async def _kill_demo(
    report: DemoReport,
    blk: BlkDriver,
    socket_path: str,
    hub: ManagedProcess,
    daemon_pids: set[int],
    rng: random.Random,
) -> None:
    """SIGKILL the blk daemon with writes in flight; each completes exactly once."""
    status = await fetch_status(socket_path)
    pid = next(d["pid"] for d in status["devices"] if d["id"] == "blk0")
    daemon_pids.update(d["pid"] for d in status["devices"] if d["pid"])
    requests = 48
    chunk = 64 << 10
    expected = {i: rng.randbytes(chunk) for i in range(requests)}
    completions: Counter[int] = Counter()
    enough_done = trio.Event()
    mark = hub.line_count

    async def write(i: int) -> None:
        await blk.write(8192 + i * (chunk // SECTOR), expected[i])
        completions[i] += 1
        if completions.total() >= 8:
            enough_done.set()

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(requests):
            nursery.start_soon(write, i)
        with trio.fail_after(10):
            await enough_done.wait()
        in_flight = requests - completions.total()
        os.kill(pid, signal.SIGKILL)
        print(
            f"SIGKILL blk0 daemon (pid {pid}) with {in_flight} of {requests} writes in flight",
            flush=True,
        )
        with trio.fail_after(20):
            await hub.wait_for_line("device blk0 .*re-registered", after=mark)
    elapsed = time.monotonic() - started
    report.facts["writes_in_flight_at_kill"] = in_flight
    once = all(completions[i] == 1 for i in range(requests))
    report.check(
        "SIGKILL mid-I/O: every request completed exactly once",
        once and in_flight > 0,
        f"{requests} writes, {in_flight} in flight at the kill, all done once in {elapsed:.2f}s",
    )
    intact = True
    for i in range(requests):
        intact &= await blk.read(8192 + i * (chunk // SECTOR), chunk) == expected[i]
    status = await fetch_status(socket_path)
    blk0 = next(d for d in status["devices"] if d["id"] == "blk0")
    daemon_pids.update(d["pid"] for d in status["devices"] if d["pid"])
    report.check(
        "after the restart the data is intact and the daemon serves",
        intact and blk0["registrations"] == 2 and blk0["pid"] != pid,
        f"new pid {blk0['pid']}, registrations {blk0['registrations']}, all {requests} chunks verified",
    )


async def _poll(read: Callable[[], Any], ready: Callable[[int], bool], limit: float = 5.0) -> bool:
    with trio.move_on_after(limit):
        while not ready(await read()):
            await trio.sleep(0.001)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data written")


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"msixhub demo (seed {seed})", flush=True)
    report = DemoReport()
    report.facts["seed"] = seed
    started = time.monotonic()
    trio.run(run_demo, report, seed)
    report.seconds = round(time.monotonic() - started, 2)
    passed = sum(c.passed for c in report.checks)
    print(
        f"{passed}/{len(report.checks)} checks passed in {report.seconds}s: {'PASS' if report.passed else 'FAIL'}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "passed": report.passed,
                    "seconds": report.seconds,
                    "facts": report.facts,
                    "checks": [asdict(c) for c in report.checks],
                }
            )
        )
    return 0 if report.passed else 1
