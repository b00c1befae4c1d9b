"""Every transition of the MSI-X capability as a named test (PCI spec 6.8.2, QEMU msix.c)."""

from __future__ import annotations

import pytest
from msixhub.protocol.errors import ErrorCode, MessageError
from msixhub.server.msix import (
    ENTRY_SIZE,
    MAX_VECTORS,
    NO_TRANSITION,
    Delivery,
    MsixAccessError,
    MsixCapability,
    MsixStateError,
    Outcome,
    Transition,
)
from msixhub.server.routes import RouteTable

ADDRESS = 0xFEE0_0000
ENABLE = 0x8000
FUNCTION_MASK = 0x4000


def make(
    n: int = 4, *, policy: str = "static", budget: int = 4096, has_intx: bool = False
) -> tuple[MsixCapability, RouteTable]:
    routes = RouteTable(policy, budget)
    return MsixCapability(n, routes, owner="dev", has_intx=has_intx), routes


def program(cap: MsixCapability, v: int, *, masked: bool = False) -> None:
    """What a guest driver does: write the message, then the vector control word."""
    cap.table_write(v * ENTRY_SIZE, 8, ADDRESS + (v << 12))
    cap.table_write(v * ENTRY_SIZE + 8, 4, 0x4000 + v)
    cap.table_write(v * ENTRY_SIZE + 12, 4, int(masked))


def ready(n: int = 4, **kwargs: object) -> tuple[MsixCapability, RouteTable]:
    """Enabled, every vector programmed, unmasked and used."""
    cap, routes = make(n, **kwargs)  # type: ignore[arg-type]
    for v in range(n):
        program(cap, v)
    cap.use_all()
    cap.write_control(ENABLE)
    routes.drain_changes()
    return cap, routes


def expected_delivery(cap: MsixCapability, v: int, route: int) -> Delivery:
    return Delivery(v, ADDRESS + (v << 12), 0x4000 + v, route)


def state(cap: MsixCapability, routes: RouteTable) -> object:
    return (
        cap.snapshot(),
        [cap.vector_stats(v) for v in range(cap.num_vectors)],
        cap.stats(),
        routes.stats(),
    )


# -- geometry and reset state -----------------------------------------------------------


@pytest.mark.parametrize(("n", "pba_bytes"), [(1, 8), (64, 8), (65, 16), (2048, 256)])
def test_geometry(n: int, pba_bytes: int) -> None:
    cap, _ = make(n)
    assert cap.table_size_bytes == 16 * n
    assert cap.pba_size_bytes == pba_bytes
    assert cap.control == n - 1


@pytest.mark.parametrize("n", [0, MAX_VECTORS + 1, -1, True, 2.0])
def test_bad_table_size_is_refused(n: object) -> None:
    with pytest.raises(MsixAccessError):
        MsixCapability(n, RouteTable(), owner="dev")  # type: ignore[arg-type]


def test_power_on_state_is_the_reset_state() -> None:
    cap, _ = make(3)
    assert cap.control == 2
    assert not cap.enabled and not cap.function_masked
    for v in range(3):
        assert cap.table_read(v * 16, 8) == 0
        assert cap.table_read(v * 16 + 8, 4) == 0
        assert cap.table_read(v * 16 + 12, 4) == 1  # masked
        assert cap.is_masked(v)
    assert cap.pba_read(0, 8) == 0


# -- table access -------------------------------------------------------------------------


def test_table_dword_and_qword_access() -> None:
    cap, _ = make(2)
    cap.table_write(16, 4, 0xFEE0_1000)
    cap.table_write(20, 4, 0x1234_5678)
    cap.table_write(24, 4, 0xDEAD_BEEF)
    assert cap.table_read(16, 8) == 0x1234_5678_FEE0_1000
    assert cap.table_read(24, 8) == 0x1_DEAD_BEEF  # data, then the still-set mask bit
    cap.table_write(24, 8, 0xCAFE)  # data and vector control in one QWORD: unmasks
    assert cap.table_read(24, 4) == 0xCAFE
    assert cap.table_read(28, 4) == 0
    stats = cap.vector_stats(1)
    assert (stats.address, stats.data) == (0x1234_5678_FEE0_1000, 0xCAFE)


def test_address_bits_1_0_and_reserved_vector_control_bits_read_zero() -> None:
    cap, _ = make(1)
    cap.table_write(0, 4, 0xFFFF_FFFF)
    assert cap.table_read(0, 4) == 0xFFFF_FFFC
    cap.table_write(12, 4, 0xFFFF_FFFE)
    assert cap.table_read(12, 4) == 0  # reserved bits dropped, mask bit written as 0
    cap.table_write(12, 4, 0xFFFF_FFFF)
    assert cap.table_read(12, 4) == 1


BAD_TABLE_ACCESSES = [
    pytest.param(0, 1, id="size-1"),
    pytest.param(0, 2, id="size-2"),
    pytest.param(0, 3, id="size-3"),
    pytest.param(0, 16, id="size-16"),
    pytest.param(2, 4, id="misaligned-dword"),
    pytest.param(4, 8, id="misaligned-qword"),
    pytest.param(12, 8, id="qword-across-entries"),
    pytest.param(32, 4, id="past-the-end"),
    pytest.param(28, 8, id="qword-past-the-end"),
    pytest.param(-4, 4, id="negative"),
    pytest.param(4.0, 4, id="float-offset"),
    pytest.param(4, True, id="bool-size"),
]


@pytest.mark.parametrize(("offset", "size"), BAD_TABLE_ACCESSES)
def test_bad_table_access_raises_and_changes_nothing(offset: object, size: object) -> None:
    cap, routes = ready(2)
    before = state(cap, routes)
    with pytest.raises(MsixAccessError) as info:
        cap.table_read(offset, size)  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.BAD_RANGE
    with pytest.raises(MsixAccessError):
        cap.table_write(offset, size, 0)  # type: ignore[arg-type]
    assert state(cap, routes) == before


@pytest.mark.parametrize(
    ("size", "value"), [(4, 1 << 32), (4, -1), (8, 1 << 64), (4, True), (4, 1.0), (4, None)]
)
def test_table_write_of_a_value_that_does_not_fit_is_refused(size: int, value: object) -> None:
    cap, routes = ready(2)
    before = state(cap, routes)
    with pytest.raises(MsixAccessError):
        cap.table_write(8, size, value)  # type: ignore[arg-type]
    assert state(cap, routes) == before


def test_access_error_is_a_message_error_the_hub_can_answer() -> None:
    cap, _ = make(1)
    with pytest.raises(MessageError) as info:
        cap.table_read(3, 4)
    assert info.value.code == "bad-range"
    assert "misaligned" in info.value.message


# -- PBA ----------------------------------------------------------------------------------


def test_pba_reads_one_bit_per_vector() -> None:
    cap, _ = ready(70)
    for v in (0, 9, 63, 64, 69):
        cap.table_write(v * 16 + 12, 4, 1)
        assert cap.notify(v) is Outcome.PENDING
    assert cap.pba_read(0, 8) == (1 << 0) | (1 << 9) | (1 << 63)
    assert cap.pba_read(8, 8) == (1 << 0) | (1 << 5)
    assert cap.pba_read(0, 4) == 1 | 1 << 9
    assert cap.pba_read(4, 4) == 1 << 31
    assert cap.pba_read(12, 4) == 0


def test_pba_write_is_ignored_and_counted() -> None:
    cap, _ = ready(2)
    cap.table_write(12, 4, 1)
    cap.notify(0)
    cap.pba_write(0, 8, 0)
    cap.pba_write(0, 4, 0xFFFF_FFFF)
    assert cap.pba_read(0, 8) == 1
    assert cap.stats().ignored_pba_writes == 2


@pytest.mark.parametrize(("offset", "size"), [(0, 2), (4, 8), (8, 4), (-8, 8), (1, 4)])
def test_bad_pba_access_raises_and_changes_nothing(offset: int, size: int) -> None:
    cap, routes = ready(2)
    before = state(cap, routes)
    with pytest.raises(MsixAccessError):
        cap.pba_read(offset, size)
    with pytest.raises(MsixAccessError):
        cap.pba_write(offset, size, 0)
    assert state(cap, routes) == before
    assert cap.stats().ignored_pba_writes == 0


# -- message control ------------------------------------------------------------------------


def test_message_control_table_size_and_reserved_bits_are_read_only() -> None:
    cap, _ = make(8)
    cap.write_control(0xFFFF)
    assert cap.control == 0xC007
    cap.write_control(0x07FF)
    assert cap.control == 0x0007


@pytest.mark.parametrize("value", [-1, 0x1_0000, True, "0x8000", None])
def test_bad_message_control_value_is_refused(value: object) -> None:
    cap, routes = ready(2)
    before = state(cap, routes)
    with pytest.raises(MsixAccessError):
        cap.write_control(value)  # type: ignore[arg-type]
    assert state(cap, routes) == before


# -- notify -------------------------------------------------------------------------------


def test_notify_unmasked_used_vector_delivers_its_message_on_its_route() -> None:
    cap, routes = ready(4)
    assert cap.notify(2) == expected_delivery(cap, 2, routes.route_of("dev", 2))  # type: ignore[arg-type]
    assert cap.vector_stats(2).delivered == 1


def test_notify_unused_vector_is_dropped_and_counted() -> None:
    cap, _ = ready(4)
    cap.unuse(1)
    assert cap.notify(1) is Outcome.DROPPED
    assert cap.vector_stats(1).dropped == 1


def test_notify_masked_vector_sets_pending_then_coalesces() -> None:
    cap, _ = ready(4)
    cap.table_write(3 * 16 + 12, 4, 1)
    assert cap.notify(3) is Outcome.PENDING
    assert cap.notify(3) is Outcome.COALESCED
    stats = cap.vector_stats(3)
    assert (stats.pending, stats.coalesced, stats.delivered) == (True, 1, 0)


def test_notify_with_msix_disabled_and_intx_asserts_intx_not_pending() -> None:
    cap, _ = ready(2, has_intx=True)
    cap.write_control(0)
    assert cap.notify(0) is Outcome.INTX
    assert cap.pba_read(0, 8) == 0
    assert cap.vector_stats(0).intx == 1


def test_notify_with_msix_disabled_and_no_intx_sets_pending() -> None:
    cap, _ = ready(2)
    cap.write_control(0)
    assert cap.notify(0) is Outcome.PENDING


@pytest.mark.parametrize("v", [-1, 4, 1 << 40])
def test_notify_out_of_range_vector_is_refused(v: int) -> None:
    cap, routes = ready(4)
    before = state(cap, routes)
    with pytest.raises(MsixAccessError):
        cap.notify(v)
    assert state(cap, routes) == before


# -- many notifications at once (a count read from an eventfd) -------------------------------


def test_notify_many_on_an_unmasked_vector_is_one_delivery_counted_n_times() -> None:
    cap, routes = ready(4)
    assert cap.notify_many(2, 5) == expected_delivery(cap, 2, routes.route_of("dev", 2))  # type: ignore[arg-type]
    assert cap.vector_stats(2).delivered == 5


def test_notify_many_on_a_masked_vector_sets_pending_and_coalesces_the_rest() -> None:
    cap, _ = ready(4)
    cap.table_write(3 * 16 + 12, 4, 1)
    assert cap.notify_many(3, 4) is Outcome.PENDING
    assert cap.notify_many(3, 2) is Outcome.COALESCED
    stats = cap.vector_stats(3)
    assert (stats.pending, stats.coalesced, stats.delivered) == (True, 5, 0)


def test_notify_many_drops_or_asserts_intx_n_times() -> None:
    cap, _ = ready(2, has_intx=True)
    cap.unuse(1)
    assert cap.notify_many(1, 3) is Outcome.DROPPED
    cap.write_control(0)
    assert cap.notify_many(0, 7) is Outcome.INTX
    assert (cap.vector_stats(1).dropped, cap.vector_stats(0).intx) == (3, 7)


def test_notify_many_on_the_direct_path_counts_every_direct_delivery() -> None:
    cap, routes = ready(2, policy="lazy", budget=0)
    assert cap.notify_many(0, 6) == expected_delivery(cap, 0, -1)
    assert (routes.stats().direct_deliveries, routes.stats().alloc_failures) == (6, 6)


@pytest.mark.parametrize("count", [0, -1, 1.0, True, None])
def test_notify_many_with_a_bad_count_is_refused(count: object) -> None:
    cap, routes = ready(4)
    before = state(cap, routes)
    with pytest.raises(MsixAccessError, match="count"):
        cap.notify_many(0, count)  # type: ignore[arg-type]
    with pytest.raises(MsixAccessError):
        cap.notify_many(4, 1)
    assert state(cap, routes) == before


# -- taking back deliveries not sent yet -----------------------------------------------------


def test_unsent_deliveries_of_a_masked_vector_become_one_pending_notification() -> None:
    cap, routes = ready(4)
    cap.notify_many(1, 3)  # the hub's outbox holds them, unsent
    cap.table_write(1 * 16 + 12, 4, 1)
    cap.undeliver(1, 3)
    s = cap.vector_stats(1)
    assert (s.delivered, s.coalesced, s.pending) == (0, 2, True)
    transition = cap.table_write(1 * 16 + 12, 4, 0)
    assert transition.deliveries == (expected_delivery(cap, 1, routes.route_of("dev", 1)),)  # type: ignore[arg-type]
    s = cap.vector_stats(1)
    assert (s.delivered, s.coalesced, s.pending) == (1, 2, False)
    assert s.delivered + s.coalesced + s.dropped + s.intx + s.cleared + s.pending == 3


def test_undeliver_into_a_bit_already_pending_coalesces_everything() -> None:
    cap, _ = ready(4)
    cap.notify_many(0, 2)
    cap.write_control(ENABLE | FUNCTION_MASK)
    cap.notify(0)  # a count the hub read after the mask: pending
    cap.undeliver(0, 2)
    s = cap.vector_stats(0)
    assert (s.delivered, s.coalesced, s.pending) == (0, 2, True)


@pytest.mark.parametrize("control", [0, ENABLE | FUNCTION_MASK])
def test_undeliver_after_a_function_mask_or_a_disable(control: int) -> None:
    """Disabling MSI-X keeps the bit for a later enable, even with INTx (not converted)."""
    cap, _ = ready(2, has_intx=True)
    cap.notify(1)
    cap.write_control(control)
    cap.undeliver(1, 1)
    assert (cap.pba_read(0, 8), cap.vector_stats(1).delivered) == (0b10, 0)
    assert cap.write_control(ENABLE).deliveries[0].vector == 1


def test_undeliver_for_a_vector_no_longer_used_withdraws_the_pending_bit_at_once() -> None:
    cap, _ = ready(4)
    cap.notify_many(2, 4)
    cap.unuse(2)
    cap.table_write(2 * 16 + 12, 4, 1)
    cap.undeliver(2, 4)
    s = cap.vector_stats(2)
    assert (s.delivered, s.coalesced, s.cleared, s.pending) == (0, 3, 1, False)


@pytest.mark.parametrize("count", [0, 3, -1, 1.0, True])
def test_undeliver_more_than_delivered_or_a_bad_count_is_refused(count: object) -> None:
    cap, routes = ready(4)
    cap.notify_many(0, 2)
    cap.table_write(12, 4, 1)
    before = state(cap, routes)
    with pytest.raises(MsixStateError):
        cap.undeliver(0, count)  # type: ignore[arg-type]
    with pytest.raises(MsixAccessError):
        cap.undeliver(4, 1)
    assert state(cap, routes) == before


def test_undeliver_of_a_deliverable_vector_is_refused() -> None:
    """Taken back only to be delivered again, it would be counted twice."""
    cap, routes = ready(4)
    cap.notify(0)
    before = state(cap, routes)
    with pytest.raises(MsixStateError, match="not masked"):
        cap.undeliver(0, 1)
    assert state(cap, routes) == before


# -- mask and unmask ------------------------------------------------------------------------


def test_mask_gives_an_exact_transition() -> None:
    cap, _ = ready(4)
    assert cap.table_write(2 * 16 + 12, 4, 1) == Transition((2,), (), ())
    assert cap.is_masked(2)


def test_unmask_without_pending_delivers_nothing() -> None:
    cap, _ = ready(4)
    cap.table_write(2 * 16 + 12, 4, 1)
    assert cap.table_write(2 * 16 + 12, 4, 0) == Transition((), (2,), ())


def test_unmask_with_pending_delivers_once_and_clears_the_bit() -> None:
    cap, routes = ready(4)
    cap.table_write(2 * 16 + 12, 4, 1)
    cap.notify(2)
    cap.notify(2)
    route = routes.route_of("dev", 2)
    transition = cap.table_write(2 * 16 + 12, 4, 0)
    assert transition == Transition((), (2,), (expected_delivery(cap, 2, route),))  # type: ignore[arg-type]
    assert cap.pba_read(0, 8) == 0
    stats = cap.vector_stats(2)
    assert (stats.delivered, stats.coalesced, stats.pending) == (1, 1, False)


def test_rewriting_an_unchanged_mask_bit_is_no_transition() -> None:
    cap, _ = ready(4)
    assert cap.table_write(12, 4, 0) is NO_TRANSITION
    cap.table_write(12, 4, 1)
    assert cap.table_write(12, 4, 1) is NO_TRANSITION
    assert cap.table_write(12, 4, 0xFFFF_FFFF) is NO_TRANSITION  # reserved bits do not count


def test_message_writes_are_no_transition() -> None:
    cap, _ = ready(4)
    assert cap.table_write(16, 8, ADDRESS) is NO_TRANSITION
    assert cap.table_write(24, 4, 7) is NO_TRANSITION
    assert not NO_TRANSITION


def test_qword_write_of_data_and_control_unmasks_with_the_new_data() -> None:
    cap, routes = ready(2)
    cap.table_write(16 + 12, 4, 1)
    cap.notify(1)
    transition = cap.table_write(16 + 8, 8, 0x99)
    assert transition.unmasked == (1,)
    assert transition.deliveries == (
        Delivery(1, ADDRESS + (1 << 12), 0x99, routes.route_of("dev", 1)),
    )  # type: ignore[arg-type]


def test_vector_mask_bit_under_function_mask_is_no_transition() -> None:
    cap, _ = ready(4)
    cap.write_control(ENABLE | FUNCTION_MASK)
    assert cap.table_write(12, 4, 1) is NO_TRANSITION
    assert cap.table_write(12, 4, 0) is NO_TRANSITION


# -- function mask and enable ------------------------------------------------------------------


def test_function_mask_masks_every_vector_whose_own_bit_is_clear() -> None:
    cap, _ = ready(4)
    cap.table_write(1 * 16 + 12, 4, 1)
    assert cap.write_control(ENABLE | FUNCTION_MASK) == Transition((0, 2, 3), (), ())
    assert all(cap.is_masked(v) for v in range(4))
    assert cap.write_control(ENABLE | FUNCTION_MASK) is NO_TRANSITION


def test_function_unmask_delivers_pending_in_vector_order() -> None:
    cap, routes = ready(4)
    cap.table_write(1 * 16 + 12, 4, 1)  # vector 1 stays masked by its own bit
    cap.write_control(ENABLE | FUNCTION_MASK)
    for v in (3, 1, 0):
        assert cap.notify(v) is Outcome.PENDING
    transition = cap.write_control(ENABLE)
    assert transition.unmasked == (0, 2, 3)
    assert [d.vector for d in transition.deliveries] == [0, 3]
    assert transition.deliveries[1] == expected_delivery(cap, 3, routes.route_of("dev", 3))  # type: ignore[arg-type]
    assert cap.pba_read(0, 8) == 1 << 1


def test_enable_delivers_pending_and_disable_masks_everything() -> None:
    cap, _ = make(3)
    for v in range(3):
        program(cap, v)
    cap.use_all()
    assert cap.notify(1) is Outcome.PENDING  # disabled: effectively masked
    transition = cap.write_control(ENABLE)
    assert transition.unmasked == (0, 1, 2)
    assert [d.vector for d in transition.deliveries] == [1]
    assert cap.write_control(0) == Transition((0, 1, 2), (), ())


def test_enable_under_function_mask_is_no_transition() -> None:
    cap, _ = ready(2)
    cap.write_control(FUNCTION_MASK)
    assert cap.write_control(ENABLE | FUNCTION_MASK) is NO_TRANSITION
    assert cap.write_control(ENABLE) == Transition((), (0, 1), ())


def test_disable_with_intx_keeps_earlier_pending_bits_for_enable() -> None:
    cap, _ = ready(2, has_intx=True)
    cap.table_write(12, 4, 1)
    cap.notify(0)
    cap.write_control(0)
    assert cap.notify(0) is Outcome.INTX
    cap.table_write(12, 4, 0)
    assert [d.vector for d in cap.write_control(ENABLE).deliveries] == [0]


# -- deassert, use and unuse ------------------------------------------------------------------


def test_deassert_clears_pending_and_counts_it() -> None:
    cap, _ = ready(2)
    cap.table_write(12, 4, 1)
    cap.notify(0)
    assert cap.deassert(0) is True
    assert cap.deassert(0) is False
    assert cap.pba_read(0, 8) == 0
    assert cap.vector_stats(0).cleared == 1
    assert cap.table_write(12, 4, 0).deliveries == ()


def test_unuse_to_zero_clears_pending_but_not_before() -> None:
    cap, _ = ready(2)
    cap.use(0)  # refcount 2
    cap.table_write(12, 4, 1)
    cap.notify(0)
    cap.unuse(0)
    assert cap.vector_stats(0).pending
    cap.unuse(0)
    stats = cap.vector_stats(0)
    assert (stats.pending, stats.used, stats.cleared) == (False, 0, 1)


def test_unbalanced_unuse_is_refused() -> None:
    cap, routes = make(2)
    before = state(cap, routes)
    with pytest.raises(MsixStateError) as info:
        cap.unuse(0)
    assert info.value.code == ErrorCode.BAD_STATE
    assert state(cap, routes) == before


@pytest.mark.parametrize("v", [-1, 2, True, "0"])
def test_use_of_a_vector_out_of_range_is_refused(v: object) -> None:
    cap, routes = make(2)
    before = state(cap, routes)
    for call in (cap.use, cap.unuse, cap.deassert, cap.is_masked, cap.vector_stats):
        with pytest.raises(MsixAccessError):
            call(v)  # type: ignore[operator]
    assert state(cap, routes) == before


def test_use_all_and_unuse_all() -> None:
    cap, _ = make(3)
    cap.use(1)
    cap.use_all()
    assert [cap.vector_stats(v).used for v in range(3)] == [1, 2, 1]
    cap.write_control(ENABLE)
    cap.notify(2)  # masked by its own bit: pending
    cap.unuse_all()
    assert [cap.vector_stats(v).used for v in range(3)] == [0, 0, 0]
    assert cap.pba_read(0, 8) == 0
    assert cap.vector_stats(2).cleared == 1


# -- reset -------------------------------------------------------------------------------------


def test_reset_masks_zeroes_and_clears_but_keeps_refcounts() -> None:
    cap, _ = ready(3)
    cap.table_write(16 + 12, 4, 1)
    cap.notify(1)
    transition = cap.reset()
    assert transition == Transition((0, 2), (), ())  # vector 1 was already masked
    assert cap.control == 2
    for v in range(3):
        assert cap.table_read(v * 16, 8) == 0
        assert cap.table_read(v * 16 + 8, 8) == 1 << 32
    assert cap.pba_read(0, 8) == 0
    assert cap.vector_stats(1).cleared == 1
    assert [cap.vector_stats(v).used for v in range(3)] == [1, 1, 1]
    assert cap.reset() is NO_TRANSITION


def test_reset_restores_the_intx_fallback() -> None:
    cap, _ = ready(1, has_intx=True)
    cap.reset()
    assert cap.notify(0) is Outcome.INTX


# -- accounting and statistics ------------------------------------------------------------------


def test_every_notification_is_accounted_exactly_once() -> None:
    cap, _ = ready(2, has_intx=True)
    sent = 0
    for _ in range(3):
        cap.notify(0)
        sent += 1
    cap.table_write(12, 4, 1)
    for _ in range(4):
        cap.notify(0)
        sent += 1
    cap.deassert(0)
    cap.notify(0)
    sent += 1
    cap.table_write(12, 4, 0)
    cap.write_control(0)
    cap.notify(0)
    sent += 1
    cap.unuse(0)
    cap.write_control(ENABLE)
    cap.notify(0)
    sent += 1
    s = cap.vector_stats(0)
    assert (s.delivered, s.coalesced, s.cleared, s.intx, s.dropped) == (4, 3, 1, 1, 1)
    assert s.delivered + s.coalesced + s.dropped + s.intx + s.cleared + s.pending == sent


def test_capability_stats() -> None:
    cap, _ = ready(4)
    cap.unuse(3)
    cap.write_control(ENABLE | FUNCTION_MASK)
    cap.notify(0)
    cap.notify(1)
    stats = cap.stats()
    assert (stats.vectors_in_use, stats.vectors_pending, stats.function_masked) == (3, 2, True)


# -- release ------------------------------------------------------------------------------------


def test_release_returns_every_route_and_refuses_further_use() -> None:
    cap, routes = ready(4)
    cap.release()
    assert routes.stats().in_use == 0
    assert len(routes.drain_changes()) == 4
    with pytest.raises(MsixStateError):
        cap.use(0)
    assert cap.notify(0) is Outcome.DROPPED
    cap.release()  # idempotent
    MsixCapability(4, routes, owner="dev")  # the owner name is free again
