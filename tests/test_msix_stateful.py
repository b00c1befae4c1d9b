"""Hypothesis drives random guest and device sequences on two devices sharing one route
table, against a deliberately naive reference model (one dict-like object per vector).

Checked after every step: the PBA bit is set iff the model says pending; pending implies
used and masked; masked vectors never deliver; every notification is accounted exactly
once (sent == delivered + coalesced + dropped + intx + cleared + pending); the route
changes the hub would see, replayed, give exactly the routes the table reports, and never
more than the budget.

The machine also plays the hub's outbox: deliveries wait there, unsent, until a ``send``
rule hands them to the VMM; when a write masks a vector, its unsent deliveries are taken
back (``undeliver``) and become pending. Checked: a masked vector has nothing unsent, and
``delivered`` is always what the VMM has received plus what is still unsent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from msixhub.server.msix import (
    ENTRY_SIZE,
    Delivery,
    MsixCapability,
    MsixStateError,
    Outcome,
    Transition,
)
from msixhub.server.routes import NoRouteError, RouteTable

ENABLE = 0x8000
FUNCTION_MASK = 0x4000
WORDS = st.sampled_from([0, 4, 8, 12])
DWORDS = st.one_of(st.sampled_from([0, 1, 2, 0xFEE0_0000, 0xFFFF_FFFF]), st.integers(0, 2**32 - 1))
QWORDS = st.one_of(st.sampled_from([0, 1, 1 << 32, 0xFEE0_1000]), st.integers(0, 2**64 - 1))
CONTROLS = st.one_of(
    st.sampled_from([0, ENABLE, FUNCTION_MASK, ENABLE | FUNCTION_MASK]), st.integers(0, 0xFFFF)
)
DEVICE = st.integers(0, 1)
VECTOR = st.integers(0, 8)  # taken modulo the device's size


@dataclass
class Vector:
    address: int = 0
    data: int = 0
    mask: bool = True
    used: int = 0
    pending: bool = False
    sent: int = 0
    delivered: int = 0
    coalesced: int = 0
    dropped: int = 0
    intx: int = 0
    cleared: int = 0
    unsent: int = 0  # delivered, waiting in the hub's outbox
    received: int = 0  # delivered and sent to the VMM


@dataclass
class Device:
    n: int
    has_intx: bool
    enabled: bool = False
    function_masked: bool = False
    vectors: list[Vector] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vectors = [Vector() for _ in range(self.n)]

    def masked(self, v: int) -> bool:
        return not self.enabled or self.function_masked or self.vectors[v].mask

    def withdraw(self, vec: Vector) -> None:
        if vec.pending:
            vec.pending = False
            vec.cleared += 1


class MsixMachine(RuleBasedStateMachine):
    @initialize(
        policy=st.sampled_from(["static", "lazy", "direct"]),
        budget=st.integers(0, 4),
        sizes=st.lists(st.integers(1, 9), min_size=2, max_size=2),
        has_intx=st.lists(st.booleans(), min_size=2, max_size=2),
        ready=st.booleans(),
    )
    def setup(
        self, policy: str, budget: int, sizes: list[int], has_intx: list[bool], ready: bool
    ) -> None:
        self.policy = policy
        self.routes = RouteTable(policy, budget)
        self.caps = [
            MsixCapability(n, self.routes, owner=f"dev{i}", has_intx=intx)
            for i, (n, intx) in enumerate(zip(sizes, has_intx, strict=True))
        ]
        self.devices = [Device(n, intx) for n, intx in zip(sizes, has_intx, strict=True)]
        self.holders: dict[int, tuple[str, int]] = {}
        self.lru: list[tuple[str, int]] = []  # lazy: routed (owner, vector), oldest first
        if ready:  # start where most guests are: drivers loaded, vectors programmed
            for d in range(2):
                self.bring_up(d)

    # -- helpers -----------------------------------------------------------------------

    def pick(self, d: int, v: int) -> tuple[MsixCapability, Device, int]:
        cap, dev = self.caps[d], self.devices[d]
        return cap, dev, v % dev.n

    def routes_in_use(self) -> int:
        return sum(1 for dev in self.devices for vec in dev.vectors if vec.used)

    def check_delivery(
        self, cap: MsixCapability, dev: Device, delivery: Delivery, protect: int = 0
    ) -> bool:
        """Check one delivery against the model; return whether it took a route.

        ``protect``: routed deliveries earlier in the same transition, whose routes a lazy
        acquisition must not evict."""
        v = delivery.vector
        vec = dev.vectors[v]
        assert not dev.masked(v), "a masked vector delivered"
        assert (delivery.address, delivery.data) == (vec.address, vec.data)
        direct = self.policy == "direct" or (
            self.policy == "lazy" and (self.routes.budget == 0 or not (vec.address or vec.data))
        )
        if self.policy == "lazy" and not direct:
            key = (cap.owner, v)
            if key in self.lru:
                self.lru.remove(key)
            elif len(self.lru) == self.routes.budget:
                if protect >= len(self.lru):
                    direct = True
                else:
                    self.lru.pop(0)
            if not direct:
                self.lru.append(key)
        if direct:
            assert delivery.route == -1
            return False
        assert delivery.route >= 0
        assert delivery.route == self.routes.route_of(cap.owner, v)
        return True

    def drop_lazy_routes(self, owner: str, vectors: range | list[int]) -> None:
        self.lru = [(o, v) for o, v in self.lru if o != owner or v not in vectors]

    def expect_transition(
        self, cap: MsixCapability, dev: Device, before: list[bool], got: Transition
    ) -> None:
        after = [dev.masked(v) for v in range(dev.n)]
        masked = tuple(v for v in range(dev.n) if after[v] and not before[v])
        unmasked = tuple(v for v in range(dev.n) if before[v] and not after[v])
        assert (got.masked, got.unmasked) == (masked, unmasked)
        expected = []
        for v in unmasked:
            vec = dev.vectors[v]
            if vec.pending:
                vec.pending = False
                vec.delivered += 1
                expected.append(v)
        assert [d.vector for d in got.deliveries] == expected
        for v in expected:
            dev.vectors[v].unsent += 1
        self.take_back(cap, dev, got.masked)
        routed = 0
        for delivery in got.deliveries:
            routed += self.check_delivery(cap, dev, delivery, protect=routed)
        # Every route named by this batch still belongs to the vector it was named for.
        for delivery in got.deliveries:
            if delivery.route >= 0:
                assert self.routes.route_of(cap.owner, delivery.vector) == delivery.route

    @staticmethod
    def take_back(cap: MsixCapability, dev: Device, masked: tuple[int, ...]) -> None:
        """What the hub does with the outbox when ``masked`` were just masked."""
        for v in masked:
            vec = dev.vectors[v]
            if not vec.unsent:
                continue
            cap.undeliver(v, vec.unsent)
            vec.delivered -= vec.unsent
            vec.coalesced += vec.unsent - (not vec.pending)
            if not vec.pending:
                if vec.used:
                    vec.pending = True
                else:
                    vec.cleared += 1
            vec.unsent = 0

    @rule(d=DEVICE, v=VECTOR)
    def send(self, d: int, v: int) -> None:
        """The hub's drain task pops ``v``'s slot: from now on it is the VMM's."""
        vec = self.devices[d].vectors[v % self.devices[d].n]
        vec.received += vec.unsent
        vec.unsent = 0

    # -- guest writes ------------------------------------------------------------------

    @rule(d=DEVICE, v=VECTOR, word=WORDS, value=DWORDS)
    def write_dword(self, d: int, v: int, word: int, value: int) -> None:
        cap, dev, v = self.pick(d, v)
        before = [dev.masked(i) for i in range(dev.n)]
        got = cap.table_write(v * ENTRY_SIZE + word, 4, value)
        self.model_write(dev.vectors[v], word, value)
        self.expect_transition(cap, dev, before, got)

    @rule(d=DEVICE, v=VECTOR, word=st.sampled_from([0, 8]), value=QWORDS)
    def write_qword(self, d: int, v: int, word: int, value: int) -> None:
        cap, dev, v = self.pick(d, v)
        before = [dev.masked(i) for i in range(dev.n)]
        got = cap.table_write(v * ENTRY_SIZE + word, 8, value)
        self.model_write(dev.vectors[v], word, value & 0xFFFF_FFFF)
        self.model_write(dev.vectors[v], word + 4, value >> 32)
        self.expect_transition(cap, dev, before, got)

    @rule(d=DEVICE, v=VECTOR, masked=st.booleans())
    def set_mask_bit(self, d: int, v: int, masked: bool) -> None:
        self.write_dword(d, v, 12, int(masked))

    @rule(d=DEVICE, v=VECTOR, address=st.sampled_from([0xFEE0_0000, 0xFEE0_1000]))
    def program_vector(self, d: int, v: int, address: int) -> None:
        """A guest driver's sequence: message first, then unmask (gets lazy routes going)."""
        n = self.devices[d].n
        self.write_qword(d, v, 0, address)
        self.write_dword(d, v, 8, 0x4000 + v % n)
        self.write_dword(d, v, 12, 0)

    @rule(d=DEVICE)
    def bring_up(self, d: int) -> None:
        for v in range(self.devices[d].n):
            self.program_vector(d, v, 0xFEE0_0000)
        self.use_all(d)
        self.write_control(d, ENABLE)

    @staticmethod
    def model_write(vec: Vector, word: int, value: int) -> None:
        if word == 0:
            vec.address = vec.address & ~0xFFFF_FFFF | value & 0xFFFF_FFFC
        elif word == 4:
            vec.address = vec.address & 0xFFFF_FFFF | value << 32
        elif word == 8:
            vec.data = value
        else:
            vec.mask = bool(value & 1)

    @rule(d=DEVICE, value=CONTROLS)
    def write_control(self, d: int, value: int) -> None:
        cap, dev = self.caps[d], self.devices[d]
        before = [dev.masked(i) for i in range(dev.n)]
        got = cap.write_control(value)
        dev.enabled, dev.function_masked = bool(value & ENABLE), bool(value & FUNCTION_MASK)
        self.expect_transition(cap, dev, before, got)

    @rule(d=DEVICE)
    def reset(self, d: int) -> None:
        cap, dev = self.caps[d], self.devices[d]
        for v in range(dev.n):  # the hub never resets a device with deliveries unsent
            self.send(d, v)
        before = [dev.masked(i) for i in range(dev.n)]
        got = cap.reset()
        dev.enabled = dev.function_masked = False
        for vec in dev.vectors:
            dev.withdraw(vec)
            vec.address = vec.data = 0
            vec.mask = True
        self.drop_lazy_routes(cap.owner, range(dev.n))
        self.expect_transition(cap, dev, before, got)

    # -- device events -----------------------------------------------------------------

    @rule(d=DEVICE, v=VECTOR, times=st.integers(1, 3), at_once=st.booleans())
    def notify(self, d: int, v: int, times: int, at_once: bool) -> None:
        """``times`` notifications, one by one or as one count (``notify_many``)."""
        cap, dev, v = self.pick(d, v)
        vec = dev.vectors[v]
        outcomes = [cap.notify_many(v, times)] if at_once else [cap.notify(v) for _ in range(times)]
        for i in range(times):
            got = outcomes[min(i, len(outcomes) - 1)]
            if at_once and i and got is Outcome.PENDING:
                got = Outcome.COALESCED  # the rest of the count follows the first
            vec.sent += 1
            if not dev.enabled and dev.has_intx:
                assert got is Outcome.INTX
                vec.intx += 1
            elif not vec.used:
                assert got is Outcome.DROPPED
                vec.dropped += 1
            elif dev.masked(v):
                assert got is (Outcome.COALESCED if vec.pending else Outcome.PENDING)
                vec.coalesced += vec.pending
                vec.pending = True
            else:
                assert isinstance(got, Delivery) and got.vector == v
                vec.delivered += 1
                vec.unsent += 1
                if not (at_once and i):  # a count takes its route once
                    self.check_delivery(cap, dev, got)

    @rule(d=DEVICE, vectors=st.lists(VECTOR, min_size=2, max_size=8))
    def notify_several(self, d: int, vectors: list[int]) -> None:
        """A device signalling several queues in a row (what churns lazy routes)."""
        for v in vectors:
            self.notify(d, v, 1, False)

    @rule(d=DEVICE, v=VECTOR)
    def deassert(self, d: int, v: int) -> None:
        cap, dev, v = self.pick(d, v)
        vec = dev.vectors[v]
        assert cap.deassert(v) is vec.pending
        dev.withdraw(vec)

    @rule(d=DEVICE, v=VECTOR)
    def use(self, d: int, v: int) -> None:
        cap, dev, v = self.pick(d, v)
        vec = dev.vectors[v]
        starved = (
            self.policy == "static" and not vec.used and self.routes_in_use() >= self.routes.budget
        )
        try:
            cap.use(v)
        except NoRouteError:
            assert starved
        else:
            assert not starved
            vec.used += 1

    @rule(d=DEVICE, v=VECTOR)
    def unuse(self, d: int, v: int) -> None:
        cap, dev, v = self.pick(d, v)
        vec = dev.vectors[v]
        try:
            cap.unuse(v)
        except MsixStateError:
            assert not vec.used
        else:
            vec.used -= 1
            if not vec.used:
                dev.withdraw(vec)
                self.drop_lazy_routes(cap.owner, [v])

    @rule(d=DEVICE)
    def use_all(self, d: int) -> None:
        cap, dev = self.caps[d], self.devices[d]
        needed = sum(1 for vec in dev.vectors if not vec.used)
        starved = self.policy == "static" and needed > self.routes.budget - self.routes_in_use()
        try:
            cap.use_all()
        except NoRouteError:
            assert starved
        else:
            assert not starved
            for vec in dev.vectors:
                vec.used += 1

    @rule(d=DEVICE)
    def unuse_all(self, d: int) -> None:
        cap, dev = self.caps[d], self.devices[d]
        cap.unuse_all()
        for vec in dev.vectors:
            vec.used = 0
            dev.withdraw(vec)
        self.drop_lazy_routes(cap.owner, range(dev.n))

    @rule(d=DEVICE)
    def restore_own_snapshot(self, d: int) -> None:
        cap = self.caps[d]
        assert not cap.restore(cap.snapshot())
        self.drop_lazy_routes(cap.owner, range(cap.num_vectors))

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def capability_matches_model(self) -> None:
        if not hasattr(self, "caps"):
            return
        for cap, dev in zip(self.caps, self.devices, strict=True):
            pba = cap.pba_read(0, 8)
            for v, vec in enumerate(dev.vectors):
                s = cap.vector_stats(v)
                assert bool(pba >> v & 1) == vec.pending == s.pending
                if vec.pending:
                    assert vec.used and dev.masked(v)
                assert cap.is_masked(v) == dev.masked(v) == s.masked
                assert (s.address, s.data, s.used) == (vec.address, vec.data, vec.used)
                assert cap.table_read(v * ENTRY_SIZE + 12, 4) == vec.mask
                counters = (s.delivered, s.coalesced, s.dropped, s.intx, s.cleared)
                assert counters == (
                    vec.delivered,
                    vec.coalesced,
                    vec.dropped,
                    vec.intx,
                    vec.cleared,
                )
                assert vec.sent == sum(counters) + vec.pending
                assert vec.delivered == vec.received + vec.unsent
                if dev.masked(v):
                    assert not vec.unsent, "a masked vector has an Irq waiting to be sent"

    @invariant()
    def routes_replay_exactly(self) -> None:
        if not hasattr(self, "caps"):
            return
        for change in self.routes.drain_changes():
            if change.acquired:
                assert change.route not in self.holders
                self.holders[change.route] = (change.owner, change.vector)
            else:
                assert self.holders.pop(change.route) == (change.owner, change.vector)
        reported = {
            route: (cap.owner, v)
            for cap in self.caps
            for v in range(cap.num_vectors)
            if (route := self.routes.route_of(cap.owner, v)) is not None
        }
        stats = self.routes.stats()
        assert reported == self.holders
        assert len(reported) == stats.in_use <= stats.high_water <= self.routes.budget
        for cap, dev in zip(self.caps, self.devices, strict=True):
            for v, vec in enumerate(dev.vectors):
                routed = self.routes.route_of(cap.owner, v) is not None
                if self.policy == "static":
                    assert routed == bool(vec.used)
                elif self.policy == "direct":
                    assert not routed
                elif routed:
                    assert vec.used
        if self.policy == "lazy":
            assert set(reported.values()) == set(self.lru)


MsixMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestMsixStateMachine = MsixMachine.TestCase


# -- notify_many(v, n) is n calls of notify(v) --------------------------------------------------

Step = tuple[str, int, int, bool]  # (what, device, vector or control value, mask bit)
SCRIPT_STEP = st.one_of(
    st.tuples(st.sampled_from(["program", "mask"]), DEVICE, VECTOR, st.booleans()),
    st.tuples(st.just("control"), DEVICE, CONTROLS, st.just(False)),
    st.tuples(st.sampled_from(["use", "unuse", "notify"]), DEVICE, VECTOR, st.just(False)),
)


def build_twin(
    policy: str, budget: int, has_intx: bool, script: list[Step]
) -> tuple[RouteTable, list[MsixCapability]]:
    """Two devices on one route table (the second one's routes are what a lazy eviction
    takes), brought up as a driver does, then driven by ``script``; refusals are part of
    the script's outcome."""
    routes = RouteTable(policy, budget)
    caps = [MsixCapability(4, routes, owner=f"dev{i}", has_intx=has_intx) for i in range(2)]
    bring_up = [
        (kind, d, v, False) for d in range(2) for v in range(4) for kind in ("program", "use")
    ]
    for kind, d, value, masked in [
        *bring_up,
        ("control", 0, ENABLE, False),
        ("control", 1, ENABLE, False),
        *script,
    ]:
        cap, v = caps[d], value % 4
        try:
            if kind == "program":
                cap.table_write(v * ENTRY_SIZE, 8, 0xFEE0_0000 | v << 12)
                cap.table_write(v * ENTRY_SIZE + 12, 4, int(masked))
            elif kind == "mask":
                cap.table_write(v * ENTRY_SIZE + 12, 4, int(masked))
            elif kind == "control":
                cap.write_control(value)
            elif kind == "use":
                cap.use(v)
            elif kind == "unuse":
                cap.unuse(v)
            else:
                cap.notify(v)
        except (NoRouteError, MsixStateError):
            pass
    return routes, caps


def whole_state(routes: RouteTable, caps: list[MsixCapability]) -> object:
    return (
        [cap.snapshot() for cap in caps],
        [[cap.vector_stats(v) for v in range(cap.num_vectors)] for cap in caps],
        [cap.stats() for cap in caps],
        routes.stats(),
        routes.drain_changes(),
    )


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(["static", "lazy", "direct"]),
    budget=st.integers(0, 5),
    has_intx=st.booleans(),
    script=st.lists(SCRIPT_STEP, max_size=25),
    v=st.integers(0, 3),
    count=st.integers(1, 6),
)
def test_notify_many_ends_exactly_as_that_many_single_notifies(
    policy: str, budget: int, has_intx: bool, script: list[Step], v: int, count: int
) -> None:
    """State, every per-vector counter, the PBA, the route table (LRU evictions, failures,
    direct deliveries, the changes the hub would drain) and the outcome: the first single
    call's, the later ones following from it."""
    singles_routes, singles = build_twin(policy, budget, has_intx, script)
    many_routes, many = build_twin(policy, budget, has_intx, script)
    assert whole_state(singles_routes, singles) == whole_state(many_routes, many)
    outcomes = [singles[0].notify(v) for _ in range(count)]
    first = many[0].notify_many(v, count)
    assert first == outcomes[0]
    follow = Outcome.COALESCED if first is Outcome.PENDING else first
    assert outcomes[1:] == [follow] * (count - 1)
    assert whole_state(singles_routes, singles) == whole_state(many_routes, many)
