"""Interoperability with a real QEMU: an unmodified ``ivshmem-doorbell`` device joins
``msixhub ivshmem-server`` and the hub's QEMU-protocol socket, and talks to msixhub peers.

    python -m msixhub.testing.qemu_interop [--keep-logs]

No guest OS: QEMU runs with its qtest protocol on a unix socket (``-qtest unix:PATH``, QEMU
connects to our listener; docs/devel/qtest.rst), which lets this module act as the guest:
port I/O to 0xcf8/0xcfc for PCI config space, and physical memory reads and writes. It finds
the 1af4:1110 function, programs BAR0 (registers), BAR1 (MSI-X) and the 64-bit BAR2 (the
shared region) and enables memory decoding and bus mastering. QEMU is started with
``-accel qtest`` where the binary has that accelerator, else (Debian's build has none) with
``-accel tcg -S``: the vCPUs never leave their initial stop, and the main loop, the devices
and the qtest socket work the same.

Facts about QEMU 7.2's ivshmem-doorbell that the checks rely on (hw/misc/ivshmem.c):

* IVPosition reads the id from the server's greeting; a Doorbell write ``peer << 16 |
  vector`` writes that peer's eventfd for the vector (bits 0..7 only).
* The device always has the MSI feature: a ring of its own vector sends that MSI-X message,
  sets the vector's PBA bit while it is masked, and is *dropped* while MSI-X is disabled.
  IntrStatus is never set by a ring (only the long-gone ``ivshmem`` device with msi=off had
  INTx), so "INTx mode" does not exist on QEMU's side: the checks prove the drop, then
  deliver through MSI-X. The message of vector v is given an address in guest RAM, so the
  delivery is a 4-byte DMA write that qtest can read back.

The checks, for each server (``msixhub ivshmem-server`` with an msixhub-client peer that
speaks QEMU's protocol, then ``msixhub serve --ivshmem-socket`` with an msixhub VMM attaching
an ivshmem daemon): QEMU's handshake and peer id, shared memory both ways, doorbells both
ways (MSI-X delivery, masking and the pending bit), two QEMUs ringing each other, an msixhub
peer joining after QEMU, and SIGKILLed QEMUs seen leaving with the server unharmed and its
fd count back where it was. Where QEMU gives no event (it drops a ring, writes an MSI-X
message or sets a PBA bit silently), a bounded loop polls the state it leaves.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import trio
from msixhub.client.demo import CheckList
from msixhub.client.vmm import Interrupt, PeerEvent, VmmClient, connect
from msixhub.devices.ivshmem.daemon import PCI_ID
from msixhub.devices.ivshmem.qemu_client import QemuPeer
from msixhub.devices.ivshmem.qemu_protocol import PeerGone, ServerClosed
from msixhub.devices.ivshmem.regs import Doorbell, IvshmemRegisters, Register
from msixhub.testing.ivshmem import SHARED_MEMORY_BAR, IvshmemGuest
from msixhub.testing.processes import (
    ManagedProcess,
    device_process,
    hub_process,
    msixhub_command,
    open_fds,
)
from msixhub.testing.system import HubStatus, hub_status, message_of

QEMU_BINARY = "qemu-system-x86_64"
NAME_PREFIX = "msixhub-interop"
SIZE = 1 << 20
VECTORS = 2
CHECK_TIMEOUT = 20.0
SCENARIO_TIMEOUT = 90.0
FIRST_CONTACT_WAIT = 0.5
QEMU_TIMEOUT = 10.0
QEMU_INITIAL_PEERS = 16  # the peer table QEMU's device allocates before it grows it

# Where this module puts the device in the guest's physical address space (q35's PCI hole;
# BAR2 above 4 GiB so that its upper dword matters) and where MSI-X messages land (guest RAM).
BAR0_ADDRESS = 0xE000_0000
BAR1_ADDRESS = 0xE000_1000
BAR2_ADDRESS = 0x1_0000_0000
MSI_RAM = 0x0010_0000
MSI_DATA = 0x4D53_0000  # | vector | qemu index << 8: every message tells who and which

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_BAR0 = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_MSIX = 0x11
BAR_MEMORY_64 = 0b100
BAR_PREFETCHABLE = 0b1000
MSIX_ENABLE = 1 << 15
MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 1


Access = tuple[str, int, int, int]  # ("read" | "write", BAR0 offset, size, value written)
BAR0_SCRIPT: tuple[Access, ...] = (
    # A guest's BAR0 accesses (no Doorbell). First at a register's first byte: IntrMask
    # read/write at every width, IntrStatus cleared by a read of any width, IVPosition
    # read-only, reserved space reading 0 and ignoring writes.
    ("write", 0, 4, 0x1122_3344),
    ("read", 0, 4, 0),
    ("read", 0, 2, 0),
    ("read", 0, 1, 0),
    ("write", 0, 2, 0xBEEF),
    ("read", 0, 4, 0),
    ("write", 0, 1, 0x5A),
    ("read", 0, 4, 0),
    ("write", 4, 4, 0x8000_0001),
    ("read", 4, 1, 0),
    ("read", 4, 4, 0),
    ("write", 4, 4, 0xFFFF_FFFF),
    ("read", 4, 2, 0),
    ("read", 4, 4, 0),
    ("read", 8, 4, 0),
    ("read", 8, 2, 0),
    ("read", 8, 1, 0),
    ("write", 8, 4, 0x1234),
    ("read", 8, 4, 0),
    ("read", 0x10, 4, 0),
    ("write", 0x10, 4, 0xDEAD_BEEF),
    ("read", 0x10, 4, 0),
    ("read", 0xFC, 4, 0),
    ("read", 0x20, 1, 0),
    # Narrow accesses that start inside a register: QEMU hands its device the offset and the
    # value unshifted, so such a read returns 0 (no side effect) and such a write stores the
    # value as if it were at the register's first byte.
    ("write", 0, 4, 0x1122_3344),
    ("read", 1, 1, 0),
    ("read", 2, 2, 0),
    ("write", 1, 1, 0xAB),
    ("read", 0, 4, 0),
    ("write", 2, 2, 0xBEEF),
    ("read", 0, 4, 0),
    ("write", 4, 4, 0x5566_7788),
    ("read", 5, 1, 0),
    ("read", 4, 4, 0),
    ("write", 0, 4, 0),
    ("read", 4, 4, 0),  # IntrStatus cleared for the checks that follow
)


class InteropError(AssertionError):
    """A check's expectation did not hold."""


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise InteropError(message)


# --- the qtest line protocol ------------------------------------------------------------------


_WIDTHS = {1: "b", 2: "w", 4: "l"}


class QtestError(RuntimeError):
    """QEMU answered a qtest command with something other than OK."""


class Qtest:
    """Requests and replies over the qtest socket: one line each way. ``IRQ raise|lower N``
    lines are asynchronous notices (we intercept no IRQ, so none should come); skipped.
    QEMU logs both directions on its stderr (no -qtest-log), unbuffered: the process log
    has the transcript even after a SIGKILL."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._lock = trio.Lock()

    async def command(self, *words: object) -> list[str]:
        """Send one command; the words of its ``OK`` reply after ``OK``."""
        line = " ".join(str(w) for w in words)
        async with self._lock:
            try:
                await self._stream.send_all(line.encode() + b"\n")
                while True:
                    reply = (await self._line()).split()
                    if reply and reply[0] == "IRQ":
                        continue
                    if reply and reply[0] == "OK":
                        return reply[1:]
                    raise QtestError(f"qtest {line!r}: {' '.join(reply) or 'empty reply'}")
            except trio.BrokenResourceError as exc:
                raise QtestError(f"qtest {line!r}: QEMU closed the socket") from exc

    async def _line(self) -> str:
        while (end := self._buffer.find(b"\n")) < 0:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise trio.BrokenResourceError("end of stream")
            self._buffer += chunk
        line = self._buffer[:end].decode()
        del self._buffer[: end + 1]
        return line

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def outl(self, port: int, value: int) -> None:
        await self.command("outl", hex(port), hex(value))

    async def outw(self, port: int, value: int) -> None:
        await self.command("outw", hex(port), hex(value))

    async def inl(self, port: int) -> int:
        return int((await self.command("inl", hex(port)))[0], 16)

    async def read_sized(self, address: int, size: int) -> int:
        """A 1, 2 or 4-byte read, as a CPU load of that width."""
        return int((await self.command(f"read{_WIDTHS[size]}", hex(address)))[0], 16)

    async def write_sized(self, address: int, size: int, value: int) -> None:
        await self.command(f"write{_WIDTHS[size]}", hex(address), hex(value))

    async def readl(self, address: int) -> int:
        return await self.read_sized(address, 4)

    async def writel(self, address: int, value: int) -> None:
        await self.write_sized(address, 4, value)

    async def read(self, address: int, size: int) -> bytes:
        (data,) = await self.command("read", hex(address), size)
        return bytes.fromhex(data.removeprefix("0x"))

    async def write(self, address: int, data: bytes) -> None:
        await self.command("write", hex(address), len(data), "0x" + data.hex())


# --- the guest's view of QEMU's ivshmem-doorbell -----------------------------------------------


class PciFunction:
    """Configuration space of bus 0 ``slot``, function 0, through ports 0xcf8/0xcfc."""

    def __init__(self, qtest: Qtest, slot: int) -> None:
        self.qtest = qtest
        self.slot = slot

    def _address(self, register: int) -> int:
        return 0x8000_0000 | self.slot << 11 | (register & 0xFC)

    async def read32(self, register: int) -> int:
        await self.qtest.outl(PCI_CONFIG_ADDRESS, self._address(register))
        return await self.qtest.inl(PCI_CONFIG_DATA)

    async def write32(self, register: int, value: int) -> None:
        await self.qtest.outl(PCI_CONFIG_ADDRESS, self._address(register))
        await self.qtest.outl(PCI_CONFIG_DATA, value)

    async def write16(self, register: int, value: int) -> None:
        await self.qtest.outl(PCI_CONFIG_ADDRESS, self._address(register))
        await self.qtest.outw(PCI_CONFIG_DATA + (register & 2), value)


@dataclass(frozen=True, slots=True)
class MsixLayout:
    capability: int
    table: int  # guest-physical addresses
    pba: int


class QemuIvshmem:
    """What a guest driver does with QEMU's ivshmem-doorbell, over qtest."""

    def __init__(self, pci: PciFunction, msix: MsixLayout) -> None:
        self.pci = pci
        self.qtest = pci.qtest
        self.msix = msix

    @classmethod
    async def probe(cls, qtest: Qtest) -> QemuIvshmem:
        """Find 1af4:1110 on bus 0, place its BARs, enable memory decoding and bus mastering."""
        for slot in range(32):
            pci = PciFunction(qtest, slot)
            ids = await pci.read32(0)
            if ids == (PCI_ID & 0xFFFF) << 16 | PCI_ID >> 16:  # device id high, vendor low
                break
        else:
            raise InteropError("no 1af4:1110 function on bus 0")
        bar2 = await pci.read32(PCI_BAR0 + 8)
        expect(
            bar2 & 0b1110 == BAR_MEMORY_64 | BAR_PREFETCHABLE,
            f"BAR2 is not 64-bit prefetchable memory (low dword {bar2:#x})",
        )
        await pci.write32(PCI_BAR0, BAR0_ADDRESS)
        await pci.write32(PCI_BAR0 + 4, BAR1_ADDRESS)
        await pci.write32(PCI_BAR0 + 8, BAR2_ADDRESS & 0xFFFF_FFFF)
        await pci.write32(PCI_BAR0 + 12, BAR2_ADDRESS >> 32)
        await pci.write16(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        return cls(pci, await _msix_layout(pci))

    async def iv_position(self) -> int:
        return await self.qtest.readl(BAR0_ADDRESS + Register.IV_POSITION)

    async def intr_status(self) -> int:
        """IntrStatus (QEMU clears it on read)."""
        return await self.qtest.readl(BAR0_ADDRESS + Register.INTR_STATUS)

    async def ring(self, peer: int, vector: int) -> None:
        await self.qtest.writel(BAR0_ADDRESS + Register.DOORBELL, Doorbell(peer, vector).encode())

    async def shm_write(self, offset: int, data: bytes) -> None:
        await self.qtest.write(BAR2_ADDRESS + offset, data)

    async def shm_read(self, offset: int, size: int) -> bytes:
        return await self.qtest.read(BAR2_ADDRESS + offset, size)

    async def program_vector(self, vector: int, address: int, data: int, *, masked: bool) -> None:
        entry = self.msix.table + vector * MSIX_ENTRY_SIZE
        await self.qtest.writel(entry, address & 0xFFFF_FFFF)
        await self.qtest.writel(entry + 4, address >> 32)
        await self.qtest.writel(entry + 8, data)
        await self.set_masked(vector, masked)

    async def set_masked(self, vector: int, masked: bool) -> None:
        entry = self.msix.table + vector * MSIX_ENTRY_SIZE
        await self.qtest.writel(entry + 12, MSIX_VECTOR_MASKED if masked else 0)

    async def enable_msix(self) -> None:
        await self.pci.write16(self.msix.capability + 2, MSIX_ENABLE)

    async def pending(self, vector: int) -> bool:
        word = await self.qtest.readl(self.msix.pba + 4 * (vector // 32))
        return bool(word >> (vector % 32) & 1)


async def _msix_layout(pci: PciFunction) -> MsixLayout:
    bars = {1: BAR1_ADDRESS}
    pointer = await pci.read32(PCI_CAPABILITY_LIST) & 0xFC
    while pointer:
        header = await pci.read32(pointer)
        if header & 0xFF == PCI_CAP_ID_MSIX:
            table, pba = await pci.read32(pointer + 4), await pci.read32(pointer + 8)
            expect(
                table & 7 in bars and pba & 7 in bars,
                f"MSI-X table/PBA in BARs {table & 7}/{pba & 7}, expected BAR1",
            )
            return MsixLayout(pointer, bars[table & 7] + (table & ~7), bars[pba & 7] + (pba & ~7))
        pointer = header >> 8 & 0xFC
    raise InteropError("no MSI-X capability")


# --- QEMU as a process ------------------------------------------------------------------------


class QemuProcess(ManagedProcess):
    """``qemu-system-x86_64`` with an ivshmem-doorbell on ``server``, driven over qtest."""

    def __init__(self, name: str, base: Sequence[str], directory: Path, server: Path) -> None:
        """``base``: the binary and its accelerator (``qemu_base_command``)."""
        self.qtest_path = directory / f"{name}.qtest.sock"
        command = [
            *base,
            *("-machine", "q35", "-display", "none", "-nodefaults"),
            *("-qtest", f"unix:{self.qtest_path}"),
            *("-chardev", f"socket,path={server},id=iv"),
            *("-device", f"ivshmem-doorbell,chardev=iv,vectors={VECTORS}"),
        ]
        super().__init__(name, command)
        self.qtest: Qtest | None = None
        self.device: QemuIvshmem | None = None
        self._drained = trio.Event()

    async def _drain_stderr(self) -> None:
        try:
            await super()._drain_stderr()
        finally:
            self._drained.set()

    async def start(self, nursery: trio.Nursery) -> None:
        """Start QEMU and take its qtest connection; a QEMU that exits first (its ivshmem
        realize failed, say) is an error carrying its stderr."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(str(self.qtest_path))
            listener.listen(1)
            await super().start(nursery)
            assert self.process is not None
            accepted: list[trio.socket.SocketType] = []
            async with trio.open_nursery() as race:

                async def accept() -> None:
                    accepted.append((await listener.accept())[0])
                    race.cancel_scope.cancel()

                async def exited() -> None:
                    assert self.process is not None
                    await self.process.wait()
                    await self._drained.wait()  # its last words are in the log
                    race.cancel_scope.cancel()

                race.start_soon(accept)
                race.start_soon(exited)
                race.cancel_scope.deadline = trio.current_time() + QEMU_TIMEOUT
        finally:
            listener.close()
            self.qtest_path.unlink(missing_ok=True)
        if not accepted:
            self.kill()
            raise InteropError(
                f"{self.name} did not connect to qtest (exit status {self.process.returncode}):"
                f"\n{self.log_tail()}"
            )
        self.qtest = Qtest(trio.SocketStream(accepted[0]))
        try:
            # QEMU connects to qtest before it creates its devices and answers once they
            # are realized: a refused handshake shows as QEMU exiting here.
            self.device = await QemuIvshmem.probe(self.qtest)
        except QtestError:
            with trio.move_on_after(QEMU_TIMEOUT):
                await self.process.wait()
                await self._drained.wait()
            raise InteropError(
                f"{self.name} exited (status {self.process.returncode}):\n{self.log_tail()}"
            ) from None

    def complaints(self) -> list[str]:
        """What QEMU printed besides its qtest log (an ``error_report`` of its ivshmem
        device about a server message, say)."""
        return [f"{self.name}: {line}" for line in self.lines if not line.startswith("[")]

    @property
    def ivshmem(self) -> QemuIvshmem:
        assert self.device is not None
        return self.device

    async def close(self) -> None:
        """SIGKILL (QEMU keeps nothing we need) and reap; again is a no-op."""
        if self.qtest is not None:
            await self.qtest.aclose()
            self.qtest = None
        if self.process is not None:
            self.kill()
            await self.process.wait()


async def qemu_base_command(binary: str) -> list[str]:
    """The binary with ``-accel qtest`` if it has that accelerator, else with TCG and
    ``-S``: the vCPUs stay stopped, so no firmware runs and only qtest touches the machine."""
    listing = await trio.run_process(
        [binary, "-accel", "help"], capture_stdout=True, capture_stderr=True
    )
    if "qtest" in listing.stdout.decode().split():
        return [binary, "-accel", "qtest"]
    return [binary, "-accel", "tcg", "-S"]


# --- the other side: an msixhub peer ----------------------------------------------------------


class Peer(Protocol):
    """The msixhub peer QEMU talks to, whichever server it is on."""

    peer_id: int

    async def wait_for_peer(self, peer_id: int, joined: bool) -> None: ...
    def shm(self) -> mmap.mmap: ...
    async def ring(self, peer_id: int, vector: int) -> None: ...
    async def wait_rung(self, vector: int, *, exactly_once: bool = True) -> str:
        """Wait for a ring of ``vector``; say how it arrived (``exactly_once``: raise unless
        it is one ring)."""
        ...

    def ring_fd(self, peer_id: int, vector: int) -> int:
        """The eventfd our rings of ``peer_id``'s ``vector`` are written to."""
        ...

    def doorbell_peers(self) -> set[int]:
        """The peers this one can ring now."""
        ...


class ProtocolPeer:
    """msixhub's client of QEMU's protocol (``QemuPeer``) with the region mapped."""

    def __init__(self, client: QemuPeer, region: mmap.mmap) -> None:
        self.client = client
        self.peer_id = client.peer_id
        self._map = region
        self._left: set[int] = set()

    async def wait_for_peer(self, peer_id: int, joined: bool) -> None:
        """Until ``peer_id`` has all its vectors here (``joined``) or has been announced gone."""

        def done() -> bool:
            if joined:
                return len(self.client.peers.get(peer_id, ())) == VECTORS
            return peer_id in self._left

        while not done():
            event = await self.client.next_event()
            if isinstance(event, PeerGone):
                self._left.add(event.peer_id)
            elif isinstance(event, ServerClosed):
                raise InteropError("the server closed the connection")

    def shm(self) -> mmap.mmap:
        return self._map

    async def ring(self, peer_id: int, vector: int) -> None:
        self.client.ring(peer_id, vector)

    async def wait_rung(self, vector: int, *, exactly_once: bool = True) -> str:
        count = await self.client.wait_rung(vector)
        expect(count == 1 or not exactly_once, f"vector {vector} rung {count} times, not once")
        return f"its eventfd counted {count}"

    def ring_fd(self, peer_id: int, vector: int) -> int:
        return self.client.peers[peer_id][vector].fileno()

    def doorbell_peers(self) -> set[int]:
        return set(self.client.peers)


@asynccontextmanager
async def protocol_peer(path: Path) -> AsyncIterator[ProtocolPeer]:
    async with await QemuPeer.connect(path, VECTORS) as client:
        assert client.shm is not None
        with mmap.mmap(client.shm.fileno(), SIZE) as region:
            yield ProtocolPeer(client, region)


class VmmPeer:
    """An msixhub VMM (``VmmClient``) with an ivshmem device attached and set up like a
    guest driver would (every vector programmed with ``message_of(v)``, MSI-X enabled)."""

    def __init__(self, vm: VmmClient, guest: IvshmemGuest, peer_id: int) -> None:
        self.vm = vm
        self.guest = guest
        self.peer_id = peer_id
        self._unread: list[object] = []

    async def _wait_for(self, wanted: Callable[[object], bool]) -> object:
        for index, event in enumerate(self._unread):
            if wanted(event):
                return self._unread.pop(index)
        while True:
            event = await self.vm.next_event()
            if wanted(event):
                return event
            self._unread.append(event)

    async def wait_for_peer(self, peer_id: int, joined: bool) -> None:
        expected = PeerEvent(self.guest.device.id, peer_id, joined)
        await self._wait_for(lambda event: event == expected)

    def shm(self) -> mmap.mmap:
        return self.guest.device.bar_memory[SHARED_MEMORY_BAR]

    async def ring(self, peer_id: int, vector: int) -> None:
        await self.guest.ring(peer_id, vector)

    async def wait_rung(self, vector: int, *, exactly_once: bool = True) -> str:
        event = await self._wait_for(lambda e: isinstance(e, Interrupt) and e.vector == vector)
        assert isinstance(event, Interrupt)
        expect(
            event.count == 1 or not exactly_once,
            f"vector {vector} interrupt of count {event.count}, not 1",
        )
        expect(
            (event.address, event.data) == message_of(vector),
            f"vector {vector} interrupt carried {event.address:#x}/{event.data:#x}",
        )
        return f"MSI-X interrupt {event.address:#x}/{event.data:#x}"

    def ring_fd(self, peer_id: int, vector: int) -> int:
        key = (0, Register.DOORBELL, 4, Doorbell(peer_id, vector).encode())
        return self.guest.device.ioeventfds[key].fileno()

    def doorbell_peers(self) -> set[int]:
        return {value >> 16 for value in self.guest.doorbells()}


# --- servers ----------------------------------------------------------------------------------


class IvshmemServerProcess(ManagedProcess):
    """``msixhub ivshmem-server -F -v`` with ``--hub-socket`` (for status); it logs to stdout,
    which is drained here like the others' stderr."""

    def __init__(self, directory: Path, shm_name: str) -> None:
        super().__init__(
            "ivshmem-server",
            msixhub_command(
                "ivshmem-server",
                *("-F", "-v", "-S", str(directory / "qemu.sock"), "-M", shm_name),
                *("-l", "1M", "-n", str(VECTORS), "--hub-socket", str(directory / "hub.sock")),
            ),
        )
        self.socket = str(directory / "hub.sock")

    async def start(self, nursery: trio.Nursery) -> None:
        self.process = await trio.lowlevel.open_process(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.process.stderr = self.process.stdout  # one stream, drained as the log
        nursery.start_soon(self._drain_stderr)


@dataclass(eq=False)
class Setup:
    """One server with an msixhub peer on it, ready for QEMUs. ``late_peer`` brings one more
    msixhub peer for the length of a block (it joins, and leaves at the end)."""

    mode: str
    server: ManagedProcess  # the process whose fds and life are checked
    qemu_socket: Path
    status: HubStatus
    peer: Peer
    late_peer: Callable[[], AbstractAsyncContextManager[Peer]]
    logs: list[ManagedProcess] = field(default_factory=list)


@asynccontextmanager
async def server_setup(directory: Path) -> AsyncIterator[Setup]:
    """``msixhub ivshmem-server`` and a ``QemuPeer`` (msixhub's client of QEMU's protocol)."""
    shm_name = f"{NAME_PREFIX}-{uuid.uuid4().hex[:12]}"
    server = IvshmemServerProcess(directory, shm_name)
    qemu_socket = directory / "qemu.sock"
    try:
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            try:
                await server.wait_for_line("listening on")
                async with (
                    hub_status(server.socket) as status,
                    protocol_peer(qemu_socket) as peer,
                ):
                    late = partial(protocol_peer, qemu_socket)
                    yield Setup("ivshmem-server", server, qemu_socket, status, peer, late)
            finally:
                with trio.CancelScope(shield=True):
                    await server.stop()
                nursery.cancel_scope.cancel()
    finally:
        Path("/dev/shm", shm_name).unlink(missing_ok=True)


@asynccontextmanager
async def hub_setup(directory: Path) -> AsyncIterator[Setup]:
    """``msixhub serve --ivshmem-socket``, ivshmem daemons "a" and "b", a VMM attaching "a".
    "b" registers now (so the hub's fds for it count as "before") but is made to leave the
    domain (a VMM takes it and lets it go): the late peer is a VMM attaching it again."""
    qemu_socket = directory / "qemu.sock"
    extra = (
        *("--ivshmem-socket", str(qemu_socket), "--ivshmem-name", NAME_PREFIX),
        *("--ivshmem-size", "1M", "--ivshmem-vectors", str(VECTORS)),
    )
    daemon_args = ("--name", NAME_PREFIX, "--size", "1M", "--vectors", str(VECTORS))
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(hub_process(directory, extra=extra))
        daemons = [
            await stack.enter_async_context(device_process(hub, "ivshmem", d, *daemon_args))
            for d in "ab"
        ]
        status = await stack.enter_async_context(hub_status(hub.socket))
        peer = await stack.enter_async_context(vmm_peer(hub.socket, "a"))
        async with connect(hub.socket, name="vm-b") as vm_b:
            b_member = await IvshmemGuest(await vm_b.attach("b")).position()
        await peer.wait_for_peer(b_member, False)
        late = partial(vmm_peer, hub.socket, "b")
        yield Setup("hub", hub, qemu_socket, status, peer, late, daemons)


@asynccontextmanager
async def vmm_peer(hub_socket: str, device_id: str) -> AsyncIterator[VmmPeer]:
    async with connect(hub_socket, name=f"vm-{device_id}") as vm:
        guest = IvshmemGuest(await vm.attach(device_id))
        await guest.setup()
        yield VmmPeer(vm, guest, await guest.position())


# --- the checks -------------------------------------------------------------------------------


class InteropReport(CheckList):
    """Every scenario's checks, in order."""


async def _qemu_peer_ids(status: HubStatus) -> list[int]:
    """The QEMU-protocol peers the server reports (``device`` None)."""
    (domain,) = (await status.report())["ivshmem"]
    return [p["peer_id"] for p in domain["peers"] if p["device"] is None]


async def _consumed(fd: int) -> None:
    """Wait until the eventfd ``fd`` counts 0 again: its reader took our ring. QEMU says
    nothing when it drops a ring, so this polls the count in /proc (bounded by the caller)."""
    while True:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("eventfd-count:") and int(line.split(":")[1], 16) == 0:
                    return
        await trio.sleep(0.005)


async def _until(probe: Callable[[], Awaitable[bool]]) -> None:
    """Repeat ``probe`` (a qtest read) until true: QEMU's MSI-X writes and PBA bits raise no
    event we could wait on. Bounded by the caller's timeout."""
    while not await probe():
        await trio.sleep(0.002)


async def _msi_word(qemu: QemuProcess, vector: int) -> int:
    assert qemu.qtest is not None
    return await qemu.qtest.readl(MSI_RAM + 4 * vector)


def _msi_data(index: int, vector: int) -> int:
    return MSI_DATA | index << 8 | vector


async def _setup_msix(qemu: QemuProcess, index: int, *, masked: bool = False) -> None:
    """Every vector's message: a write of ``_msi_data`` to guest RAM; then MSI-X on."""
    assert qemu.qtest is not None
    for vector in range(VECTORS):
        await qemu.qtest.writel(MSI_RAM + 4 * vector, 0)
        await qemu.ivshmem.program_vector(
            vector, MSI_RAM + 4 * vector, _msi_data(index, vector), masked=masked
        )
    await qemu.ivshmem.enable_msix()


async def _expect_msi(qemu: QemuProcess, index: int, vector: int) -> None:
    """Wait for the message of ``vector`` in RAM, then clear it; the other slot stays 0."""
    data = _msi_data(index, vector)

    async def arrived() -> bool:
        return await _msi_word(qemu, vector) == data

    await _until(arrived)
    assert qemu.qtest is not None
    await qemu.qtest.writel(MSI_RAM + 4 * vector, 0)
    for other in range(VECTORS):
        word = await _msi_word(qemu, other)
        expect(word == 0, f"vector {other}'s slot holds {word:#x} after a ring of {vector}")


async def _replay(
    qemu: QemuProcess, model: IvshmemRegisters, script: Sequence[Access]
) -> list[str]:
    """Apply ``script`` to QEMU's BAR0 and to ``model``; every read where they differ."""
    assert qemu.qtest is not None
    differences = []
    done: list[str] = []
    for op, offset, size, value in script:
        address = BAR0_ADDRESS + offset
        if op == "write":
            await qemu.qtest.write_sized(address, size, value)
            model.write(offset, value, size)
            done.append(f"write{_WIDTHS[size]} {offset:#x}={value:#x}")
            continue
        got, want = await qemu.qtest.read_sized(address, size), model.read(offset, size)
        if got != want:
            differences.append(
                f"read{_WIDTHS[size]} {offset:#x} after {', '.join(done[-2:])}: QEMU {got:#x},"
                f" msixhub's model {want:#x}"
            )
        done.append(f"read{_WIDTHS[size]} {offset:#x}")
    return differences


@dataclass(frozen=True, slots=True)
class JoinedQemu:
    """A QEMU that joined: ``index`` tells its messages apart, ``position`` is its peer id."""

    qemu: QemuProcess
    index: int
    position: int
    detail: str

    def __str__(self) -> str:
        return self.detail


T = TypeVar("T")


class Scenario:
    """The checks against one server, in order; each depends on the ones before."""

    def __init__(
        self, setup: Setup, qemu: Sequence[str], directory: Path, report: InteropReport
    ) -> None:
        self.setup = setup
        self.qemu_command = qemu
        self.directory = directory
        self.report = report
        self.qemus: list[QemuProcess] = []
        self.fds_before = -1  # the server's, before any QEMU came

    async def run(self) -> None:
        """The checks, in order, until one fails; every QEMU is killed at the end."""
        async with trio.open_nursery() as nursery:
            try:
                await self._checks(nursery)
            finally:
                with trio.CancelScope(shield=True):
                    for qemu in self.qemus:
                        await qemu.close()
                nursery.cancel_scope.cancel()

    async def _checks(self, nursery: trio.Nursery) -> None:
        setup = self.setup
        peer = setup.peer
        await setup.status.report()  # a round trip: the peer's greeting is all sent
        self.fds_before = open_fds(setup.server.pid)
        first = await self._step("QEMU joins", lambda: self._join(nursery, "qemu-a"))
        if first is None:
            return
        steps: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("BAR0 registers as msixhub's model", lambda: self._registers(first)),
            ("shared memory both ways", lambda: self._shared_memory(first)),
            ("QEMU rings the msixhub peer", lambda: self._qemu_rings(first)),
            ("no INTx in QEMU's doorbell device", lambda: self._dropped_without_msix(first)),
            ("the msixhub peer rings QEMU (MSI-X)", lambda: self._peer_rings(first)),
            ("masked in QEMU: pending, then delivered", lambda: self._masked(first)),
            ("two QEMUs ring each other", lambda: self._two_qemus(nursery, first)),
            ("an msixhub peer joins after QEMU", lambda: self._late_peer(first)),
            ("SIGKILLed QEMUs leave, server unharmed", lambda: self._kill(peer)),
        ]
        for name, step in steps:
            if await self._step(name, step) is None:
                return

    async def _step(self, name: str, step: Callable[[], Awaitable[T]]) -> T | None:
        label = f"{self.setup.mode}: {name}"
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                result = await step()
        except Exception as exc:
            logs = [*self.qemus, self.setup.server, *self.setup.logs]
            tails = "\n".join(f"--- {p.name} log:\n{p.log_tail(15)}" for p in logs)
            self.report.check(label, False, f"{_describe(exc)}\n{tails}")
            return None
        complaints = [line for qemu in self.qemus for line in qemu.complaints()]
        if complaints:
            self.report.check(label, False, "QEMU reported: " + "; ".join(complaints))
            return None
        self.report.check(label, True, str(result))
        return result

    async def _join(self, nursery: trio.Nursery, name: str) -> JoinedQemu:
        """1. QEMU's handshake is accepted (it realizes its device and stays up); IVPosition
        is the id the server assigned."""
        setup = self.setup
        before = set(await _qemu_peer_ids(setup.status))
        qemu = QemuProcess(name, self.qemu_command, self.directory, setup.qemu_socket)
        self.qemus.append(qemu)  # killed by ``run`` whatever happens
        await qemu.start(nursery)
        position = await qemu.ivshmem.iv_position()
        await setup.peer.wait_for_peer(position, True)
        new = sorted(set(await _qemu_peer_ids(setup.status)) - before)
        expect(new == [position], f"IVPosition {position}, the server reports new peers {new}")
        expect(qemu.process is not None and qemu.process.returncode is None, "QEMU exited")
        return JoinedQemu(
            qemu,
            len(self.qemus) - 1,
            position,
            f"pid {qemu.pid}, IVPosition {position} = the id the server reports and announced"
            f" to peer {setup.peer.peer_id}",
        )

    async def _registers(self, joined: JoinedQemu) -> str:
        """BAR0 but the Doorbell: QEMU answers every read as msixhub's register model
        (``IvshmemRegisters``) does after the same accesses."""
        model = IvshmemRegisters(joined.position, lambda peer: 0)
        differences = await _replay(joined.qemu, model, BAR0_SCRIPT)
        expect(not differences, "; ".join(differences))
        reads = sum(op == "read" for op, *_ in BAR0_SCRIPT)
        return f"{reads} reads of widths 1, 2, 4 agree, at and inside registers (IntrMask, IntrStatus, IVPosition, reserved)"

    async def _shared_memory(self, joined: JoinedQemu) -> str:
        """2. Bytes written through QEMU's BAR2 are in the peer's mapping, and back."""
        shm, device = self.setup.peer.shm(), joined.qemu.ivshmem
        ours, theirs = os.urandom(64), os.urandom(64)
        await device.shm_write(0, theirs)  # first and last bytes: the whole region is mapped
        await device.shm_write(SIZE - 64, theirs)
        expect(bytes(shm[:64]) == theirs, "QEMU's write at offset 0 not seen by the peer")
        expect(bytes(shm[SIZE - 64 :]) == theirs, "QEMU's write at the end not seen by the peer")
        shm[4096 : 4096 + 64] = ours
        got = await device.shm_read(4096, 64)
        expect(got == ours, f"QEMU read {got.hex()} where the peer wrote {ours.hex()}")
        return "QEMU wrote offsets 0 and 1M-64, the peer read them; the peer wrote 4K, QEMU read it"

    async def _qemu_rings(self, joined: JoinedQemu) -> str:
        """3. A Doorbell write in QEMU rings the msixhub peer's vector, once."""
        peer, device = self.setup.peer, joined.qemu.ivshmem
        how = []
        for vector in range(VECTORS):
            await device.ring(peer.peer_id, vector)
            how.append(f"vector {vector}: {await peer.wait_rung(vector)}")
        return "; ".join(how)

    async def _dropped_without_msix(self, joined: JoinedQemu) -> str:
        """4a. With MSI-X disabled, QEMU takes the ring off its eventfd and drops it:
        IntrStatus stays 0, unlike msixhub's device (which sets it in INTx mode)."""
        peer, device = self.setup.peer, joined.qemu.ivshmem
        await peer.ring(joined.position, 0)
        await _consumed(peer.ring_fd(joined.position, 0))
        status = await device.intr_status()
        expect(status == 0, f"IntrStatus {status:#x} after a ring with MSI-X disabled")
        pending = await device.pending(0)
        expect(not pending, "PBA bit set with MSI-X disabled")
        return "QEMU read the eventfd; IntrStatus 0, no PBA bit, no message"

    async def _peer_rings(self, joined: JoinedQemu) -> str:
        """4b. The msixhub peer rings each of QEMU's vectors: QEMU sends that MSI-X message."""
        peer = self.setup.peer
        await _setup_msix(joined.qemu, joined.index)
        for vector in range(VECTORS):
            await peer.ring(joined.position, vector)
            await _expect_msi(joined.qemu, joined.index, vector)
        return f"each ring became vector v's message ({MSI_DATA:#x}|v written to guest RAM)"

    async def _masked(self, joined: JoinedQemu) -> str:
        """4c. Masked in QEMU: the ring sets the PBA bit and sends nothing; the unmask
        sends it once and clears the bit."""
        peer, device = self.setup.peer, joined.qemu.ivshmem
        await device.set_masked(1, True)
        await peer.ring(joined.position, 1)
        await _consumed(peer.ring_fd(joined.position, 1))
        expect(await device.pending(1), "no PBA bit after a ring of a masked vector")
        expect(await _msi_word(joined.qemu, 1) == 0, "a masked vector sent its message")
        await device.set_masked(1, False)
        await _expect_msi(joined.qemu, joined.index, 1)  # delivered by the unmask itself
        expect(not await device.pending(1), "PBA bit still set after the unmask delivered")
        return "PBA bit set while masked, message sent on unmask, bit cleared"

    async def _two_qemus(self, nursery: trio.Nursery, first: JoinedQemu) -> str:
        """5. A second QEMU joins the same server; the two ring each other through the
        eventfds the server passed between them. Peers come and go before it, so that its
        id is past the room QEMU A made at start (ids are never reused): A grows its table."""
        churn = []
        while len(churn) < QEMU_INITIAL_PEERS:
            async with self.setup.late_peer() as transient:
                churn.append(transient.peer_id)
            await self.setup.peer.wait_for_peer(churn[-1], False)
        second = await self._join(nursery, "qemu-b")
        expect(second.position >= QEMU_INITIAL_PEERS, f"QEMU B's id {second.position} < 16")
        await _setup_msix(second.qemu, second.index)
        # QEMU processes the announcements in its main loop, which answers qtest too: once
        # the peer has heard of the join, a qtest round trip does not prove QEMU A has.
        # Ring until QEMU A knows B (a doorbell to an unknown peer is dropped by QEMU).
        await _ring_until(first.qemu, second, self.setup.peer)
        await first.qemu.ivshmem.ring(second.position, 1)
        await _expect_msi(second.qemu, second.index, 1)
        await second.qemu.ivshmem.ring(first.position, 0)
        await _expect_msi(first.qemu, first.index, 0)
        await second.qemu.ivshmem.ring(first.position, 1)
        await _expect_msi(first.qemu, first.index, 1)
        return (
            f"{len(churn)} peers came and went; {second.detail}; A ({first.position}) and"
            f" B ({second.position}) rang each other"
        )

    async def _late_peer(self, joined: JoinedQemu) -> str:
        """7. An msixhub peer that joins after QEMU (QEMU learns of it from announcements,
        not from its greeting): they ring each other; its departure reaches the others."""
        qemu = joined.qemu.ivshmem
        async with self.setup.late_peer() as late:
            await late.wait_for_peer(joined.position, True)
            # QEMU takes the announcement in its main loop, with no event for us, and drops
            # a ring to a peer it does not know: ring the vector announced last until it
            # arrives (a ring QEMU knows to deliver is in the eventfd when writel returns).
            last = VECTORS - 1
            while True:
                await qemu.ring(late.peer_id, last)
                with trio.move_on_after(FIRST_CONTACT_WAIT):
                    await late.wait_rung(last, exactly_once=False)
                    break
            how = []
            for vector in range(VECTORS):
                await qemu.ring(late.peer_id, vector)
                how.append(await late.wait_rung(vector))
                await late.ring(joined.position, vector)
                await _expect_msi(joined.qemu, joined.index, vector)
            late_id = late.peer_id
        await self.setup.peer.wait_for_peer(late_id, False)
        return f"peer {late_id} joined: rung by QEMU ({'; '.join(how)}) and rang it; it left"

    async def _kill(self, peer: Peer) -> str:
        """6. SIGKILL each QEMU: the peer hears each departure and loses their doorbells; the
        server stays up, reports neither, and has the fds it had before they came."""
        setup = self.setup
        ids = []
        for qemu in self.qemus:
            position = await qemu.ivshmem.iv_position()
            qemu.kill()
            code = await qemu.wait()
            expect(code == -signal.SIGKILL, f"{qemu.name} exited with {code}")
            await peer.wait_for_peer(position, False)
            ids.append(position)
        expect(
            peer.doorbell_peers() <= {peer.peer_id},
            f"the peer can still ring {sorted(peer.doorbell_peers())}",
        )
        left = await _qemu_peer_ids(setup.status)
        expect(not set(ids) & set(left), f"the server still reports {left}")
        expect(setup.server.process is not None, "no server")
        assert setup.server.process is not None
        expect(setup.server.process.returncode is None, "the server exited")

        async def fds_back() -> bool:
            # The server closes a departed peer's socket and eventfds before it announces
            # the departure, but a dup of a sent fd lives until its send returns: poll.
            return open_fds(setup.server.pid) == self.fds_before

        with trio.move_on_after(5):
            await _until(fds_back)
        now = open_fds(setup.server.pid)
        expect(now == self.fds_before, f"server fds {self.fds_before} before, {now} after")
        return f"peers {ids} left; server pid {setup.server.pid} up, fds {now} as before"


async def _ring_until(ringer: QemuProcess, target: JoinedQemu, peer: Peer) -> None:
    """Ring ``target`` vector 0 from ``ringer`` until its message arrives: ``ringer`` learns
    of ``target`` in its main loop with no event we can see, and drops a ring to a peer it
    does not know yet. Then wait until ``target`` has read every ring (``peer`` holds the
    same eventfd), so no late message follows. Bounded by the caller's timeout."""
    data = _msi_data(target.index, 0)
    while True:
        await ringer.ivshmem.ring(target.position, 0)
        for _ in range(5):
            if await _msi_word(target.qemu, 0) == data:
                await _consumed(peer.ring_fd(target.position, 0))
                assert target.qemu.qtest is not None
                await target.qemu.qtest.writel(MSI_RAM, 0)
                return
            await trio.sleep(0.002)


async def run_scenario(
    mode: str, qemu: Sequence[str], directory: Path, report: InteropReport
) -> None:
    """All checks against one server kind (``"ivshmem-server"`` or ``"hub"``)."""
    directory.mkdir(parents=True, exist_ok=True)
    print(f"{mode}: work directory {directory}", flush=True)
    opener = server_setup if mode == "ivshmem-server" else hub_setup
    try:
        with trio.fail_after(SCENARIO_TIMEOUT):
            await _run_scenario(opener, qemu, directory, report)
    except Exception as exc:
        report.check(f"{mode}: ran to the end", False, _describe(exc))


async def _run_scenario(
    opener: Callable[[Path], AbstractAsyncContextManager[Setup]],
    qemu: Sequence[str],
    directory: Path,
    report: InteropReport,
) -> None:
    async with opener(directory) as setup:
        scenario = Scenario(setup, qemu, directory, report)
        try:
            await scenario.run()
        finally:
            for process in (setup.server, *setup.logs, *scenario.qemus):
                (directory / f"{process.name}.log").write_text("\n".join(process.lines))


def _describe(exc: BaseException) -> str:
    """The exception, or the leaves of an exception group (what actually went wrong)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


MODES = ("ivshmem-server", "hub")


async def run_all(directory: Path, modes: Sequence[str] = MODES) -> InteropReport:
    report = InteropReport()
    binary = qemu_binary()
    if binary is None:
        report.check("QEMU", False, f"{QEMU_BINARY} is not on PATH")
        return report
    qemu = await qemu_base_command(binary)
    print(f"QEMU: {' '.join(qemu)}", flush=True)
    for mode in modes:
        await run_scenario(mode, qemu, directory / mode, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m msixhub.testing.qemu_interop",
        description="check msixhub's ivshmem servers against a real QEMU ivshmem-doorbell",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the work directory (QEMU qtest logs) and print its path",
    )
    parser.add_argument("--mode", choices=MODES, action="append", help="one server kind only")
    args = parser.parse_args(argv)
    started = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="msixhub-qemu-interop-"))
    try:
        report = trio.run(run_all, directory, tuple(args.mode or MODES))
    finally:
        if not args.keep_logs:
            shutil.rmtree(directory, ignore_errors=True)
    passed = sum(c.passed for c in report.checks)
    print(
        f"{passed}/{len(report.checks)} checks passed in {time.monotonic() - started:.1f}s"
        + (f"; logs kept in {directory}" if args.keep_logs else ""),
        flush=True,
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
