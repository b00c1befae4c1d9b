"""ivshmem in the hub: shared-memory domains whose msixhub peers are hub devices.

A device that registers with ``shared_memory`` set (``msixhub spawn ivshmem``) is one peer of
the domain of that name (``IvshmemDomains``: one region per name, created on first use). QEMU
peers join the same domain through ``serve_qemu_protocol`` (``msixhub serve --ivshmem-socket``,
``msixhub ivshmem-server``), so both kinds share the region and ring each other.

Membership. An msixhub peer is the pair (device, the VMM that attaches it):

* the device joins when it registers, or when a VMM attaches it and it is not a member;
* it leaves when that VMM detaches or goes away, and when its daemon goes away while no VMM
  holds it (no guest can have seen its id then);
* a daemon that dies under an attached VMM keeps the peer id: the hub keeps the device, its
  eventfds and MSI-X state, other peers keep ringing it (the daemon is not on that path:
  the VMM or the hub reads the eventfds), and the restarted daemon is told its id again.

Peer ids are never reused while a peer may hold the old one (``IvshmemDomain``'s cursor).

Vectors. A member's vectors are eventfds made here for its whole membership, whatever its
routes: other peers hold them (a QEMU peer keeps the fds of its greeting), so a route change
must not replace them. They are the device's vector channels (``PeerChannels``). With a route
a vector works as any device's does (the VMM reads while unmasked, the hub while masked, so
the pending bit is exact); without one (lazy before the first delivery or after an eviction,
the direct policy) the hub reads it and the MSI-X model delivers by message. A doorbell is
therefore one eventfd write under every policy. Under ``static`` every vector is used, so
routed, at join; a budget that cannot cover them refuses the registration up front
(``no-route``), the static policy's promise (the model keeps "used == routed" under static,
so there is no used-but-unrouted fallback).

Doorbells. Each member's VMM gets an ioeventfd for every (peer, vector) of the domain, its
own included as in QEMU: a guest write of ``peer << 16 | vector`` to the Doorbell register is
the VMM's own eventfd write into the target's vector, the hub off the path. The ones of a
peer that leaves are cleared. A doorbell that reaches the hub anyway (a VMM that has no
ioeventfd for a live target yet) is rung by the hub itself; anything else goes to the daemon,
which counts and ignores a doorbell to a peer or vector that does not exist, and refuses a
malformed access.

Messages to a member's VMM and to its daemon go through one ``_Courier`` each: the domain
announces joins and departures from synchronous code, and each recipient must see them, and
the snapshots taken at attach or registration, in the order they happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from msixhub.devices.ivshmem.domain import (
    PEER_ID_SPACE,
    Announcement,
    DomainConfigError,
    DomainConflict,
    DomainFull,
    EventfdHooks,
    IvshmemDomain,
    IvshmemDomains,
    PeerJoined,
    check_domain_params,
)
from msixhub.devices.ivshmem.qemu_server import serve_qemu_protocol
from msixhub.devices.ivshmem.regs import BAR0_SIZE, Doorbell, Register
from msixhub.devices.ivshmem.sizes import SizeError, parse_size, shm_size
from msixhub.protocol.errors import ConnectionClosed, ErrorCode, MessageError, MsixhubError
from msixhub.protocol.fds import OwnedFd, close_all, eventfd_write, vector_eventfd
from msixhub.protocol.messages import (
    ClearIoeventfd,
    DeviceInfo,
    IvshmemIntx,
    IvshmemPeer,
    IvshmemPosition,
    MmioWrite,
    SetBarMemory,
    SetIoeventfd,
)
from msixhub.protocol.schema import Message
from msixhub.server.channels import CountSink, VectorChannels
from msixhub.server.routes import NoRouteError, RoutePolicy

if TYPE_CHECKING:
    from msixhub.server.hub import Device, Hub, Vmm

log = logging.getLogger("msixhub.hub.ivshmem")

DEFAULT_NAME = "ivshmem"
DEFAULT_SIZE = 4 << 20
REGISTERS_BAR = 0
SHARED_MEMORY_BAR = 2
COURIER_LIMIT = 4096
"""Messages that may wait for one member's VMM or daemon; past it, that peer is dropped."""


class QemuSocketError(ValueError):
    """``--ivshmem-*`` options that cannot make a domain."""


@dataclass(frozen=True, slots=True)
class QemuSocket:
    """``msixhub serve --ivshmem-socket PATH``: QEMU's ivshmem protocol for one domain."""

    path: str
    name: str = DEFAULT_NAME
    size: int = DEFAULT_SIZE
    vectors: int = 1

    @classmethod
    def parse(cls, path: str, name: str, size: str, vectors: int) -> QemuSocket:
        """From option text: ``size`` as QEMU spells it (4M, 1G, 0x10000)."""
        try:
            config = cls(path, name, shm_size(parse_size(size)), vectors)
            check_domain_params(config.name, config.size, config.vectors)
        except (SizeError, DomainConfigError) as exc:
            raise QemuSocketError(str(exc)) from None
        return config


async def serve_qemu_socket(
    hub: Hub, config: QemuSocket, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``config``'s socket for ``hub`` (a stale socket file from a crash is replaced,
    as the hub's own socket is)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(config.path).st_mode):
            os.unlink(config.path)
    await hub.ivshmem.serve_qemu(
        config.path, config.name, config.size, config.vectors, task_status=task_status
    )


class PeerChannels(VectorChannels):
    """An ivshmem member's vector channels: one eventfd per vector for its whole membership.

    Routed vectors are in ``fds`` and behave as the base class says. Each vector that has no
    route is read by the hub all the time (``_unrouted``); its counts go to the MSI-X model,
    which delivers them by message (direct path) or sets pending while masked. A route that
    comes or goes moves the vector between the two without touching its eventfd, draining it
    first so no count is lost or read twice.
    """

    def __init__(self, nursery: trio.Nursery, on_counts: CountSink) -> None:
        super().__init__(nursery, on_counts)
        self.peer_fds: list[OwnedFd] = []
        self._unrouted: dict[int, trio.CancelScope] = {}

    def attach_peer(self, vectors: int) -> list[OwnedFd]:
        """Fresh eventfds for a peer that joins; return the domain's copies (its own fds)."""
        if self.peer_fds:
            raise ValueError("this device is a peer already")
        fds: list[OwnedFd] = []
        copies: list[OwnedFd] = []
        try:
            for vector in range(vectors):
                fd = vector_eventfd()
                fd.name = f"ivshmem-v{vector}"
                fds.append(fd)
                copies.append(fd.dup())
        except BaseException:
            close_all(fds)
            close_all(copies)
            raise
        self.peer_fds = fds
        for vector in range(vectors):
            self._read_unrouted(vector)
        return copies

    def retire(self, *, drain: bool = True) -> None:
        """The peer left (its vectors are unused and unrouted by now): stop reading, hand
        what the eventfds still hold to the model (it drops it, counted), close them."""
        for vector in list(self._unrouted):
            self._unrouted.pop(vector).cancel()
        for vector, fd in enumerate(self.peer_fds):
            if self.fds.get(vector) is fd:  # still routed: only at hub shutdown
                self.stop_reading(vector)
                del self.fds[vector]
            if drain:
                self._drain(vector, fd)
            trio.lowlevel.notify_closing(fd.fileno())
        close_all(self.peer_fds)

    def open(self, vector: int) -> OwnedFd:
        if not self.peer_fds:
            return super().open(vector)
        if vector in self.fds:
            raise ValueError(f"vector {vector} already has a channel")
        self._stop_unrouted(vector)
        fd = self.fds[vector] = self.peer_fds[vector]
        return fd

    def close(self, vector: int) -> None:
        fd = self.fds.get(vector)
        if fd is None or vector >= len(self.peer_fds) or fd is not self.peer_fds[vector]:
            super().close(vector)
            return
        self.stop_reading(vector)
        del self.fds[vector]
        self._read_unrouted(vector)

    def is_reading(self, vector: int) -> bool:
        return vector in self._unrouted or super().is_reading(vector)

    def drain(self, vector: int) -> None:
        super().drain(vector)
        if vector in self._unrouted:
            self._drain(vector, self.peer_fds[vector])

    def drain_all(self) -> None:
        super().drain_all()
        for vector in list(self._unrouted):
            self._drain(vector, self.peer_fds[vector])

    def close_all(self) -> None:
        self.retire(drain=False)
        super().close_all()

    def _read_unrouted(self, vector: int) -> None:
        scope = self._unrouted[vector] = trio.CancelScope()
        self._nursery.start_soon(self._read, vector, self.peer_fds[vector], scope)

    def _stop_unrouted(self, vector: int) -> None:
        scope = self._unrouted.pop(vector, None)
        if scope is not None:
            scope.cancel()
            self._drain(vector, self.peer_fds[vector])


Job = Callable[[], Awaitable[None]]


class _Courier:
    """Runs the jobs posted for one recipient one at a time, in posting order."""

    def __init__(self, nursery: trio.Nursery, name: str, on_overflow: Callable[[], None]) -> None:
        self._send, receive = trio.open_memory_channel[Job](COURIER_LIMIT)
        self._name = name
        self._on_overflow = on_overflow
        nursery.start_soon(self._run, receive)

    def post(self, job: Job) -> bool:
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            log.warning("%s: %d messages waiting; dropping the peer", self._name, COURIER_LIMIT)
            self._on_overflow()
            return False
        except trio.ClosedResourceError:
            return False
        return True

    async def call(self, job: Job) -> None:
        """Post ``job`` and wait until it has run (after every job posted before it)."""
        done = trio.Event()

        async def run_then_signal() -> None:
            try:
                await job()
            finally:
                done.set()

        if self.post(run_then_signal):
            await done.wait()

    async def _run(self, receive: trio.MemoryReceiveChannel[Job]) -> None:
        async with receive:
            async for job in receive:
                try:
                    await job()
                except (MsixhubError, trio.TooSlowError) as exc:
                    log.warning("%s: %s", self._name, exc)

    def close(self) -> None:
        self._send.close()


@dataclass(eq=False)
class Member:
    """An ivshmem device of the hub, and its membership of its domain (``peer_id``)."""

    host: IvshmemHost
    device: Device
    domain: IvshmemDomain
    channels: PeerChannels
    to_vmm: _Courier
    to_daemon: _Courier
    peer_id: int | None = None
    vmm: Vmm | None = None
    vmm_generation: int = 0  # bumped at attach and detach: older VMM jobs are void
    missed_intx: int | None = None  # a vector rung in INTx mode while the daemon was away
    intx_queued: bool = False
    relayed: int = 0  # doorbells the hub rang for this device's VMM

    def announce(self, event: Announcement) -> None:
        """``PeerSink``: the domain tells this member of another peer's join or departure."""
        self.host.announce(self, event)


class IvshmemHost:
    """Every ivshmem domain of one hub, and the hub's ivshmem devices as their peers.

    The hub calls ``admit`` before it creates a device, then ``device_up`` (registered),
    ``device_down`` (daemon gone), ``attach`` (before a VMM gets the device), ``detached``,
    ``raise_intx`` (a ring while MSI-X is disabled), ``doorbell`` (a Doorbell write that
    reached it) and ``close``. It is also the domains' ``DomainHooks``.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self.domains = IvshmemDomains()
        self._members: dict[str, Member] = {}
        self._joining: Member | None = None
        self._plain = EventfdHooks()
        self._closed = False
        self._served: set[str] = set()  # domains with a QEMU-protocol socket

    # --- what the hub calls ----------------------------------------------------------------

    def admit(self, info: DeviceInfo) -> None:
        """Refuse, before anything changes, a new device that could not join its domain."""
        if not info.shared_memory:
            if info.shared_size:
                raise MessageError(ErrorCode.BAD_FIELD, "shared_size without shared_memory")
            return
        name, size, vectors = info.shared_memory, info.shared_size, info.num_vectors
        try:
            check_domain_params(name, size, vectors)
        except DomainConfigError as exc:
            raise MessageError(ErrorCode.BAD_RANGE, str(exc)) from None
        bars = {bar.index: bar.size for bar in info.bars}
        if bars.get(SHARED_MEMORY_BAR) != size:
            raise MessageError(
                ErrorCode.BAD_FIELD, f"BAR{SHARED_MEMORY_BAR} must be the {size}-byte region"
            )
        if bars.get(REGISTERS_BAR, 0) < BAR0_SIZE or info.msix.bar == REGISTERS_BAR:
            raise MessageError(
                ErrorCode.BAD_FIELD, f"BAR0 must hold the {BAR0_SIZE}-byte ivshmem registers"
            )
        domain = self.domains.get(name)
        if domain is not None:
            if (domain.size, domain.vectors) != (size, vectors):
                raise DomainConflict(
                    f"ivshmem name {name!r} exists with size {domain.size} and "
                    f"{domain.vectors} vectors; device {info.device!r} asked for size {size} "
                    f"and {vectors} vectors"
                )
            if len(domain) >= PEER_ID_SPACE:
                raise DomainFull(f"ivshmem domain {name!r} has no free peer id")
        routes = self._hub.routes
        free = routes.budget - routes.stats().in_use
        if routes.policy is RoutePolicy.STATIC and free < vectors:
            raise NoRouteError(
                f"ivshmem device {info.device!r} needs a route for each of its {vectors} "
                f"vectors; {free} of {routes.budget} are free"
            )

    async def device_up(self, device: Device) -> None:
        """The device's daemon registered (under the device's lock): join, or tell it its id."""
        if not device.info.shared_memory:
            return
        member = self._members.get(device.id) or self._new_member(device)
        if member.peer_id is not None:
            await self._sync_daemon(member)
            return
        try:
            await self._join(member)
        except (MsixhubError, OSError) as exc:  # admitted, so only out of fds or ids
            log.error("device %s could not join ivshmem %r: %s", device.id, member.domain.name, exc)
            await self._sync_daemon(member)

    async def device_down(self, device: Device) -> None:
        """The daemon went away: the peer leaves unless a VMM holds the device."""
        member = self._members.get(device.id)
        if member is None or self._closed:
            return
        async with device.lock:
            # Unless it came back meanwhile (its re-registration may win the lock).
            if device.peer is None and member.vmm is None and member.peer_id is not None:
                await self._leave(member)

    async def attach(self, device: Device, vmm: Vmm) -> None:
        """Before ``vmm`` gets the device (under the device's lock): join if the device is not a
        member (this may refuse, and then nothing changed), then hand the VMM the region
        (BAR2) and an ioeventfd for every peer's vectors."""
        member = self._members.get(device.id)
        if member is None:
            return
        if member.peer_id is None:
            await self._join(member)
        member.vmm = vmm
        await self._sync_vmm(member)

    async def detached(self, device: Device) -> None:
        """The VMM let the device go (under the device's lock): the pair ends, the peer leaves."""
        member = self._members.get(device.id)
        if member is None or self._closed:
            return
        member.vmm = None
        member.vmm_generation += 1
        if member.peer_id is not None:
            await self._leave(member)

    def raise_intx(self, device: Device, vector: int) -> None:
        """A peer rang ``vector`` while the device's MSI-X is disabled: its IntrStatus is the
        daemon's. Rings coalesce while one is on its way (IntrStatus is a level)."""
        member = self._members[device.id]
        if member.intx_queued:
            return
        if device.peer is None:
            member.missed_intx = vector
            return

        async def send() -> None:
            member.intx_queued = False
            if not await self._notify_daemon(member, IvshmemIntx(vector)):
                member.missed_intx = vector

        member.intx_queued = member.to_daemon.post(send)

    def doorbell(self, device: Device, write: MmioWrite) -> bool:
        """A write that reached the hub: if it is a Doorbell ringing a live peer's vector,
        ring it here and return True. Everything else is the daemon's (False)."""
        member = self._members.get(device.id)
        offset = write.offset - Register.DOORBELL
        if (
            member is None
            or member.peer_id is None
            or write.bar != REGISTERS_BAR
            or not 0 <= offset < 4
            or write.size not in (1, 2, 4)
            or offset % write.size
            or write.value >> (8 * write.size)
        ):
            return False
        target = Doorbell.decode(write.value << (8 * offset))
        fd = member.domain.vector_fd(target.peer, target.vector)
        if fd is None:
            return False
        eventfd_write(fd.fileno())
        member.relayed += 1
        return True

    def report(self) -> list[dict[str, object]]:
        """Each domain, its peers (``device`` None: a QEMU-protocol peer) and counters."""
        domains = []
        for name in self.domains.names():
            domain = self.domains.get(name)
            assert domain is not None
            stats = domain.statistics()
            members = {m.peer_id: m for m in self._members.values() if m.domain is domain}
            peers = []
            for peer_id in domain.peer_ids():
                member = members.get(peer_id)
                peers.append(
                    {
                        "peer_id": peer_id,
                        "device": member.device.id if member else None,
                        "relayed_doorbells": member.relayed if member else 0,
                    }
                )
            domains.append(
                {
                    "name": name,
                    "size": stats.size,
                    "vectors": stats.vectors,
                    "joins": stats.joins,
                    "leaves": stats.leaves,
                    "peers": peers,
                }
            )
        return domains

    def close(self) -> None:
        """Hub shutdown (after the devices' channels are closed): close every domain no
        QEMU-protocol socket serves (``serve_qemu`` closes those once its peers are gone)."""
        self._closed = True
        for member in self._members.values():
            member.to_vmm.close()
            member.to_daemon.close()
            member.peer_id = None
        for name in self.domains.names():
            if name not in self._served:  # those close once their connections are gone
                self.domains.close(name)

    # --- QEMU-protocol peers ---------------------------------------------------------------

    async def serve_qemu(
        self,
        listener: str | os.PathLike[str] | socket.socket,
        name: str,
        size: int,
        vectors: int,
        *,
        shm: OwnedFd | None = None,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve QEMU's ivshmem protocol on ``listener`` for the domain ``name`` (created if
        new, on ``shm`` if given) until cancelled. The domain outlives this only while the
        hub runs: its connections leave it before the hub closes it."""
        domain = self.domains.open(name, size, vectors, hooks=self, shm=shm)
        self._served.add(name)
        try:
            await serve_qemu_protocol(listener, domain, task_status=task_status)
        finally:
            self._served.discard(name)
            if self._closed and self.domains.get(name) is domain:
                self.domains.close(name)

    # --- DomainHooks -----------------------------------------------------------------------

    def vector_fds(self, domain: IvshmemDomain, peer_id: int) -> list[OwnedFd]:
        member = self._joining
        if member is not None and member.domain is domain:
            return member.channels.attach_peer(domain.vectors)
        # A QEMU peer owns its vectors: plain eventfds, which the hub can neither mask nor read.
        return self._plain.vector_fds(domain, peer_id)

    def peer_joined(self, domain: IvshmemDomain, peer_id: int) -> None:
        pass

    def peer_left(self, domain: IvshmemDomain, peer_id: int, vectors: tuple[OwnedFd, ...]) -> None:
        pass  # a member's own eventfds are PeerChannels', closed by _leave

    # --- membership --------------------------------------------------------------------------

    def _new_member(self, device: Device) -> Member:
        info = device.info
        hub = self._hub
        domain = self.domains.open(
            info.shared_memory, info.shared_size, info.num_vectors, hooks=self
        )
        nursery = hub._nursery
        holder: list[Member] = []
        member = Member(
            host=self,
            device=device,
            domain=domain,
            channels=PeerChannels(nursery, lambda v, n: hub._on_counts(device, v, n)),
            to_vmm=_Courier(nursery, f"VMM of {device.id}", lambda: self._drop_vmm(holder[0])),
            to_daemon=_Courier(nursery, f"daemon {device.id}", lambda: self._drop_daemon(device)),
        )
        holder.append(member)
        device.channels = member.channels
        self._members[device.id] = member
        return member

    async def _join(self, member: Member) -> None:
        device = member.device
        device.msix.use_all()  # static: every vector gets its route (admit checked the budget)
        self._joining = member
        try:
            join = member.domain.join(member)
        except BaseException:
            device.msix.unuse_all()
            raise
        finally:
            self._joining = None
        member.peer_id = join.peer_id
        await self._hub._apply_route_changes(device)
        member.domain.dispatch(join.notices)
        log.info(
            "device %s joined ivshmem %r as peer %d", device.id, member.domain.name, join.peer_id
        )
        await self._sync_daemon(member)

    async def _leave(self, member: Member) -> None:
        device = member.device
        peer_id = member.peer_id
        assert peer_id is not None
        device.msix.unuse_all()  # withdraws pending rings and routes
        await self._hub._apply_route_changes(device)
        # Every fd of the peer is closed before anyone hears that it left.
        member.channels.retire()
        member.peer_id = None
        member.domain.dispatch(member.domain.leave(peer_id))
        log.info("device %s left ivshmem %r (peer %d)", device.id, member.domain.name, peer_id)
        await self._sync_daemon(member)

    def announce(self, member: Member, event: Announcement) -> None:
        """Queue ``event`` (another peer's join or departure) for the member's daemon and VMM."""
        device = member.device
        joined = isinstance(event, PeerJoined)
        notice = IvshmemPeer(device.id, event.peer_id, joined)
        if device.peer is not None:

            async def tell_daemon() -> None:
                await self._notify_daemon(member, notice)

            member.to_daemon.post(tell_daemon)
        vmm, generation = member.vmm, member.vmm_generation
        if vmm is None:
            return

        async def tell_vmm() -> None:
            if member.vmm_generation != generation:
                return
            if isinstance(event, PeerJoined):
                await self._set_doorbells(vmm, device, event.peer_id, event.vectors)
            else:
                for vector in range(member.domain.vectors):
                    await self._request_vmm(
                        vmm, _doorbell_ioeventfd(ClearIoeventfd, device, event.peer_id, vector)
                    )
            self._hub._post(vmm, notice)

        member.to_vmm.post(tell_vmm)

    async def _sync_daemon(self, member: Member) -> None:
        """Tell the daemon its peer id and the other peers (as the domain is now)."""
        device = member.device
        peer_id = member.peer_id
        others = (
            [p for p in member.domain.peer_ids() if p != peer_id] if peer_id is not None else []
        )
        missed, member.missed_intx = member.missed_intx, None

        async def sync() -> None:
            await self._notify_daemon(member, IvshmemPosition(-1 if peer_id is None else peer_id))
            for other in others:
                await self._notify_daemon(member, IvshmemPeer(device.id, other, True))
            if missed is not None and not await self._notify_daemon(member, IvshmemIntx(missed)):
                member.missed_intx = missed

        if device.peer is not None:
            await member.to_daemon.call(sync)
        else:
            member.missed_intx = missed

    async def _sync_vmm(self, member: Member) -> None:
        """Hand a newly attached VMM the region and the doorbells of every peer there is."""
        member.vmm_generation += 1
        generation, vmm, device, domain = (
            member.vmm_generation,
            member.vmm,
            member.device,
            member.domain,
        )
        assert vmm is not None
        peers = [
            (p, tuple(domain.vector_fd(p, v) for v in range(domain.vectors)))
            for p in domain.peer_ids()
        ]

        async def sync() -> None:
            if member.vmm_generation != generation:
                return
            with domain.shm.dup() as shm:
                await self._request_vmm(
                    vmm, SetBarMemory(device.id, SHARED_MEMORY_BAR, domain.size), [shm]
                )
            for peer_id, fds in peers:
                await self._set_doorbells(vmm, device, peer_id, fds)
                if peer_id != member.peer_id:
                    self._hub._post(vmm, IvshmemPeer(device.id, peer_id, True))

        await member.to_vmm.call(sync)

    async def _set_doorbells(
        self, vmm: Vmm, device: Device, peer_id: int, fds: tuple[OwnedFd | None, ...]
    ) -> None:
        for vector, fd in enumerate(fds):
            if fd is None or fd.closed:
                continue  # the peer left since; its departure is queued behind this
            with fd.dup() as copy:  # the domain may close its fd while we send
                await self._request_vmm(
                    vmm, _doorbell_ioeventfd(SetIoeventfd, device, peer_id, vector), [copy]
                )

    async def _request_vmm(self, vmm: Vmm, body: Message, fds: Sequence[OwnedFd] = ()) -> None:
        """A request to a member's VMM. A failure ends the job (the courier logs it); a VMM
        that does not answer in time is disconnected, so that what is queued behind fails at
        once instead of each waiting out its own timeout."""
        try:
            await vmm.peer.call(body, [fd.fileno() for fd in fds])
        except trio.TooSlowError:
            await vmm.peer.aclose(f"did not answer {type(body).__name__} in time")
            raise

    async def _notify_daemon(self, member: Member, body: Message) -> bool:
        peer = member.device.peer
        if peer is None:
            return False
        try:
            await peer.notify(body)
        except ConnectionClosed:
            return False
        return True

    def _drop_vmm(self, member: Member) -> None:
        vmm = member.vmm
        if vmm is not None:
            self._hub._nursery.start_soon(vmm.peer.aclose, "ivshmem announcements backed up")

    def _drop_daemon(self, device: Device) -> None:
        if device.peer is not None:
            self._hub._nursery.start_soon(device.peer.aclose, "ivshmem notices backed up")


def _doorbell_ioeventfd(
    kind: type[SetIoeventfd] | type[ClearIoeventfd], device: Device, peer_id: int, vector: int
) -> SetIoeventfd | ClearIoeventfd:
    """The ioeventfd of the Doorbell write that rings ``vector`` of ``peer_id``."""
    return kind(device.id, REGISTERS_BAR, Register.DOORBELL, Doorbell(peer_id, vector).encode())
