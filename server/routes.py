"""The route table: one budget of interrupt routes shared by every device of a hub.

A *route* stands for what KVM calls a GSI behind an irqfd: the hub gives each route an
eventfd, so an unmasked routed vector costs one eventfd write and one read, with the hub
off the path. Routes are scarce (KVM_MAX_IRQ_ROUTES), and the 2011 qemu-devel thread
"msix: Drop tracking of used vectors" argued over when to take them. Both positions are
built here, as policies of one table, so they can be measured side by side:

``static``
    resource tracking: a route is reserved at a vector's first ``use`` and released at its
    last ``unuse``. A shortage fails *at setup* with :class:`NoRouteError`, where virtio can
    answer ``VIRTIO_MSI_NO_VECTOR`` and the guest retries with fewer vectors.
``lazy``
    a route is taken only when a configured vector is delivered unmasked; held routes form
    a cache with exact LRU eviction across all owners. Setup never fails; a delivery that
    gets no route (unconfigured entry, budget 0, or one unmask delivering more pending
    vectors than the budget) takes the direct path.
``direct``
    no routes at all: every delivery is an (address, data) message through the hub, like
    KVM_SIGNAL_MSI.

Layout: every array is preallocated to the budget and indexed by route id, so holding a
route costs no allocation and the table's memory does not grow with the devices using it.
Each owner (device) gets an ``array('i')`` of route ids per vector (-1: none) that this
table writes and the owner reads on its notify hot path. The table records every route
acquired, released or evicted as a :class:`RouteChange`, in order, for the hub to open or
close the eventfd of that route (``drain_changes``).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from msixhub.protocol.errors import ErrorCode, MessageError

DEFAULT_BUDGET = 4096
"""KVM_MAX_IRQ_ROUTES on x86 today (it was 1024 when the thread above was written)."""

MAX_BUDGET = 1 << 20
"""Arrays are preallocated per route: refuse budgets that would only waste memory."""

NO_ROUTE = -1
"""Route id of a vector that has none: its deliveries take the direct path."""


class RoutePolicy(StrEnum):
    STATIC = "static"
    LAZY = "lazy"
    DIRECT = "direct"


class NoRouteError(MessageError):
    """The route budget is exhausted under the static policy (answer VIRTIO_MSI_NO_VECTOR)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.NO_ROUTE, message)


class RouteOwnerError(MessageError):
    """An owner name is attached twice (CONFLICT), or used without being attached (NOT_FOUND)."""


class BudgetError(ValueError):
    """A route budget that is not an integer in [0, MAX_BUDGET]."""


@dataclass(frozen=True, slots=True)
class RouteChange:
    """One route acquired (``acquired=True``) or released/evicted (``acquired=False``)."""

    owner: str
    vector: int
    route: int
    acquired: bool


@dataclass(frozen=True, slots=True)
class RouteStats:
    policy: str
    budget: int
    in_use: int
    high_water: int
    alloc_failures: int
    evictions: int
    direct_deliveries: int


class RouteTable:
    """A budget of routes, their holders ``(owner, vector)``, and an exact LRU order."""

    __slots__ = (
        "_alloc_failures",
        "_changes",
        "_direct_deliveries",
        "_evictions",
        "_free",
        "_high_water",
        "_holder_owner",
        "_holder_vector",
        "_in_use",
        "_lru_head",
        "_lru_next",
        "_lru_prev",
        "_lru_tail",
        "_owners",
        "budget",
        "policy",
    )

    def __init__(self, policy: RoutePolicy | str = "static", budget: int = DEFAULT_BUDGET) -> None:
        self.policy = RoutePolicy(policy)
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise BudgetError(f"route budget must be an int, not {type(budget).__name__}")
        if not 0 <= budget <= MAX_BUDGET:
            raise BudgetError(f"route budget {budget} is outside [0, {MAX_BUDGET}]")
        self.budget = budget
        # Free route ids as a stack, lowest id on top so a fresh table hands out 0, 1, 2...
        self._free = array("i", range(budget - 1, -1, -1))
        self._holder_owner: list[str | None] = [None] * budget
        self._holder_vector = array("i", [-1]) * budget
        # Doubly linked list of held routes, least recently delivered at the head.
        self._lru_prev = array("i", [-1]) * budget
        self._lru_next = array("i", [-1]) * budget
        self._lru_head = -1
        self._lru_tail = -1
        self._owners: dict[str, array[int]] = {}
        self._changes: list[RouteChange] = []
        self._in_use = 0
        self._high_water = 0
        self._alloc_failures = 0
        self._evictions = 0
        self._direct_deliveries = 0

    # -- what the hub reads ------------------------------------------------------------

    @property
    def has_changes(self) -> bool:
        """Whether ``drain_changes`` has anything: lets the notify hot path skip the drain
        (a new list here, a new set in the hub) when, as almost always, nothing moved."""
        return bool(self._changes)

    def drain_changes(self) -> list[RouteChange]:
        """Every route acquired, released or evicted since the last drain, in order."""
        changes, self._changes = self._changes, []
        return changes

    def stats(self) -> RouteStats:
        return RouteStats(
            policy=str(self.policy),
            budget=self.budget,
            in_use=self._in_use,
            high_water=self._high_water,
            alloc_failures=self._alloc_failures,
            evictions=self._evictions,
            direct_deliveries=self._direct_deliveries,
        )

    def route_of(self, owner: str, vector: int) -> int | None:
        routes = self._routes_of(owner)
        if not 0 <= vector < len(routes):
            raise IndexError(f"{owner} has no vector {vector} (it has {len(routes)})")
        route = routes[vector]
        return None if route == NO_ROUTE else route

    # -- what a capability calls ---------------------------------------------------------

    def attach(self, owner: str, num_vectors: int) -> array[int]:
        """Register ``owner``; return its per-vector route ids, written here, read by it."""
        if owner in self._owners:
            raise RouteOwnerError(ErrorCode.CONFLICT, f"route owner {owner!r} is already attached")
        routes = array("i", [NO_ROUTE]) * num_vectors
        self._owners[owner] = routes
        return routes

    def detach(self, owner: str) -> None:
        """Release every route ``owner`` holds and forget it."""
        self.release_all(owner)
        del self._owners[owner]

    def reserve(self, owner: str, vectors: Sequence[int]) -> None:
        """Static policy: give each of ``vectors`` that has no route one, all or nothing."""
        self.exchange(owner, release=(), reserve=vectors)

    def exchange(self, owner: str, *, release: Sequence[int], reserve: Sequence[int]) -> None:
        """Static policy: return the routes of ``release``, then give each of ``reserve``
        that has none a route (the two are disjoint). All or nothing: on
        :class:`NoRouteError` no route has moved."""
        routes = self._routes_of(owner)
        freed = [routes[v] for v in release if routes[v] != NO_ROUTE]
        needed = [v for v in reserve if routes[v] == NO_ROUTE]
        if len(needed) > len(self._free) + len(freed):
            self._alloc_failures += 1
            raise NoRouteError(
                f"route budget exhausted: {owner} needs {len(needed)} more route(s), "
                f"{len(self._free) + len(freed)} of {self.budget} free"
            )
        for route in freed:
            self._release_route(route)
        for vector in needed:
            self._assign(self._free.pop(), owner, vector)

    def release(self, owner: str, vector: int) -> None:
        """Return the route of ``(owner, vector)``, if it holds one."""
        route = self._routes_of(owner)[vector]
        if route != NO_ROUTE:
            self._release_route(route)

    def release_all(self, owner: str) -> None:
        routes = self._routes_of(owner)
        for route in routes:
            if route != NO_ROUTE:
                self._release_route(route)

    def acquire(self, owner: str, vector: int, *, protect: int = 0, attempts: int = 1) -> int:
        """Lazy policy: a route for a vector being delivered, evicting the LRU if full.

        The ``protect`` most recently used routes are never evicted: they were named by
        deliveries earlier in the same batch (one unmask delivering several pending
        vectors), which the hub has not acted on yet. Returns NO_ROUTE, counting a
        failure, when nothing may be evicted (budget zero, or all protected).

        ``attempts``: that many deliveries in a row ask (a count read from an eventfd). A
        success serves them all: the later ones would find the route, already the newest. A
        failure counts once for each: with nothing protected it means a budget of zero,
        which each of those calls would have met in turn."""
        if not self._free:
            if self._in_use <= protect:
                self._alloc_failures += attempts
                return NO_ROUTE
            self._evictions += 1
            self._release_route(self._lru_head)  # pushed on the free stack, popped just below
        route = self._free.pop()
        self._assign(route, owner, vector)
        return route

    def touch(self, route: int) -> None:
        """Lazy policy: ``route`` was just delivered; make it the most recently used."""
        if route == self._lru_tail:
            return
        prev, nxt = self._lru_prev, self._lru_next
        before, after = prev[route], nxt[route]
        # route is held and not the tail, so it has a successor.
        prev[after] = before
        if before == -1:
            self._lru_head = after
        else:
            nxt[before] = after
        tail = self._lru_tail
        nxt[tail] = route
        prev[route] = tail
        nxt[route] = -1
        self._lru_tail = route

    def count_direct(self, deliveries: int = 1) -> None:
        self._direct_deliveries += deliveries

    # -- internals -----------------------------------------------------------------------

    def _routes_of(self, owner: str) -> array[int]:
        try:
            return self._owners[owner]
        except KeyError:
            raise RouteOwnerError(
                ErrorCode.NOT_FOUND, f"route owner {owner!r} is not attached"
            ) from None

    def _assign(self, route: int, owner: str, vector: int) -> None:
        self._holder_owner[route] = owner
        self._holder_vector[route] = vector
        self._owners[owner][vector] = route
        tail = self._lru_tail
        self._lru_prev[route] = tail
        self._lru_next[route] = -1
        if tail == -1:
            self._lru_head = route
        else:
            self._lru_next[tail] = route
        self._lru_tail = route
        self._in_use += 1
        if self._in_use > self._high_water:
            self._high_water = self._in_use
        self._changes.append(RouteChange(owner, vector, route, True))

    def _release_route(self, route: int) -> None:
        """Unlink a held route from its holder and the LRU list; push it on the free stack."""
        owner = self._holder_owner[route]
        vector = self._holder_vector[route]
        assert owner is not None, f"route {route} is not held"
        prev, nxt = self._lru_prev, self._lru_next
        before, after = prev[route], nxt[route]
        if before == -1:
            self._lru_head = after
        else:
            nxt[before] = after
        if after == -1:
            self._lru_tail = before
        else:
            prev[after] = before
        prev[route] = nxt[route] = -1
        self._holder_owner[route] = None
        self._holder_vector[route] = -1
        self._owners[owner][vector] = NO_ROUTE
        self._free.append(route)
        self._in_use -= 1
        self._changes.append(RouteChange(owner, vector, route, False))
