"""One ivshmem name: a shared region, a vector count, and the peers attached to it.

Pure model: no sockets, no trio. It owns file descriptors (the region, and every peer's
per-vector eventfds) and closes each exactly once; it tells nobody anything itself. ``join``
and ``leave`` return the announcements every other peer must receive as data (``Notice``),
and ``dispatch`` hands each to the recipient's ``PeerSink``, the front end that reaches it
(a QEMU-protocol connection, or a peer attached through msixhub's own protocol).

Peer ids. The spec gives them 16 bits and says the first peer gets 0. An id is handed out by
a cursor that walks 0, 1, ..., 65535, 0, ... skipping ids that are live, so an id that left
comes back only after every other free id has been handed out since: the longest a 16-bit id
can stay retired. Each peer receives its announcements in order, so it always hears of a
departure before any join that reuses the id.

The seam for the hub (``DomainHooks``), three calls, all synchronous:

* ``vector_fds(domain, peer_id)`` -> the peer's eventfds, one per vector: other peers write
  them to ring that vector, the peer (or the hub, while the vector is masked) reads them. This
  is where the hub reserves a route per vector (``use``); it may raise to refuse the join,
  and then nothing changes. The domain owns the returned fds (the hub dups what it keeps).
* ``peer_joined(domain, peer_id)`` after the peer is in (a notification: it must not raise).
* ``peer_left(domain, peer_id, vectors)`` before its eventfds are closed, so the hub can stop
  reading them (``unuse``) while they are still open.

The default (``EventfdHooks``) makes plain eventfds and does nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from msixhub.devices.ivshmem.sizes import MAX_SHM_SIZE, is_valid_shm_size
from msixhub.protocol.errors import ErrorCode, MessageError
from msixhub.protocol.fds import OwnedFd, close_all, eventfd, memfd

PEER_ID_SPACE = 1 << 16
MAX_VECTORS = 64
"""As QEMU's contrib server (IVSHMEM_SERVER_MAX_VECTORS)."""


class DomainConfigError(ValueError):
    """A domain cannot be made with these parameters (name, size or vector count)."""


class DomainConflict(MessageError):
    """The name is taken by a domain with a different size or vector count."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CONFLICT, message)


class DomainFull(MessageError):
    """All 65536 peer ids are live."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_STATE, message)


class UnknownPeer(MessageError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.NOT_FOUND, message)


class UnknownDomain(MessageError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.NOT_FOUND, message)


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """Peer ``peer_id`` is reachable: writing ``vectors[v]`` rings its vector v. The fds are
    borrowed from the domain; one that is closed by the time it is used means the peer left."""

    peer_id: int
    vectors: tuple[OwnedFd, ...]


@dataclass(frozen=True, slots=True)
class PeerLeft:
    peer_id: int


Announcement = PeerJoined | PeerLeft


@dataclass(frozen=True, slots=True)
class Notice:
    """``event`` must reach peer ``recipient``."""

    recipient: int
    event: Announcement


@dataclass(frozen=True, slots=True)
class JoinResult:
    """What a new peer learns: its id, its own vectors (to read), the peers already there
    (in join order), and the notices telling them about it."""

    peer_id: int
    vectors: tuple[OwnedFd, ...]
    existing: tuple[PeerJoined, ...]
    notices: tuple[Notice, ...]


@dataclass(frozen=True, slots=True)
class DomainStats:
    name: str
    size: int
    vectors: int
    peers: int
    joins: int
    leaves: int


class PeerSink(Protocol):
    """Reaches one peer. ``announce`` queues the event for it; it must not raise and must not
    call back into the domain (a sink that cannot keep up drops its peer later, on its own)."""

    def announce(self, event: Announcement) -> None: ...


class DomainHooks(Protocol):
    """The hub's seam (see module docstring)."""

    def vector_fds(self, domain: IvshmemDomain, peer_id: int) -> list[OwnedFd]: ...

    def peer_joined(self, domain: IvshmemDomain, peer_id: int) -> None: ...

    def peer_left(
        self, domain: IvshmemDomain, peer_id: int, vectors: tuple[OwnedFd, ...]
    ) -> None: ...


class EventfdHooks:
    """No hub: each vector is a plain eventfd that peers write and its owner reads.
    Non-blocking, as QEMU's contrib server makes them: under KVM, QEMU reads its own vectors'
    eventfds without waiting for them when the guest reads the PBA (``ivshmem_vector_poll``),
    and a blocking one would stop QEMU there."""

    def vector_fds(self, domain: IvshmemDomain, peer_id: int) -> list[OwnedFd]:
        fds: list[OwnedFd] = []
        try:
            for vector in range(domain.vectors):
                fd = eventfd()
                fd.name = f"ivshmem:{domain.name}:peer{peer_id}:v{vector}"
                fds.append(fd)
        except BaseException:
            close_all(fds)
            raise
        return fds

    def peer_joined(self, domain: IvshmemDomain, peer_id: int) -> None:
        pass

    def peer_left(self, domain: IvshmemDomain, peer_id: int, vectors: tuple[OwnedFd, ...]) -> None:
        pass


@dataclass(slots=True)
class _Peer:
    vectors: tuple[OwnedFd, ...]
    sink: PeerSink


def check_domain_params(name: str, size: int, vectors: int) -> None:
    """Raise ``DomainConfigError`` unless a domain can have this name, size and vector count."""
    if not name or "/" in name or "\0" in name or len(name.encode()) > 255:
        raise DomainConfigError(f"invalid ivshmem name {name!r}: 1..255 bytes, no '/' or NUL")
    if not is_valid_shm_size(size):
        raise DomainConfigError(
            f"invalid ivshmem size {size}: a power of two from a page up to {MAX_SHM_SIZE}"
        )
    if not 1 <= vectors <= MAX_VECTORS:
        raise DomainConfigError(
            f"invalid vector count {vectors}: 1..{MAX_VECTORS} (with none, peers could not "
            "learn of each other's joins)"
        )


class IvshmemDomain:
    """The peers sharing one region. Owns ``shm`` and every peer's vector eventfds."""

    def __init__(
        self,
        name: str,
        shm: OwnedFd,
        vectors: int,
        *,
        hooks: DomainHooks | None = None,
    ) -> None:
        """``shm`` must already have its final size (``msixhub.devices.ivshmem.sizes``)."""
        size = os.fstat(shm.fileno()).st_size
        check_domain_params(name, size, vectors)
        self.name = name
        self.size = size
        self.vectors = vectors
        self.shm = shm
        self._hooks: DomainHooks = hooks if hooks is not None else EventfdHooks()
        self._peers: dict[int, _Peer] = {}
        self._cursor = 0
        self._joins = 0
        self._leaves = 0

    def join(self, sink: PeerSink) -> JoinResult:
        """Attach a peer reached through ``sink``. Nothing changes if this raises (unless the
        ``peer_joined`` hook itself raises, which it must not)."""
        if self.shm.closed:
            raise DomainConfigError(f"ivshmem domain {self.name!r} is closed")
        peer_id = self._free_id()
        fds = self._hooks.vector_fds(self, peer_id)
        if len(fds) != self.vectors:
            close_all(fds)
            raise DomainConfigError(
                f"vector_fds gave {len(fds)} eventfds for {self.vectors} vectors"
            )
        vectors = tuple(fds)
        existing = tuple(PeerJoined(pid, p.vectors) for pid, p in self._peers.items())
        joined = PeerJoined(peer_id, vectors)
        notices = tuple(Notice(pid, joined) for pid in self._peers)
        self._peers[peer_id] = _Peer(vectors, sink)
        self._cursor = (peer_id + 1) % PEER_ID_SPACE
        self._joins += 1
        self._hooks.peer_joined(self, peer_id)
        return JoinResult(peer_id, vectors, existing, notices)

    def leave(self, peer_id: int) -> tuple[Notice, ...]:
        """Detach a peer and close its eventfds; return the notices for those who remain."""
        peer = self._peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(f"no peer {peer_id} in ivshmem domain {self.name!r}")
        del self._peers[peer_id]
        self._leaves += 1
        try:
            self._hooks.peer_left(self, peer_id, peer.vectors)
        finally:
            close_all(list(peer.vectors))
        left = PeerLeft(peer_id)
        return tuple(Notice(pid, left) for pid in self._peers)

    def dispatch(self, notices: tuple[Notice, ...]) -> None:
        """Hand each notice to its recipient's sink (recipients gone since are skipped)."""
        for notice in notices:
            peer = self._peers.get(notice.recipient)
            if peer is not None:
                peer.sink.announce(notice.event)

    def vector_count(self, peer_id: int) -> int:
        """How many vectors ``peer_id`` has; 0 if there is no such peer (a ``PeerVectors``)."""
        return self.vectors if peer_id in self._peers else 0

    def vector_fd(self, peer_id: int, vector: int) -> OwnedFd | None:
        """The eventfd that rings ``vector`` of ``peer_id``; None if either does not exist."""
        peer = self._peers.get(peer_id)
        if peer is None or not 0 <= vector < len(peer.vectors):
            return None
        return peer.vectors[vector]

    def peer_ids(self) -> Iterator[int]:
        """Live peer ids in join order."""
        return iter(tuple(self._peers))

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def statistics(self) -> DomainStats:
        return DomainStats(
            self.name, self.size, self.vectors, len(self._peers), self._joins, self._leaves
        )

    def close(self) -> None:
        """Detach every peer (without notices: nobody is left to tell) and close the region."""
        try:
            for peer_id in tuple(self._peers):
                self.leave(peer_id)
        finally:
            self.shm.close()

    def _free_id(self) -> int:
        for step in range(PEER_ID_SPACE):
            candidate = (self._cursor + step) % PEER_ID_SPACE
            if candidate not in self._peers:
                return candidate
        raise DomainFull(f"ivshmem domain {self.name!r} has {PEER_ID_SPACE} peers, no free id")


class IvshmemDomains:
    """Every ivshmem name the hub knows: one region per name, created on first open."""

    def __init__(self) -> None:
        self._domains: dict[str, IvshmemDomain] = {}

    def open(
        self,
        name: str,
        size: int,
        vectors: int,
        *,
        hooks: DomainHooks | None = None,
        shm: OwnedFd | None = None,
    ) -> IvshmemDomain:
        """The domain called ``name``, created with a fresh memfd if new. ``size`` is the final
        region size (see ``sizes.shm_size``). Opening an existing name with another size or
        vector count is a ``DomainConflict``.

        ``shm``: the region to use instead of a fresh memfd (a POSIX shm object or a file, as
        ``msixhub ivshmem-server -M/-m`` makes), already ``size`` bytes. Its ownership passes
        here, even when this raises (a name that exists already has a region: a conflict)."""
        existing = self._domains.get(name)
        if existing is not None:
            if shm is not None:
                shm.close()
                raise DomainConflict(f"ivshmem name {name!r} exists with a region of its own")
            if (existing.size, existing.vectors) != (size, vectors):
                raise DomainConflict(
                    f"ivshmem name {name!r} exists with size {existing.size} and "
                    f"{existing.vectors} vectors; asked for size {size} and {vectors} vectors"
                )
            return existing
        try:
            check_domain_params(name, size, vectors)
        except BaseException:
            if shm is not None:
                shm.close()
            raise
        if shm is None:
            shm = memfd(size, f"ivshmem:{name}")
        try:
            domain = IvshmemDomain(name, shm, vectors, hooks=hooks)
        except BaseException:
            shm.close()
            raise
        self._domains[name] = domain
        return domain

    def get(self, name: str) -> IvshmemDomain | None:
        return self._domains.get(name)

    def names(self) -> list[str]:
        return list(self._domains)

    def close(self, name: str) -> None:
        domain = self._domains.pop(name, None)
        if domain is None:
            raise UnknownDomain(f"no ivshmem domain {name!r}")
        domain.close()

    def close_all(self) -> None:
        for name in list(self._domains):
            self.close(name)
