"""The route table and its three policies, alone and under pressure."""

from __future__ import annotations

import pytest
from msixhub.protocol.errors import ErrorCode, MessageError
from msixhub.server.msix import (
    ENTRY_SIZE,
    MAX_VECTORS,
    VIRTIO_MSI_NO_VECTOR,
    Delivery,
    MsixCapability,
)
from msixhub.server.routes import (
    MAX_BUDGET,
    BudgetError,
    NoRouteError,
    RouteChange,
    RouteOwnerError,
    RoutePolicy,
    RouteTable,
)

ENABLE = 0x8000


def program(cap: MsixCapability, v: int, data: int | None = None) -> None:
    cap.table_write(v * ENTRY_SIZE, 8, 0xFEE0_0000)
    cap.table_write(v * ENTRY_SIZE + 8, 4, 0x40 + v if data is None else data)
    cap.table_write(v * ENTRY_SIZE + 12, 4, 0)


def device(routes: RouteTable, owner: str, n: int, *, programmed: bool = True) -> MsixCapability:
    cap = MsixCapability(n, routes, owner=owner)
    if programmed:
        for v in range(n):
            program(cap, v)
    cap.write_control(ENABLE)
    return cap


def virtio_set_vector(cap: MsixCapability, v: int) -> int:
    """What virtio-pci does on a write of a queue's MSI-X vector register."""
    try:
        cap.use(v)
    except NoRouteError:
        return VIRTIO_MSI_NO_VECTOR
    return v


def assert_consistent(routes: RouteTable, *caps: MsixCapability) -> None:
    """Every held route has one holder and the counts agree."""
    held = [
        routes.route_of(cap.owner, v)
        for cap in caps
        for v in range(cap.num_vectors)
        if routes.route_of(cap.owner, v) is not None
    ]
    assert len(held) == len(set(held)) == routes.stats().in_use <= routes.budget
    assert all(0 <= r < routes.budget for r in held)  # type: ignore[operator]


# -- construction ---------------------------------------------------------------------------


def test_policy_and_budget() -> None:
    routes = RouteTable()
    assert (routes.policy, routes.budget) == (RoutePolicy.STATIC, 4096)
    assert RouteTable("lazy", 3).policy is RoutePolicy.LAZY
    with pytest.raises(ValueError, match="not a valid RoutePolicy"):
        RouteTable("eager")


@pytest.mark.parametrize("budget", [-1, MAX_BUDGET + 1, 3.0, True, "4096"])
def test_bad_budget_is_refused(budget: object) -> None:
    with pytest.raises(BudgetError):
        RouteTable("static", budget)  # type: ignore[arg-type]


def test_an_owner_is_attached_once() -> None:
    routes = RouteTable()
    MsixCapability(1, routes, owner="blk0")
    with pytest.raises(RouteOwnerError) as info:
        MsixCapability(1, routes, owner="blk0")
    assert info.value.code == ErrorCode.CONFLICT
    with pytest.raises(RouteOwnerError) as info:
        routes.route_of("nobody", 0)
    assert info.value.code == ErrorCode.NOT_FOUND
    with pytest.raises(IndexError):
        routes.route_of("blk0", 1)


# -- static ------------------------------------------------------------------------------------


def test_static_reserves_at_first_use_and_releases_at_last_unuse() -> None:
    routes = RouteTable("static", 8)
    cap = device(routes, "blk0", 4)
    cap.use(2)
    cap.use(2)
    assert routes.drain_changes() == [RouteChange("blk0", 2, 0, True)]
    cap.unuse(2)
    assert routes.drain_changes() == []
    cap.unuse(2)
    assert routes.drain_changes() == [RouteChange("blk0", 2, 0, False)]
    assert routes.route_of("blk0", 2) is None


def test_static_delivery_uses_the_reserved_route() -> None:
    routes = RouteTable("static", 8)
    cap = device(routes, "blk0", 4)
    cap.use(3)
    assert cap.notify(3) == Delivery(3, 0xFEE0_0000, 0x43, 0)
    assert routes.stats().direct_deliveries == 0


def test_static_exhaustion_fails_use_up_front_and_leaves_refcount_alone() -> None:
    routes = RouteTable("static", 3)
    cap = device(routes, "net0", 5)
    assert [virtio_set_vector(cap, v) for v in range(5)] == [0, 1, 2, 0xFFFF, 0xFFFF]
    assert cap.vector_stats(3).used == 0
    stats = routes.stats()
    assert (stats.in_use, stats.high_water, stats.alloc_failures) == (3, 3, 2)
    with pytest.raises(MessageError) as info:
        cap.use(4)
    assert info.value.code == ErrorCode.NO_ROUTE
    cap.unuse(0)
    assert virtio_set_vector(cap, 4) == 4  # the freed route is reused
    assert_consistent(routes, cap)


def test_static_use_all_is_all_or_nothing() -> None:
    routes = RouteTable("static", 3)
    cap = device(routes, "net0", 4)
    cap.use(0)
    with pytest.raises(NoRouteError):
        cap.use_all()
    assert [cap.vector_stats(v).used for v in range(4)] == [1, 0, 0, 0]
    assert routes.stats().in_use == 1


# -- lazy -------------------------------------------------------------------------------------


def test_lazy_takes_no_route_at_use_and_one_at_first_unmasked_delivery() -> None:
    routes = RouteTable("lazy", 8)
    cap = device(routes, "blk0", 2)
    cap.use_all()
    assert routes.drain_changes() == []
    assert cap.notify(1) == Delivery(1, 0xFEE0_0000, 0x41, 0)
    assert routes.drain_changes() == [RouteChange("blk0", 1, 0, True)]
    assert cap.notify(1).route == 0  # type: ignore[union-attr]
    assert routes.drain_changes() == []


def test_lazy_masked_notify_takes_no_route() -> None:
    routes = RouteTable("lazy", 8)
    cap = device(routes, "blk0", 2)
    cap.use_all()
    cap.table_write(12, 4, 1)
    cap.notify(0)
    assert routes.stats().in_use == 0
    (delivery,) = cap.table_write(12, 4, 0).deliveries
    assert delivery.route == 0  # the unmask delivery follows the same path rules


def test_lazy_unconfigured_vector_goes_direct() -> None:
    routes = RouteTable("lazy", 8)
    cap = device(routes, "blk0", 2, programmed=False)
    cap.table_write(12, 4, 0)
    cap.use_all()
    assert cap.notify(0) == Delivery(0, 0, 0, -1)
    assert routes.stats().direct_deliveries == 1
    assert routes.stats().in_use == 0


def test_lazy_evicts_the_least_recently_delivered_route_of_any_owner() -> None:
    routes = RouteTable("lazy", 2)
    a = device(routes, "a", 2)
    b = device(routes, "b", 1)
    a.use_all()
    b.use_all()
    a.notify(0)  # route 0
    a.notify(1)  # route 1
    a.notify(0)  # refresh: a/1 is now the least recently used
    routes.drain_changes()
    assert b.notify(0).route == 1  # type: ignore[union-attr]
    assert routes.drain_changes() == [RouteChange("a", 1, 1, False), RouteChange("b", 0, 1, True)]
    assert routes.route_of("a", 1) is None
    assert a.notify(1).route == 0  # type: ignore[union-attr]  # a/0 is now the LRU
    assert routes.stats().evictions == 2
    assert_consistent(routes, a, b)


def test_lazy_with_no_budget_is_always_direct() -> None:
    routes = RouteTable("lazy", 0)
    cap = device(routes, "a", 1)
    cap.use(0)
    assert cap.notify(0).route == -1  # type: ignore[union-attr]
    stats = routes.stats()
    assert (stats.direct_deliveries, stats.alloc_failures, stats.in_use) == (1, 1, 0)


@pytest.mark.parametrize("budget", [1, 2])
def test_lazy_unmask_batch_never_evicts_a_route_it_just_named(budget: int) -> None:
    """Enable delivers three pending vectors at once: with fewer routes than that, later
    ones go direct rather than steal the route an earlier Delivery in the batch names."""
    routes = RouteTable("lazy", budget)
    cap = MsixCapability(3, routes, owner="a")
    for v in range(3):
        program(cap, v)
    cap.use_all()
    for v in range(3):
        cap.notify(v)  # disabled: pending
    deliveries = cap.write_control(ENABLE).deliveries
    assert [d.route for d in deliveries] == [*range(budget), *[-1] * (3 - budget)]
    for d in deliveries[:budget]:
        assert routes.route_of("a", d.vector) == d.route
    stats = routes.stats()
    assert (stats.evictions, stats.direct_deliveries, stats.alloc_failures) == (
        0,
        3 - budget,
        3 - budget,
    )


def test_lazy_routes_go_at_last_unuse_and_at_reset() -> None:
    routes = RouteTable("lazy", 4)
    cap = device(routes, "a", 2)
    cap.use_all()
    cap.notify(0)
    cap.notify(1)
    cap.unuse(0)
    assert routes.route_of("a", 0) is None
    cap.reset()
    assert routes.stats().in_use == 0


# -- direct ------------------------------------------------------------------------------------


def test_direct_never_takes_a_route() -> None:
    routes = RouteTable("direct", 0)
    cap = device(routes, "a", 4)
    cap.use_all()
    assert [cap.notify(v).route for v in range(4)] == [-1] * 4  # type: ignore[union-attr]
    stats = routes.stats()
    assert (stats.in_use, stats.high_water, stats.direct_deliveries) == (0, 0, 4)
    assert routes.drain_changes() == []


# -- under pressure: 2048-vector devices ---------------------------------------------------------


def test_static_two_full_devices_fill_a_4096_budget_and_the_third_gets_no_vector() -> None:
    """cloud-hypervisor's failure: 2048-vector devices against KVM's 4096 routes. Under
    static it fails at setup, where the guest can be told and fall back."""
    routes = RouteTable("static", 4096)
    devs = [device(routes, f"nvme{i}", MAX_VECTORS, programmed=False) for i in range(3)]
    devs[0].use_all()
    devs[1].use_all()
    with pytest.raises(NoRouteError):
        devs[2].use_all()
    assert virtio_set_vector(devs[2], 0) == VIRTIO_MSI_NO_VECTOR
    assert routes.stats().in_use == 4096
    devs[1].release()
    devs[2].use_all()
    assert_consistent(routes, devs[0], devs[2])


def test_lazy_many_full_devices_set_up_fine_and_share_4096_routes() -> None:
    routes = RouteTable("lazy", 4096)
    devs = [device(routes, f"nvme{i}", MAX_VECTORS) for i in range(3)]
    for dev in devs:
        dev.use_all()
    for dev in devs:
        for v in range(MAX_VECTORS):
            assert dev.notify(v).route >= 0  # type: ignore[union-attr]
    stats = routes.stats()
    assert (stats.in_use, stats.high_water, stats.evictions) == (4096, 4096, 2048)
    assert routes.route_of("nvme0", 0) is None  # the oldest went first
    assert_consistent(routes, *devs)


def test_static_1024_budget_half_a_device() -> None:
    routes = RouteTable("static", 1024)
    dev = device(routes, "nvme0", MAX_VECTORS, programmed=False)
    with pytest.raises(NoRouteError):
        dev.use_all()
    assigned = [virtio_set_vector(dev, v) for v in range(MAX_VECTORS)]
    assert assigned[:1024] == list(range(1024))
    assert set(assigned[1024:]) == {VIRTIO_MSI_NO_VECTOR}
    assert routes.stats().alloc_failures == 1 + 1024


def test_lazy_1024_budget_round_robin_thrashes_but_never_fails() -> None:
    routes = RouteTable("lazy", 1024)
    dev = device(routes, "nvme0", MAX_VECTORS)
    dev.use_all()
    for _ in range(2):
        for v in range(MAX_VECTORS):
            assert isinstance(dev.notify(v), Delivery)
    stats = routes.stats()
    assert (stats.in_use, stats.evictions, stats.alloc_failures) == (1024, 3 * 1024, 0)
    assert sum(c.acquired for c in routes.drain_changes()) == 4096


def test_direct_2048_vector_devices_need_no_budget() -> None:
    routes = RouteTable("direct", 0)
    devs = [device(routes, f"nvme{i}", MAX_VECTORS) for i in range(3)]
    for dev in devs:
        dev.use_all()
        assert dev.notify(MAX_VECTORS - 1).route == -1  # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["static", "lazy", "direct"])
def test_budget_3_with_two_devices(policy: str) -> None:
    routes = RouteTable(policy, 3)
    a = device(routes, "a", 2)
    b = device(routes, "b", 2)
    granted = [virtio_set_vector(cap, v) for cap in (a, b) for v in range(2)]
    if policy == "static":
        assert granted == [0, 1, 0, 0xFFFF]
    else:
        assert granted == [0, 1, 0, 1]
    delivered = [cap.notify(v) for cap in (a, b) for v in range(2)]
    routed = [d.route for d in delivered if isinstance(d, Delivery)]
    assert routes.stats().in_use <= 3
    if policy == "direct":
        assert routed == [-1] * 4
    elif policy == "lazy":
        assert routed == [0, 1, 2, 0]
        assert routes.stats().evictions == 1
    else:
        assert routed == [0, 1, 2]
    assert_consistent(routes, a, b)
