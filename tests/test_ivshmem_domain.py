"""The pure model of one ivshmem name: peers, ids, eventfds, announcements."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from msixhub.devices.ivshmem.domain import (
    MAX_VECTORS,
    PEER_ID_SPACE,
    Announcement,
    DomainConfigError,
    DomainConflict,
    EventfdHooks,
    IvshmemDomain,
    IvshmemDomains,
    Notice,
    PeerJoined,
    PeerLeft,
    UnknownDomain,
    UnknownPeer,
)
from msixhub.protocol.errors import ErrorCode
from msixhub.protocol.fds import OwnedFd, eventfd_read, eventfd_write, memfd

SIZE = 1 << 20


class Inbox:
    """A PeerSink that keeps what it was told."""

    def __init__(self) -> None:
        self.events: list[Announcement] = []

    def announce(self, event: Announcement) -> None:
        self.events.append(event)


class RecordingHooks(EventfdHooks):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.refuse = False
        self.open_at_leave: list[bool] = []

    def vector_fds(self, domain: IvshmemDomain, peer_id: int) -> list[OwnedFd]:
        if self.refuse:
            raise OSError(24, "no route left")
        self.calls.append(("vector_fds", peer_id))
        return super().vector_fds(domain, peer_id)

    def peer_joined(self, domain: IvshmemDomain, peer_id: int) -> None:
        self.calls.append(("joined", peer_id))

    def peer_left(self, domain: IvshmemDomain, peer_id: int, vectors: tuple[OwnedFd, ...]) -> None:
        self.calls.append(("left", peer_id))
        self.open_at_leave.extend(not fd.closed for fd in vectors)


@pytest.fixture
def domain() -> Iterator[IvshmemDomain]:
    d = IvshmemDomain("test", memfd(SIZE, "ivshmem-test"), 2)
    yield d
    d.close()


def join(domain: IvshmemDomain) -> tuple[int, Inbox]:
    inbox = Inbox()
    result = domain.join(inbox)
    domain.dispatch(result.notices)
    return result.peer_id, inbox


def test_first_peer_gets_id_zero_and_its_vectors(domain: IvshmemDomain) -> None:
    result = domain.join(Inbox())
    assert result.peer_id == 0
    assert len(result.vectors) == 2
    assert all(not fd.closed for fd in result.vectors)
    assert result.existing == ()
    assert result.notices == ()
    assert domain.vector_count(0) == 2
    assert domain.vector_fd(0, 1) is result.vectors[1]


def test_join_tells_existing_peers_and_lists_them_in_order(domain: IvshmemDomain) -> None:
    a, inbox_a = join(domain)
    b, inbox_b = join(domain)
    result = domain.join(Inbox())
    c = result.peer_id
    assert (a, b, c) == (0, 1, 2)
    assert [p.peer_id for p in result.existing] == [a, b]
    assert result.existing[0].vectors == (domain.vector_fd(a, 0), domain.vector_fd(a, 1))
    assert result.notices == (
        Notice(a, PeerJoined(c, result.vectors)),
        Notice(b, PeerJoined(c, result.vectors)),
    )
    domain.dispatch(result.notices)
    b_vectors = (domain.vector_fd(b, 0), domain.vector_fd(b, 1))
    assert inbox_a.events == [PeerJoined(b, b_vectors), PeerJoined(c, result.vectors)]  # type: ignore[arg-type]
    assert inbox_b.events == [PeerJoined(c, result.vectors)]


def test_leave_closes_eventfds_once_and_tells_the_others(domain: IvshmemDomain) -> None:
    a, inbox_a = join(domain)
    b, _ = join(domain)
    vectors = (domain.vector_fd(b, 0), domain.vector_fd(b, 1))
    notices = domain.leave(b)
    assert notices == (Notice(a, PeerLeft(b)),)
    assert all(fd is not None and fd.closed for fd in vectors)
    assert b not in domain and domain.vector_count(b) == 0 and domain.vector_fd(b, 0) is None
    domain.dispatch(notices)
    assert inbox_a.events[-1] == PeerLeft(b)
    with pytest.raises(UnknownPeer) as excinfo:
        domain.leave(b)
    assert excinfo.value.code == ErrorCode.NOT_FOUND


def test_vectors_ring_between_peers(domain: IvshmemDomain) -> None:
    _, inbox_a = join(domain)
    b, _ = join(domain)
    (joined,) = inbox_a.events
    assert isinstance(joined, PeerJoined)
    eventfd_write(joined.vectors[1].fileno())  # a rings b's vector 1
    b_vector_1 = domain.vector_fd(b, 1)
    assert b_vector_1 is not None
    assert eventfd_read(b_vector_1.fileno()) == 1
    assert eventfd_read(domain.vector_fd(b, 0).fileno()) == 0  # type: ignore[union-attr]


def test_dispatch_skips_recipients_that_left(domain: IvshmemDomain) -> None:
    a, inbox_a = join(domain)
    result = domain.join(Inbox())
    domain.dispatch(domain.leave(a))
    domain.dispatch(result.notices)  # a is gone: nothing to deliver, no error
    assert inbox_a.events == []


def test_ids_are_not_reused_until_the_cursor_wraps(domain: IvshmemDomain) -> None:
    keeper, _ = join(domain)  # id 0 stays live the whole time
    seen = []
    for _ in range(PEER_ID_SPACE - 1):
        peer_id, _ = join(domain)
        seen.append(peer_id)
        domain.leave(peer_id)
    assert seen == list(range(1, PEER_ID_SPACE))  # every id once before any comes back
    wrapped, _ = join(domain)
    assert wrapped == 1  # 0 is live, so the cursor skips it
    assert keeper == 0


def test_cursor_skips_live_ids(domain: IvshmemDomain) -> None:
    ids = [join(domain)[0] for _ in range(3)]
    domain.leave(ids[1])
    assert join(domain)[0] == 3  # not 1: a freed id waits for the cursor to come round


def test_hooks_see_join_and_leave_with_fds_still_open() -> None:
    hooks = RecordingHooks()
    domain = IvshmemDomain("hooked", memfd(SIZE), 3, hooks=hooks)
    try:
        peer_id, _ = join(domain)
        domain.leave(peer_id)
        assert hooks.calls == [("vector_fds", 0), ("joined", 0), ("left", 0)]
        assert hooks.open_at_leave == [True, True, True]
    finally:
        domain.close()


def test_refused_join_changes_nothing() -> None:
    hooks = RecordingHooks()
    domain = IvshmemDomain("hooked", memfd(SIZE), 1, hooks=hooks)
    try:
        a, _ = join(domain)
        hooks.refuse = True
        with pytest.raises(OSError):
            domain.join(Inbox())
        hooks.refuse = False
        assert list(domain.peer_ids()) == [a]
        assert domain.statistics().joins == 1
        assert join(domain)[0] == 1  # the refused join did not consume an id
    finally:
        domain.close()


def test_hook_giving_the_wrong_number_of_fds_is_refused() -> None:
    given: list[OwnedFd] = []

    class Short(EventfdHooks):
        def vector_fds(self, domain: IvshmemDomain, peer_id: int) -> list[OwnedFd]:
            fds = super().vector_fds(domain, peer_id)[:1]
            given.extend(fds)
            return fds

    domain = IvshmemDomain("short", memfd(SIZE), 2, hooks=Short())
    try:
        with pytest.raises(DomainConfigError):
            domain.join(Inbox())
        assert len(domain) == 0
        assert all(fd.closed for fd in given)
    finally:
        domain.close()


def test_close_releases_every_fd() -> None:
    shm = memfd(SIZE)
    domain = IvshmemDomain("closing", shm, 2)
    fds = [fd for _ in range(3) for fd in domain.join(Inbox()).vectors]
    domain.close()
    assert shm.closed and all(fd.closed for fd in fds)
    assert len(domain) == 0
    domain.close()  # idempotent
    with pytest.raises(DomainConfigError):
        domain.join(Inbox())


def test_statistics(domain: IvshmemDomain) -> None:
    a, _ = join(domain)
    join(domain)
    domain.leave(a)
    stats = domain.statistics()
    assert (stats.name, stats.size, stats.vectors) == ("test", SIZE, 2)
    assert (stats.peers, stats.joins, stats.leaves) == (1, 2, 1)


@pytest.mark.parametrize(
    ("name", "size", "vectors"),
    [
        ("", SIZE, 1),
        ("a/b", SIZE, 1),
        ("nul\0", SIZE, 1),
        ("x" * 256, SIZE, 1),
        ("ok", 3 << 20, 1),
        ("ok", 2 << 30, 1),
        ("ok", 1024, 1),
        ("ok", SIZE, 0),
        ("ok", SIZE, MAX_VECTORS + 1),
    ],
)
def test_bad_domain_parameters(name: str, size: int, vectors: int) -> None:
    domains = IvshmemDomains()
    with pytest.raises(DomainConfigError):
        domains.open(name, size, vectors)
    assert domains.names() == []


def test_domain_takes_the_size_of_its_region() -> None:
    shm = memfd(3 << 20)
    with pytest.raises(DomainConfigError, match="power of two"):
        IvshmemDomain("odd", shm, 1)
    assert not shm.closed  # not taken: still the caller's
    shm.close()


def test_registry_one_region_per_name() -> None:
    domains = IvshmemDomains()
    try:
        first = domains.open("shared", SIZE, 2)
        assert domains.open("shared", SIZE, 2) is first
        assert domains.get("shared") is first
        assert os.fstat(first.shm.fileno()).st_size == SIZE
        other = domains.open("other", 2 * SIZE, 1)
        assert other is not first and domains.names() == ["shared", "other"]
    finally:
        domains.close_all()
    assert first.shm.closed and other.shm.closed and domains.names() == []


@pytest.mark.parametrize(("size", "vectors"), [(2 * SIZE, 2), (SIZE, 1)])
def test_registry_name_collision_is_a_clear_error(size: int, vectors: int) -> None:
    domains = IvshmemDomains()
    try:
        first = domains.open("shared", SIZE, 2)
        with pytest.raises(DomainConflict, match="'shared' exists with size 1048576") as excinfo:
            domains.open("shared", size, vectors)
        assert excinfo.value.code == ErrorCode.CONFLICT
        assert domains.get("shared") is first and not first.shm.closed
    finally:
        domains.close_all()


def test_registry_close_unknown_name() -> None:
    with pytest.raises(UnknownDomain):
        IvshmemDomains().close("nope")
