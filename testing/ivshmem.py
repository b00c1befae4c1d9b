"""ivshmem peers for tests and benchmarks: the guest's driver for an ivshmem device, and a
peer's VMM as a process of its own, driven over its stdin and stdout, so that several peers
run in several processes and one can be killed for real.

    python -m msixhub.testing.ivshmem --socket HUB [--name vm1] [--no-msix] DEVICE

The process attaches DEVICE, sets every vector up as a guest driver would (``setup``), prints
``{"ready": PEER_ID}``, then one JSON object per line: each event it receives
(``{"event": "irq", "vector", "count", "address", "data"}``, ``{"event": "peer", "peer_id",
"joined"}``, ``{"event": "intx", "level"}``, ``{"event": "device", "state"}``), and the answer
to each command it reads from stdin, in order (``{"reply": VALUE}`` or ``{"error": TEXT}``).
Commands are JSON objects: ``ring`` (peer, vector), ``read`` (bar, offset, size), ``write``
(bar, offset, size, value), ``mask`` (vector, masked), ``pending`` (vector), ``control``
(value), ``shm_write`` (offset, hex), ``shm_read`` (offset, length), ``doorbells`` (the
datamatches of its ioeventfds), ``counts`` (notifications per vector).

``remote_vmm`` starts one and yields the test's handle, ``RemoteVmm``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from msixhub.client.msix_guest import MSIX_ENABLE, pba_pending, program_vector, set_vector_mask
from msixhub.client.vmm import (
    AttachedDevice,
    DeviceEvent,
    Event,
    Interrupt,
    IntxEvent,
    PeerEvent,
    VmmClient,
    connect,
)
from msixhub.devices.ivshmem.regs import Doorbell, Register
from msixhub.testing.processes import STARTUP_TIMEOUT, HubProcess, ManagedProcess
from msixhub.testing.system import EVENT_TIMEOUT, message_of

SHARED_MEMORY_BAR = 2

log = logging.getLogger("msixhub.testing.ivshmem")


class IvshmemGuest:
    """What a guest's ivshmem driver does, through an ``AttachedDevice``."""

    def __init__(self, device: AttachedDevice) -> None:
        self.device = device

    async def setup(self, *, masked: bool = False, msix: bool = True) -> None:
        """Program every vector with ``message_of(v)`` (masked or not); enable MSI-X."""
        for vector in range(self.device.info.num_vectors):
            address, data = message_of(vector)
            await program_vector(self.device, vector, address, data, masked=masked)
        if msix:
            await self.device.msix_control_write(MSIX_ENABLE)

    async def position(self) -> int:
        """IVPosition: our peer id (0xFFFFFFFF while not a peer)."""
        return await self.device.mmio_read(0, Register.IV_POSITION, 4)

    async def ring(self, peer: int, vector: int) -> None:
        await self.device.mmio_write(0, Register.DOORBELL, 4, Doorbell(peer, vector).encode())

    async def set_intr_mask(self, mask: int) -> None:
        await self.device.mmio_write(0, Register.INTR_MASK, 4, mask)

    async def intr_status(self) -> int:
        """IntrStatus (the read clears it)."""
        return await self.device.mmio_read(0, Register.INTR_STATUS, 4)

    def doorbells(self) -> list[int]:
        """The Doorbell values this VMM rings by itself (its ioeventfds), sorted."""
        return sorted(
            datamatch
            for (bar, offset, size, datamatch) in self.device.ioeventfds
            if (bar, offset, size) == (0, Register.DOORBELL, 4) and datamatch is not None
        )

    @property
    def shared_memory(self) -> memoryview:
        return memoryview(self.device.bar_memory[SHARED_MEMORY_BAR])


def event_json(event: Event) -> dict[str, Any]:
    if isinstance(event, Interrupt):
        return {
            "event": "irq",
            "vector": event.vector,
            "count": event.count,
            "address": event.address,
            "data": event.data,
        }
    if isinstance(event, PeerEvent):
        return {"event": "peer", "peer_id": event.peer_id, "joined": event.joined}
    if isinstance(event, IntxEvent):
        return {"event": "intx", "level": event.level}
    assert isinstance(event, DeviceEvent)
    return {"event": "device", "state": event.state}


# --- the process -----------------------------------------------------------------------------


async def _command(guest: IvshmemGuest, command: dict[str, Any]) -> object:
    device = guest.device
    op = command["op"]
    if op == "ring":
        await guest.ring(command["peer"], command["vector"])
        return None
    if op == "read":
        return await device.mmio_read(command["bar"], command["offset"], command["size"])
    if op == "write":
        await device.mmio_write(
            command["bar"], command["offset"], command["size"], command["value"]
        )
        return None
    if op == "mask":
        await set_vector_mask(device, command["vector"], command["masked"])
        return None
    if op == "pending":
        return await pba_pending(device, command["vector"])
    if op == "control":
        await device.msix_control_write(command["value"])
        return None
    if op == "shm_write":
        data = bytes.fromhex(command["hex"])
        guest.shared_memory[command["offset"] : command["offset"] + len(data)] = data
        return None
    if op == "shm_read":
        offset = command["offset"]
        return bytes(guest.shared_memory[offset : offset + command["length"]]).hex()
    if op == "doorbells":
        return guest.doorbells()
    if op == "counts":
        return list(device.notifications)
    raise ValueError(f"unknown command {op!r}")


async def _serve(args: argparse.Namespace) -> None:
    out_send, out_receive = trio.open_memory_channel[dict[str, Any]](math.inf)
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))

    async def write_lines() -> None:
        async for line in out_receive:
            await stdout.send_all(json.dumps(line).encode() + b"\n")

    async def forward_events(vm: VmmClient) -> None:
        async for event in vm.events():
            out_send.send_nowait(event_json(event))

    async def run_commands(guest: IvshmemGuest) -> None:
        pending = b""
        while chunk := await stdin.receive_some():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                try:
                    out_send.send_nowait({"reply": await _command(guest, json.loads(line))})
                except Exception as exc:  # the test sees why, and the peer stays up
                    out_send.send_nowait({"error": f"{type(exc).__name__}: {exc}"})

    async with stdout, stdin, trio.open_nursery() as nursery:
        nursery.start_soon(write_lines)
        async with connect(args.socket, name=args.name) as vm:
            guest = IvshmemGuest(await vm.attach(args.device))
            await guest.setup(msix=args.msix)
            nursery.start_soon(forward_events, vm)
            out_send.send_nowait({"ready": await guest.position()})
            await run_commands(guest)  # until stdin closes
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msixhub.testing.ivshmem")
    parser.add_argument("--socket", required=True, help="the hub's unix socket")
    parser.add_argument("--name", default="vm")
    parser.add_argument("--no-msix", dest="msix", action="store_false", help="INTx mode")
    parser.add_argument("device")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.name}[%(process)d] %(message)s"
    )
    trio.run(_serve, args)
    return 0


# --- the test's handle -----------------------------------------------------------------------


class RemoteVmm(ManagedProcess):
    """A ``python -m msixhub.testing.ivshmem`` process; ``call`` runs one command."""

    def __init__(self, name: str, command: list[str]) -> None:
        super().__init__(name, command)
        self.peer_id = -1
        self._replies_in, self._replies = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._events_in, self._events = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._lock = trio.Lock()

    async def start(self, nursery: trio.Nursery) -> None:
        self.process = await trio.lowlevel.open_process(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        nursery.start_soon(self._drain_stderr)
        nursery.start_soon(self._read_stdout)
        with trio.fail_after(STARTUP_TIMEOUT):
            ready = await self._replies.receive()
        if "ready" not in ready:
            raise RuntimeError(f"{self.name} did not start: {ready}\n{self.log_tail()}")
        self.peer_id = ready["ready"]

    async def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        pending = b""
        async with self.process.stdout, self._replies_in, self._events_in:
            async for chunk in self.process.stdout:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    target = self._events_in if "event" in message else self._replies_in
                    target.send_nowait(message)

    async def call(self, op: str, *, timeout: float = EVENT_TIMEOUT, **args: Any) -> Any:
        assert self.process is not None and self.process.stdin is not None
        async with self._lock:
            with trio.fail_after(timeout):
                await self.process.stdin.send_all(json.dumps({"op": op, **args}).encode() + b"\n")
                answer = await self._replies.receive()
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {op} failed: {answer['error']}")
        return answer["reply"]

    async def ring(self, peer: int, vector: int) -> None:
        await self.call("ring", peer=peer, vector=vector)

    async def next_event(self, *, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        with trio.fail_after(timeout):
            return await self._events.receive()

    async def next_irq(self, *, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        event = await self.next_event(timeout=timeout)
        if event["event"] != "irq":
            raise AssertionError(f"{self.name}: expected an interrupt, got {event}")
        return event

    async def wait_for_peer(self, peer_id: int, joined: bool) -> None:
        """Skip events until the one saying ``peer_id`` joined (or left)."""
        expected = {"event": "peer", "peer_id": peer_id, "joined": joined}
        while await self.next_event() != expected:
            pass

    def queued_events(self) -> int:
        return self._events.statistics().current_buffer_used


@asynccontextmanager
async def remote_vmm(
    hub: HubProcess, device_id: str, *, name: str = "", msix: bool = True
) -> AsyncIterator[RemoteVmm]:
    """A VMM process that attached ``device_id`` and set it up; killed when the block ends."""
    command = [
        sys.executable,
        "-m",
        "msixhub.testing.ivshmem",
        "--socket",
        hub.socket,
        "--name",
        name or f"vm-{device_id}",
        *([] if msix else ["--no-msix"]),
        device_id,
    ]
    vmm = RemoteVmm(name or f"vm-{device_id}", command)
    async with trio.open_nursery() as nursery:
        await vmm.start(nursery)
        try:
            yield vmm
        finally:
            with trio.CancelScope(shield=True):
                await vmm.stop()
                assert vmm.process is not None and vmm.process.stdin is not None
                await vmm.process.stdin.aclose()
            nursery.cancel_scope.cancel()


def ring_values(peers: Iterable[int], vectors: int) -> list[int]:
    """The Doorbell values that ring each vector of each of ``peers``, sorted."""
    return sorted(Doorbell(p, v).encode() for p in peers for v in range(vectors))


if __name__ == "__main__":
    sys.exit(main())
