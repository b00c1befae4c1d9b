"""A VMM as a process of its own, so that tests can kill it, stop it and restart it:
``python -m msixhub.testing.vmm_process --socket HUB [--name vm0] DEVICE...``.

It adds guest memory, attaches each device (testdevs: it drives their registers), sets every
vector up as a driver would (``Testdev.setup``: message, use, unmask, MSI-X enabled), logs
``vmm NAME ready`` and then
one line per event (``irq DEVICE VECTOR COUNT``, ``intx DEVICE LEVEL``, ``device DEVICE
STATE``). With ``--kick-interval S`` it kicks queue 0 of each device every S seconds (a
steady interrupt load: a testdev answers a kick by notifying a vector).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio
from msixhub.client.vmm import (
    AttachedDevice,
    DeviceEvent,
    Interrupt,
    IntxEvent,
    VmmClient,
    connect,
)
from msixhub.testing.system import Testdev

READY = "vmm {name} ready"

log = logging.getLogger("msixhub.vmm_process")


async def _log_events(vm: VmmClient) -> None:
    async for event in vm.events():
        if isinstance(event, Interrupt):
            log.info("irq %s %d %d", event.device, event.vector, event.count)
        elif isinstance(event, IntxEvent):
            log.info("intx %s %d", event.device, int(event.level))
        elif isinstance(event, DeviceEvent):
            log.info("device %s %s", event.device, event.state)


async def _kick(devices: list[AttachedDevice], interval: float) -> None:
    while True:
        for device in devices:
            if device.kicks:
                device.kick(0)
        await trio.sleep(interval)


async def run(args: argparse.Namespace) -> None:
    async with connect(args.socket, name=args.name) as vm:
        await vm.add_memory(args.memory)
        devices = [await vm.attach(device_id) for device_id in args.devices]
        for device in devices:
            await Testdev(device).setup(range(device.info.num_vectors))
        log.info(READY.format(name=args.name))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_log_events, vm)
            if args.kick_interval:
                nursery.start_soon(_kick, devices, args.kick_interval)
            await vm.peer.closed.wait()
            log.warning("hub connection closed: %s", vm.peer.close_reason)
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msixhub.testing.vmm_process")
    parser.add_argument("--socket", required=True, help="the hub's (or a proxy's) unix socket")
    parser.add_argument("--name", default="vm0")
    parser.add_argument("--memory", type=int, default=1 << 20, help="guest RAM bytes")
    parser.add_argument("--kick-interval", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("devices", nargs="*", metavar="DEVICE")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.name}[%(process)d] %(message)s"
    )
    trio.run(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
