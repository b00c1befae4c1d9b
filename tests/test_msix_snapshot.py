"""Snapshot and restore: round trip, route recomputation, and every rejected blob."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest
from msixhub.server.msix import (
    ENTRY_SIZE,
    NO_TRANSITION,
    MsixCapability,
    Outcome,
    SnapshotError,
    Transition,
)
from msixhub.server.routes import NoRouteError, RouteChange, RouteTable

ENABLE = 0x8000
FUNCTION_MASK = 0x4000


def populated(routes: RouteTable, owner: str = "dev", n: int = 4) -> MsixCapability:
    """Enabled; vector 1 masked and pending; vector 3 unused; messages all distinct."""
    cap = MsixCapability(n, routes, owner=owner)
    for v in range(n):
        cap.table_write(v * ENTRY_SIZE, 8, 0x1_FEE0_0000 + (v << 12))
        cap.table_write(v * ENTRY_SIZE + 8, 8, 0x100 + v)  # data, unmasked
        if v != n - 1:
            cap.use(v)
    cap.write_control(ENABLE)
    cap.table_write(ENTRY_SIZE + 12, 4, 1)
    assert cap.notify(1) is Outcome.PENDING
    return cap


def guest_view(cap: MsixCapability) -> tuple[object, ...]:
    return (
        cap.control,
        tuple(cap.table_read(o, 4) for o in range(0, cap.table_size_bytes, 4)),
        tuple(cap.pba_read(o, 8) for o in range(0, cap.pba_size_bytes, 8)),
        tuple(cap.vector_stats(v).used for v in range(cap.num_vectors)),
    )


def test_round_trip_into_a_fresh_device() -> None:
    source = populated(RouteTable("static", 16))
    routes = RouteTable("static", 16)
    target = MsixCapability(4, routes, owner="dev")
    transition = target.restore(source.snapshot())
    assert guest_view(target) == guest_view(source)
    assert transition == Transition((), (0, 2, 3), ())  # power-on: everything was masked
    assert [routes.route_of("dev", v) for v in range(4)] == [0, 1, 2, None]
    assert target.table_write(ENTRY_SIZE + 12, 4, 0).deliveries[0].vector == 1


def test_restoring_its_own_snapshot_changes_nothing() -> None:
    routes = RouteTable("static", 16)
    cap = populated(routes)
    routes.drain_changes()
    before = guest_view(cap), [cap.vector_stats(v) for v in range(4)]
    assert cap.restore(cap.snapshot()) is NO_TRANSITION
    assert (guest_view(cap), [cap.vector_stats(v) for v in range(4)]) == before
    assert routes.drain_changes() == []


def test_restore_recomputes_static_routes() -> None:
    routes = RouteTable("static", 16)
    cap = MsixCapability(4, routes, owner="dev")
    cap.use(3)
    routes.drain_changes()
    cap.restore(populated(RouteTable("static", 16)).snapshot())  # uses 0, 1, 2
    assert routes.drain_changes() == [
        RouteChange("dev", 3, 0, False),
        RouteChange("dev", 0, 0, True),
        RouteChange("dev", 1, 1, True),
        RouteChange("dev", 2, 2, True),
    ]


def test_restore_drops_lazy_routes() -> None:
    routes = RouteTable("lazy", 16)
    cap = populated(routes)
    cap.notify(0)
    assert routes.route_of("dev", 0) is not None
    cap.restore(cap.snapshot())
    assert routes.stats().in_use == 0


def test_restore_that_needs_more_static_routes_than_free_changes_nothing() -> None:
    routes = RouteTable("static", 3)
    cap = MsixCapability(4, routes, owner="dev")
    MsixCapability(4, routes, owner="other").use(0)  # one of the three routes is taken
    before = guest_view(cap)
    with pytest.raises(NoRouteError):
        cap.restore(populated(RouteTable("static", 16)).snapshot())
    assert guest_view(cap) == before
    assert routes.stats().in_use == 1


def test_restore_counts_a_discarded_pending_bit_as_cleared() -> None:
    routes = RouteTable("static", 16)
    cap = populated(routes)
    blank = MsixCapability(4, RouteTable(), owner="blank").snapshot()
    cap.restore(blank)
    assert cap.vector_stats(1).cleared == 1
    assert cap.pba_read(0, 8) == 0
    assert routes.stats().in_use == 0


def _doc(cap: MsixCapability) -> dict[str, object]:
    doc: dict[str, object] = msgpack.unpackb(cap.snapshot())
    return doc


def _edit(**changes: object) -> Callable[[MsixCapability], bytes]:
    def make(cap: MsixCapability) -> bytes:
        doc = _doc(cap)
        doc.update(changes)
        blob: bytes = msgpack.packb(doc)
        return blob

    return make


def _table_with(offset: int, value: int) -> Callable[[MsixCapability], bytes]:
    def make(cap: MsixCapability) -> bytes:
        doc = _doc(cap)
        table = bytearray(doc["table"])  # type: ignore[arg-type]
        table[offset : offset + 4] = value.to_bytes(4, "little")
        doc["table"] = bytes(table)
        blob: bytes = msgpack.packb(doc)
        return blob

    return make


BAD_BLOBS: list[tuple[str, Callable[[MsixCapability], bytes], str]] = [
    ("truncated", lambda cap: cap.snapshot()[:-5], "well-formed msgpack"),
    ("empty", lambda cap: b"", "well-formed msgpack"),
    ("trailing-bytes", lambda cap: cap.snapshot() + b"\x00", "well-formed msgpack"),
    ("garbage", lambda cap: b"\xc1\xc1\xc1", "well-formed msgpack"),
    ("not-a-map", lambda cap: msgpack.packb([1, 2, 3]), "not an MSI-X snapshot"),
    ("not-bytes", lambda cap: "snapshot", "must be bytes"),  # type: ignore[misc]
    ("bad-version", _edit(version=2), "version 2"),
    ("missing-version", _edit(version=None), "version None"),
    ("table-size-mismatch", _edit(num_vectors=8), "does not match"),
    ("extra-field", _edit(extra=1), "fields"),
    ("short-table", _edit(table=b"\x00" * 16), "'table' is 16 bytes"),
    ("short-pba", _edit(pba=b""), "'pba' is 0 bytes"),
    ("control-size-bits", _edit(control=0x8007), "message control"),
    ("control-type", _edit(control="0x8003"), "'control' must be int"),
    ("refcount-type", _edit(used=[1, 1, 1, -1]), "refcounts"),
    ("refcount-count", _edit(used=[1, 1, 1]), "refcounts"),
    ("address-bits-1-0", _table_with(0, 0xFEE0_0001), "reserved bits"),
    ("vector-control-reserved", _table_with(12, 0x2), "reserved bits"),
    ("pba-beyond-n", _edit(pba=(1 << 4).to_bytes(8, "little")), "beyond vector 3"),
    ("pending-unused", _edit(pba=(1 << 3).to_bytes(8, "little")), "not in use"),
    ("pending-unmasked", _edit(pba=(1 << 0).to_bytes(8, "little")), "not masked"),
]


@pytest.mark.parametrize(
    ("make_blob", "message"), [pytest.param(b, m, id=name) for name, b, m in BAD_BLOBS]
)
def test_bad_snapshot_is_refused_and_changes_nothing(
    make_blob: Callable[[MsixCapability], bytes], message: str
) -> None:
    routes = RouteTable("static", 16)
    source = populated(RouteTable("static", 16))
    blob = make_blob(source)
    target = populated(routes, n=4)
    target.write_control(ENABLE | FUNCTION_MASK)
    before = guest_view(target), [target.vector_stats(v) for v in range(4)], routes.stats()
    with pytest.raises(SnapshotError, match=message) as info:
        target.restore(blob)
    assert info.value.code == "bad-field"
    after = guest_view(target), [target.vector_stats(v) for v in range(4)], routes.stats()
    assert after == before
