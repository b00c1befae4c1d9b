"""One peer's ivshmem-doorbell device (PCI 1af4:1110), sharing the region NAME.

``msixhub spawn ivshmem --name NAME --size 4M --vectors 2`` (or a ``[[device]]`` entry of the
hub's config with those args) serves it as a hub device.

The device is the peer's BAR0 registers and nothing else. The hub does the rest: it joins the
device to the domain NAME (one shared region per name) when it registers, hands the VMM
BAR2 (the region) and an ioeventfd per (peer, vector) so that Doorbell writes are eventfd
writes made by the VMM itself, and owns BAR1 (MSI-X). What reaches this daemon:

* IntrMask / IntrStatus / IVPosition accesses (``IvshmemRegisters``); the peer id comes from
  the hub (``IvshmemPosition``, -1 while not a member, as QEMU's before its greeting);
* Doorbell writes that no ioeventfd took and the hub could not ring: to a peer or a vector
  that does not exist. They are counted and ignored (logged at the first and at each power
  of two, so a guest cannot flood the log); a malformed access is refused;
* INTx: a ring while MSI-X is disabled (``IvshmemIntx``) sets IntrStatus, and the INTx
  line follows IntrStatus & IntrMask.

IntrMask and IntrStatus live in the hub's in-flight region for this device, so a restarted
daemon resumes with them: an INTx ring is not lost to a crash.
"""

from __future__ import annotations

import argparse
import logging
import mmap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from msixhub.devices.cli_args import int_in
from msixhub.devices.daemon import HubLink, open_device
from msixhub.devices.ivshmem.domain import MAX_VECTORS
from msixhub.devices.ivshmem.regs import (
    BAR0_SIZE,
    Doorbell,
    IvshmemRegisters,
    Register,
    RegisterAccessError,
    RegisterStats,
)
from msixhub.devices.ivshmem.sizes import SizeError, parse_size, shm_size
from msixhub.protocol.errors import ErrorCode, MessageError, RemoteError
from msixhub.protocol.fds import OwnedFd, close_all
from msixhub.protocol.messages import (
    Bar,
    DeviceInfo,
    IvshmemIntx,
    IvshmemPeer,
    IvshmemPosition,
    MsixLayout,
    Region,
)
from msixhub.protocol.schema import Message

log = logging.getLogger("msixhub.ivshmem.device")

PCI_ID = 0x1AF4_1110
MSIX_BAR_SIZE = 4096
MSIX_PBA_OFFSET = 2048
"""As QEMU's ``msix_init_exclusive_bar`` lays out up to 64 vectors: table at 0, PBA at half."""
_STATE_SIZE = 8  # the in-flight region: IntrMask, IntrStatus, 32-bit words in host order
NOT_A_MEMBER = 0xFFFF_FFFF


def device_info(device_id: str, name: str, size: int, vectors: int) -> DeviceInfo:
    return DeviceInfo(
        device=device_id,
        kind="ivshmem",
        num_vectors=vectors,
        num_queues=0,
        bars=[Bar(0, BAR0_SIZE), Bar(1, MSIX_BAR_SIZE), Bar(2, size)],
        msix=MsixLayout(bar=1, table_offset=0, pba_offset=MSIX_PBA_OFFSET),
        intx=True,
        pci_id=PCI_ID,
        inflight_size=_STATE_SIZE,
        shared_memory=name,
        shared_size=size,
    )


class IvshmemDevice:
    """The ``DeviceModel`` of one peer's ivshmem-doorbell device."""

    def __init__(self, device_id: str, name: str, size: int, vectors: int) -> None:
        self.info = device_info(device_id, name, size, vectors)
        self.vectors = vectors
        self.member = False
        self.peers: set[int] = set()  # the domain as the hub last told us, ourselves included
        self.registers = IvshmemRegisters(0, self._peer_vectors)
        self.hub: HubLink | None = None
        self._state: memoryview | None = None  # the in-flight region as 32-bit words
        self._intx_level = False

    def _peer_vectors(self, peer_id: int) -> int:
        return self.vectors if peer_id in self.peers else 0

    # --- DeviceModel -----------------------------------------------------------------------

    def attach_hub(self, hub: HubLink) -> None:
        self.hub = hub
        hub.on_notice = self.on_hub_notice

    def set_memory(self, regions: Sequence[Region], fds: list[OwnedFd]) -> None:
        close_all(fds)  # an ivshmem device never touches guest RAM

    def set_inflight(self, fd: OwnedFd | None, restarted: bool) -> None:
        if fd is None:
            return
        with fd:
            self._state = memoryview(mmap.mmap(fd.fileno(), _STATE_SIZE)).cast("I")
        if restarted:
            self.registers.intr_mask, self.registers.intr_status = self._state.tolist()

    async def bar_read(self, bar: int, offset: int, size: int) -> int:
        self._check_bar(bar)
        with _guest_access():
            value = self.registers.read(offset, size)
        if offset & ~3 == Register.IV_POSITION and not self.member:
            value = (NOT_A_MEMBER >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)
        if offset & ~3 == Register.INTR_STATUS:
            await self._registers_changed()  # the read cleared it: the line drops
        return value

    async def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self._check_bar(bar)
        before = self.registers.statistics()
        with _guest_access():
            rung = self.registers.write(offset, value, size)
        if offset & ~3 == Register.DOORBELL:
            self._doorbell_ignored(before, value << (8 * (offset & 3)), rung)
        else:
            await self._registers_changed()

    async def kicked(self, queue: int) -> None:
        raise AssertionError("an ivshmem device has no queues")

    # --- the hub's notices -----------------------------------------------------------------

    async def on_hub_notice(self, body: Message) -> None:
        if isinstance(body, IvshmemPosition):
            self.member = body.peer_id >= 0
            self.registers.peer_id = max(body.peer_id, 0)
            self.peers = {body.peer_id} if self.member else set()
            log.info(
                "%s: %s",
                self.info.device,
                f"peer {body.peer_id} of ivshmem {self.info.shared_memory!r}"
                if self.member
                else "not a peer",
            )
        elif isinstance(body, IvshmemPeer):
            if body.joined:
                self.peers.add(body.peer_id)
            else:
                self.peers.discard(body.peer_id)
        elif isinstance(body, IvshmemIntx):
            self.registers.raise_intx()
            # Said even if unchanged here: enabling MSI-X lowers the hub's view of the line.
            await self._registers_changed(force=True)

    async def resume(self) -> None:
        """After (re)registration: the INTx line as the restored registers say."""
        await self._registers_changed(force=True)

    # --- internals -------------------------------------------------------------------------

    async def _registers_changed(self, *, force: bool = False) -> None:
        """Keep the registers where a restart finds them; drive INTx from them."""
        if self._state is not None:
            # One aligned 4-byte store per register, never struct.pack_into: that zeroes both
            # words before it writes them, and a kill in between restores zeros (an INTx
            # ring lost). This way a restart finds each register old or new, never 0.
            self._state[0] = self.registers.intr_mask
            self._state[1] = self.registers.intr_status
        level = self.registers.intx_asserted
        if (level != self._intx_level or force) and self.hub is not None:
            self._intx_level = level
            await self.hub.set_intx(level)

    def _doorbell_ignored(self, before: RegisterStats, word: int, rung: Doorbell | None) -> None:
        doorbell = Doorbell.decode(word)
        if rung is not None:
            # Our view said the target exists but the hub found none: it left meanwhile.
            log.debug("%s: doorbell %s: the target has just left", self.info.device, doorbell)
            return
        after = self.registers.statistics()
        ignored = after.doorbells_no_peer + after.doorbells_no_vector
        if ignored & (ignored - 1) == 0:
            why = (
                "no such peer"
                if after.doorbells_no_peer > before.doorbells_no_peer
                else "no such vector"
            )
            log.warning(
                "%s: ignored doorbell to peer %d vector %d: %s (%d ignored so far)",
                self.info.device,
                doorbell.peer,
                doorbell.vector,
                why,
                ignored,
            )

    @staticmethod
    def _check_bar(bar: int) -> None:
        if bar != 0:
            raise MessageError(
                ErrorCode.BAD_RANGE,
                f"BAR{bar} is not the device's: BAR1 is MSI-X (the hub's), BAR2 memory (mapped)",
            )


@contextmanager
def _guest_access() -> Iterator[None]:
    """A bad register access is the guest's error, answered as such (nothing changed)."""
    try:
        yield
    except RegisterAccessError as exc:
        raise MessageError(ErrorCode.BAD_RANGE, str(exc)) from None


def _size(text: str) -> int:
    try:
        return shm_size(parse_size(text))
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name", default="ivshmem", help="the shared region to join (default ivshmem)"
    )
    parser.add_argument(
        "--size",
        type=_size,
        default="4M",
        help="region size, K/M/G suffixes, rounded up to a power of two (default 4M)",
    )
    parser.add_argument(
        "--vectors",
        type=int_in(1, MAX_VECTORS, "vector count"),
        default=1,
        help=f"MSI-X vectors, 1..{MAX_VECTORS} (default 1)",
    )


async def serve(args: argparse.Namespace) -> None:
    """Register and serve until the hub goes away. A refused registration (a name taken with
    another size, a route budget too small...) is an error exit with the hub's reason."""
    model = IvshmemDevice(args.id, args.name, args.size, args.vectors)
    refused: BaseException | None = None
    try:
        async with open_device(args.socket, model) as (link, reply):
            log.info("%s registered%s", args.id, " (restarted)" if reply.restarted else "")
            await model.resume()
            await link.peer.closed.wait()
            log.warning("hub connection closed: %s", link.peer.close_reason)
    except* RemoteError as group:
        refused = group
        while isinstance(refused, BaseExceptionGroup):  # the hub's answer, out of the nurseries
            refused = refused.exceptions[0]
    if refused is not None:
        log.error("%s: the hub refused the device: %s", args.id, refused)
        raise SystemExit(1)
