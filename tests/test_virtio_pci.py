"""The virtio-pci modern transport: register layout, status machine, vectors through the
hub's use/unuse (with the driver's 0xffff fallback), INTx/ISR, resets and hostile guests."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Coroutine, Iterator

import pytest
import trio
import trio.testing
from msixhub.client.virtio_driver import BlkDriver, RngDriver, VectorPlan
from msixhub.devices.guestmem import GuestMemory
from msixhub.devices.virtio.blk import BlkDevice
from msixhub.devices.virtio.constants import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    Status,
    bit,
)
from msixhub.devices.virtio.inflight import DeviceStateRegion
from msixhub.devices.virtio.pci import (
    COMMON_CFG,
    BarAccessError,
    BarLayout,
    CapType,
    CommonCfg,
    PciIdentity,
    TransportBusy,
    VirtioPciTransport,
)
from msixhub.devices.virtio.rng import RngDevice
from msixhub.protocol.fds import memfd
from virtio_harness import MEMORY_SIZE, Runner, Sink, VectorBook, virtio_system

NO = VIRTIO_MSI_NO_VECTOR
L = BarLayout()
RING = bit(F_VERSION_1) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX)


class ThreeQueueRng(RngDevice):
    num_queues = 3


@pytest.fixture
def image() -> Iterator[int]:
    with tempfile.TemporaryFile() as file:
        os.ftruncate(file.fileno(), 1 << 20)
        yield file.fileno()


class Bare:
    """A transport with no driver toolkit: registers poked by hand."""

    def __init__(self, memory: GuestMemory, vectors: VectorBook | None = None) -> None:
        self.vectors = vectors or VectorBook()
        self.sink = Sink()
        self.runner = Runner()
        self.transport = VirtioPciTransport(
            RngDevice(), memory, vectors=self.vectors, interrupts=self.sink, runner=self.runner
        )
        self.runner.transport = self.transport

    def read(self, offset: int, size: int) -> int:
        return self.transport.read(L.common + offset, size)

    async def write(self, offset: int, size: int, value: int) -> None:
        await self.transport.write(L.common + offset, size, value)

    async def status(self, value: int) -> int:
        await self.write(CommonCfg.DEVICE_STATUS, 1, value)
        return self.read(CommonCfg.DEVICE_STATUS, 1)

    async def features(self, value: int) -> None:
        for select in (0, 1):
            await self.write(CommonCfg.DRIVER_FEATURE_SELECT, 4, select)
            await self.write(CommonCfg.DRIVER_FEATURE, 4, (value >> (32 * select)) & 0xFFFFFFFF)


@pytest.fixture
def bare() -> Iterator[Bare]:
    with memfd(1 << 20, "pci-test") as fd, GuestMemory.from_memfd(fd, 1 << 20) as memory:
        yield Bare(memory)


# -- layout -------------------------------------------------------------------------------


def test_capabilities_are_virtio_pci_cap_structures() -> None:
    caps = L.capabilities()
    assert L.size == 0x4000
    expected = [
        (CapType.COMMON, 0x0000),
        (CapType.NOTIFY, 0x3000),
        (CapType.ISR, 0x1000),
        (CapType.DEVICE, 0x2000),
    ]
    for cap, (cfg_type, offset) in zip(caps, expected, strict=True):
        vndr, _next, cap_len, kind, bar = cap[:5]
        assert (vndr, cap_len, kind, bar) == (0x09, len(cap), cfg_type, 4)
        assert struct.unpack_from("<II", cap, 8) == (offset, 0x1000)
    assert len(caps[1]) == 20 and struct.unpack_from("<I", caps[1], 16) == (4,)
    assert BarLayout.from_capabilities(caps) == L
    with pytest.raises(ValueError, match="missing"):
        BarLayout.from_capabilities(caps[:3])


def test_pci_identity() -> None:
    blk_like = PciIdentity.of(RngDevice())
    assert (blk_like.vendor_id, blk_like.device_id, blk_like.revision) == (0x1AF4, 0x1044, 1)


@pytest.mark.parametrize(
    ("offset", "size"), [(0, 3), (0x4000, 1), (0x0FFE, 4), (-1, 1), (0x3FFC, 8)]
)
def test_bad_bar_accesses(bare: Bare, offset: int, size: int) -> None:
    with pytest.raises(BarAccessError):
        bare.transport.read(offset, size)


# -- common configuration ---------------------------------------------------------------------


async def test_common_cfg_offsets_and_reset_values(bare: Bare) -> None:
    await bare.write(CommonCfg.DEVICE_FEATURE_SELECT, 4, 0)
    assert bare.read(CommonCfg.DEVICE_FEATURE, 4) == RING & 0xFFFFFFFF
    await bare.write(CommonCfg.DEVICE_FEATURE_SELECT, 4, 1)
    assert bare.read(CommonCfg.DEVICE_FEATURE, 4) == 1  # VERSION_1 is bit 32
    await bare.write(CommonCfg.DEVICE_FEATURE_SELECT, 4, 2)
    assert bare.read(CommonCfg.DEVICE_FEATURE, 4) == 0
    assert bare.read(CommonCfg.DEVICE_FEATURE_SELECT, 4) == 2
    # msix_config, num_queues, device_status, config_generation in one 8-byte read
    assert bare.read(CommonCfg.CONFIG_MSIX_VECTOR, 8) == NO | 1 << 16
    assert bare.read(CommonCfg.QUEUE_SIZE, 2) == 64
    assert bare.read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == NO
    assert bare.read(CommonCfg.QUEUE_NOTIFY_OFF, 2) == 0
    await bare.write(CommonCfg.QUEUE_SELECT, 2, 1)  # no such queue
    assert bare.read(CommonCfg.QUEUE_SIZE, 2) == 0
    await bare.write(CommonCfg.QUEUE_SIZE, 2, 8)
    await bare.write(CommonCfg.QUEUE_SELECT, 2, 0)
    assert bare.read(CommonCfg.QUEUE_SIZE, 2) == 64


async def test_queue_registers(bare: Bare) -> None:
    for value in (0, 3, 48, 128, 0xFFFF):  # no power of two up to the max: ignored
        await bare.write(CommonCfg.QUEUE_SIZE, 2, value)
        assert bare.read(CommonCfg.QUEUE_SIZE, 2) == 64
    await bare.write(CommonCfg.QUEUE_SIZE, 2, 16)
    assert bare.read(CommonCfg.QUEUE_SIZE, 2) == 16
    await bare.write(CommonCfg.QUEUE_DESC, 4, 0x1000)  # two halves, like Linux
    await bare.write(CommonCfg.QUEUE_DESC + 4, 4, 0x2)
    await bare.write(CommonCfg.QUEUE_DRIVER, 8, 0x3_0000_2000)  # or one 64-bit access
    await bare.write(CommonCfg.QUEUE_DEVICE + 2, 2, 0x7)  # not a field access: ignored
    assert bare.read(CommonCfg.QUEUE_DESC, 8) == 0x2_0000_1000
    assert bare.read(CommonCfg.QUEUE_DRIVER + 4, 4) == 0x3
    assert bare.read(CommonCfg.QUEUE_DEVICE, 8) == 0
    await bare.write(CommonCfg.QUEUE_ENABLE, 2, 1)
    await bare.write(CommonCfg.QUEUE_SIZE, 2, 32)  # frozen once enabled
    await bare.write(CommonCfg.QUEUE_DESC, 8, 0)
    await bare.write(CommonCfg.QUEUE_ENABLE, 2, 0)  # 0 is not allowed: ignored
    assert bare.read(CommonCfg.QUEUE_SIZE, 2) == 16
    assert bare.read(CommonCfg.QUEUE_DESC, 8) == 0x2_0000_1000
    assert bare.read(CommonCfg.QUEUE_ENABLE, 2) == 1


async def test_feature_negotiation(bare: Bare) -> None:
    base = Status.ACKNOWLEDGE | Status.DRIVER
    await bare.features(bit(F_EVENT_IDX))  # no VERSION_1
    assert await bare.status(base | Status.FEATURES_OK) == base
    await bare.features(RING | bit(40))  # a bit the device did not offer
    assert await bare.status(base | Status.FEATURES_OK) == base
    await bare.features(bit(F_VERSION_1))
    assert await bare.status(base | Status.FEATURES_OK) == base | Status.FEATURES_OK
    await bare.features(RING)  # too late: ignored after FEATURES_OK
    assert bare.transport.features == bit(F_VERSION_1)
    await bare.write(CommonCfg.DRIVER_FEATURE_SELECT, 4, 1)
    assert bare.read(CommonCfg.DRIVER_FEATURE, 4) == 1


async def test_status_bits_are_only_added_and_needs_reset_is_the_devices(bare: Bare) -> None:
    await bare.features(RING)
    status = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
    assert await bare.status(status) == status
    assert await bare.status(Status.ACKNOWLEDGE) == status  # clearing bits does nothing
    assert await bare.status(status | Status.DEVICE_NEEDS_RESET) == status
    assert await bare.status(0) == 0


async def test_driver_ok_without_features_ok_needs_reset(bare: Bare) -> None:
    bare.transport.set_msix_enabled(True)
    await bare.write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 3)
    status = await bare.status(Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
    assert status == Status.ACKNOWLEDGE | Status.DRIVER | Status.DEVICE_NEEDS_RESET
    assert bare.sink.notified == [3]  # the configuration-change interrupt


async def test_vector_registers_use_and_unuse_through_the_hub() -> None:
    with memfd(1 << 20, "pci-test") as fd, GuestMemory.from_memfd(fd, 1 << 20) as memory:
        bare = Bare(memory, VectorBook(table_size=4, budget=1))
        book = bare.vectors
        await bare.write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
        await bare.write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 0)  # shared: refcount 2
        assert book.uses == {0: 2} == bare.transport.vector_uses()
        await bare.write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 0)  # same value: no hub call
        assert len(book.calls) == 2
        await bare.write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)  # a second route: over budget
        assert book.calls[-2:] == [("unuse", 0), ("use", 1)]
        assert bare.read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == NO
        await bare.write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 7)  # past the table
        assert bare.read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == NO
        assert book.uses == {} and bare.transport.vector_uses() == {}
        await bare.write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)  # the driver retries with less
        assert bare.read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == 1
        assert book.uses == {1: 1} == bare.transport.vector_uses()


class SlowBook(VectorBook):
    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.release = trio.Event()

    async def use(self, vector: int) -> None:
        self.entered.set()
        await self.release.wait()
        await super().use(vector)


async def test_accesses_while_a_write_waits_on_the_hub_are_refused() -> None:
    with memfd(1 << 20, "pci-test") as fd, GuestMemory.from_memfd(fd, 1 << 20) as memory:
        book = SlowBook()
        bare = Bare(memory, book)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bare.write, CommonCfg.CONFIG_MSIX_VECTOR, 2, 1)
                await book.entered.wait()
                with pytest.raises(TransportBusy):
                    bare.read(CommonCfg.CONFIG_MSIX_VECTOR, 2)
                with pytest.raises(TransportBusy):
                    await bare.write(CommonCfg.QUEUE_SELECT, 2, 0)
                book.release.set()
        assert bare.read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == 1


class Killed(BaseException):
    """The daemon dies at this point (nothing after it runs but ``finally`` blocks)."""


class KilledAfter(VectorBook):
    """A hub that applies the ``nth`` call (1-based) and then the daemon dies: the call's
    reply never arrives (``before``: the daemon dies before the hub sees the call)."""

    def __init__(self, nth: int, *, before: bool = False) -> None:
        super().__init__()
        self.nth, self.before = nth, before

    async def _maybe_die(self, call: Coroutine[None, None, None]) -> None:
        dies = len(self.calls) + 1 == self.nth
        if dies:
            self.nth = 0  # once
        if dies and self.before:
            call.close()
            raise Killed
        await call
        if dies:
            raise Killed

    async def use(self, vector: int) -> None:
        await self._maybe_die(super().use(vector))

    async def unuse(self, vector: int) -> None:
        await self._maybe_die(super().unuse(vector))


def _restarted(memory: GuestMemory, region: bytearray, book: VectorBook) -> VirtioPciTransport:
    """A new transport over the saved registers, as a restarted daemon builds it."""
    state = DeviceStateRegion(region, RngDevice.num_queues, RngDevice().max_queue_size)
    return VirtioPciTransport(
        RngDevice(), memory, vectors=book, interrupts=Sink(), runner=Runner(), state=state
    )


@pytest.mark.parametrize(
    ("nth", "before", "leaked"),
    [
        (3, True, {1: 1}),  # the hub never saw the unuse of the old vector
        (3, False, {}),  # the unuse was applied, its reply lost: nothing leaked
        (4, False, {0: 1}),  # the use of the new vector was applied, its reply lost
    ],
)
async def test_a_kill_inside_a_vector_write_is_reconciled_with_the_hub(
    nth: int, before: bool, leaked: dict[int, int]
) -> None:
    region = bytearray(DeviceStateRegion.size_for(1, RngDevice().max_queue_size))
    book = KilledAfter(nth, before=before)
    with memfd(1 << 20, "pci-test") as fd, GuestMemory.from_memfd(fd, 1 << 20) as memory:
        first = _restarted(memory, region, book)
        await first.write(L.common + CommonCfg.DEVICE_STATUS, 1, Status.ACKNOWLEDGE)
        await first.write(L.common + CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
        await first.write(L.common + CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)
        with pytest.raises(Killed):  # queue 0: vector 1 -> 0 (unuse 1, use 0)
            await first.write(L.common + CommonCfg.QUEUE_MSIX_VECTOR, 2, 0)
        second = _restarted(memory, region, book)
        assert second.vector_uses() == {0: 1}  # the queue's register was saved as NO_VECTOR
        assert book.uses - second.vector_uses() == leaked
        await second.reconcile_vectors(dict(book.uses))
        assert book.uses == second.vector_uses() == {0: 1}
        await second.write(L.common + CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)
        assert book.uses == second.vector_uses() == {0: 1, 1: 1}


async def test_a_kill_inside_a_reset_is_reconciled_with_the_hub() -> None:
    region = bytearray(DeviceStateRegion.size_for(1, RngDevice().max_queue_size))
    book = KilledAfter(3)  # use 0, use 1, then the reset's first unuse
    with memfd(1 << 20, "pci-test") as fd, GuestMemory.from_memfd(fd, 1 << 20) as memory:
        first = _restarted(memory, region, book)
        await first.write(L.common + CommonCfg.DEVICE_STATUS, 1, Status.ACKNOWLEDGE)
        await first.write(L.common + CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
        await first.write(L.common + CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)
        with pytest.raises(Killed):
            await first.write(L.common + CommonCfg.DEVICE_STATUS, 1, 0)
        second = _restarted(memory, region, book)
        assert second.vector_uses() == {} and sum(book.uses.values()) == 1
        await second.reconcile_vectors(dict(book.uses))
        assert book.uses == {}


async def test_registers_written_while_status_is_0_survive_a_restart() -> None:
    """After its reset a driver may write registers before ACKNOWLEDGE (Linux's del_vqs
    writes queue_select and the vectors after virtio_reset_device): a restarted daemon reads
    them back as written, and holds exactly the hub references they name."""
    region = bytearray(DeviceStateRegion.size_for(1, RngDevice().max_queue_size))
    book = VectorBook()
    with memfd(1 << 20, "pci-test") as fd, GuestMemory.from_memfd(fd, 1 << 20) as memory:
        first = _restarted(memory, region, book)
        await first.write(L.common + CommonCfg.DEVICE_STATUS, 1, Status.ACKNOWLEDGE)
        await first.write(L.common + CommonCfg.DEVICE_STATUS, 1, 0)
        for field, size, value in [
            (CommonCfg.CONFIG_MSIX_VECTOR, 2, 0),
            (CommonCfg.QUEUE_MSIX_VECTOR, 2, 1),
            (CommonCfg.QUEUE_SIZE, 2, 16),
            (CommonCfg.DEVICE_FEATURE_SELECT, 4, 1),
            (CommonCfg.DRIVER_FEATURE_SELECT, 4, 1),
            (CommonCfg.QUEUE_SELECT, 2, 5),
        ]:
            await first.write(L.common + field, size, value)
        assert first.status == 0
        image = [first.read(L.common + at, 4) for at in range(0, COMMON_CFG.size, 4)]

        second = _restarted(memory, region, book)
        assert [second.read(L.common + at, 4) for at in range(0, COMMON_CFG.size, 4)] == image
        assert second.vector_uses() == book.uses == {0: 1, 1: 1}
        calls = len(book.calls)
        await second.reconcile_vectors(dict(book.uses))
        assert len(book.calls) == calls  # nothing to give back or take again
        await second.write(L.common + CommonCfg.QUEUE_SELECT, 2, 0)
        assert second.read(L.common + CommonCfg.QUEUE_SIZE, 2) == 16


async def test_reconcile_uses_what_the_hub_lacks_and_clears_what_it_refuses() -> None:
    with memfd(1 << 20, "pci-test") as fd, GuestMemory.from_memfd(fd, 1 << 20) as memory:
        bare = Bare(memory, VectorBook(table_size=8, budget=2))
        await bare.write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
        await bare.write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 1)
        book = bare.vectors
        book.uses.clear()  # the hub lost both references...
        book.uses[5] = 1  # ...and holds one the registers do not
        await bare.transport.reconcile_vectors({0: 0, 5: 1})
        assert book.calls[-3:] == [("unuse", 5), ("use", 0), ("use", 1)]
        assert book.uses == bare.transport.vector_uses() == {0: 1, 1: 1}
        book.uses.clear()
        book.budget = 1  # now the second one is refused: its register reads NO_VECTOR
        await bare.transport.reconcile_vectors({})
        assert book.uses == bare.transport.vector_uses() == {0: 1}
        assert bare.read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == NO
        assert bare.read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == 0


async def test_isr_and_intx_level(bare: Bare) -> None:
    bare.transport.config_changed()
    assert bare.sink.intx is True
    assert bare.read(CommonCfg.CONFIG_GENERATION, 1) == 1
    assert bare.transport.read(L.isr, 1) == 0x2
    assert bare.sink.intx is False
    assert bare.transport.read(L.isr, 1) == 0
    bare.transport.config_changed()
    bare.transport.set_msix_enabled(True)  # INTx is not used under MSI-X
    assert bare.sink.intx is False and bare.sink.notified == []  # config vector is NO_VECTOR


async def test_notify_area_writes_kick(bare: Bare) -> None:
    await bare.transport.write(L.notify_address(0), 2, 0)
    await bare.transport.write(L.notify_address(5), 2, 5)  # no such queue
    await bare.transport.write(L.notify + 2, 2, 0)  # not a queue's address
    assert bare.runner.kicks == {0: 1}


# -- with the guest-driver toolkit ------------------------------------------------------------


async def test_blk_comes_up_with_one_vector_per_queue_and_config(image: int) -> None:
    async with virtio_system(lambda: BlkDevice(image)) as system:
        with trio.fail_after(10):
            blk = BlkDriver(system.driver)
            await blk.start()
            assert system.driver.plan == VectorPlan(True, 0, (1,))
            assert system.vectors.uses == {0: 1, 1: 1}
            assert system.transport.status == (
                Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
            )
            await blk.write(0, b"a" * 512)
            assert set(system.sink.notified) == {1}  # used buffers use the queue's vector
            await system.transport.write(L.device, 8, 0)  # read-only config: ignored
            assert blk.capacity == 2048 == system.transport.read(L.device, 8)
            system.transport.config_changed()
            assert system.sink.notified[-1] == 0 and system.driver.config_changes == 1


@pytest.mark.parametrize(
    ("budget", "table", "plan", "uses"),
    [
        (4, 8, VectorPlan(True, 0, (1, 2, 3)), {0: 1, 1: 1, 2: 1, 3: 1}),
        (2, 8, VectorPlan(True, 0, (1, 1, 1)), {0: 1, 1: 3}),  # budget: shared fallback
        (8, 2, VectorPlan(True, 0, (1, 1, 1)), {0: 1, 1: 3}),  # table too small for per-queue
        (1, 8, VectorPlan(False, NO, (NO, NO, NO)), {}),  # INTx
    ],
)
async def test_driver_falls_back_when_the_hub_refuses_vectors(
    budget: int, table: int, plan: VectorPlan, uses: dict[int, int]
) -> None:
    async with virtio_system(ThreeQueueRng, msix_vectors=8, budget=budget) as system:
        system.vectors.table_size = table
        with trio.fail_after(10):
            await system.driver.initialize(RING, (None, None, None))
            assert system.driver.plan == plan
            assert system.vectors.uses == uses == system.transport.vector_uses()
            assert system.access.msix_enabled[-1] is plan.msix
            for queue in range(3):
                buffer = system.driver.allocator.alloc(32)
                assert await system.driver.submit(queue, [], [(buffer, 32)]) == 32
            if not plan.msix:
                assert system.sink.intx_edges >= 1 and system.sink.notified == []


async def test_rng_over_intx() -> None:
    async with virtio_system(RngDevice, msix_vectors=0) as system:
        with trio.fail_after(10):
            rng = RngDriver(system.driver)
            await rng.start()
            chunks = [await rng.read(64) for _ in range(8)]
            assert all(len(chunk) == 64 for chunk in chunks) and len(set(chunks)) == 8
            assert system.sink.intx_edges >= 8 and system.sink.intx is False


async def test_rng_fills_at_most_max_bytes() -> None:
    async with virtio_system(lambda: RngDevice(max_bytes=100)) as system:
        with trio.fail_after(10):
            await system.driver.initialize(RING)
            buffer = system.driver.allocator.alloc(4096)
            assert await system.driver.submit(0, [(buffer, 8)], [(buffer, 4096)]) == 100


async def test_reset_waits_for_requests_then_unuses_every_vector(image: int) -> None:
    async with virtio_system(lambda: BlkDevice(image)) as system:
        with trio.fail_after(10):
            blk = BlkDriver(system.driver)
            await blk.start()
            gate = trio.Event()
            entered = trio.Event()
            original = system.runner.quiesce

            async def slow_quiesce() -> None:
                entered.set()
                await gate.wait()
                await original()

            system.runner.quiesce = slow_quiesce  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(system.driver.reset)
                await entered.wait()
                assert system.vectors.uses == {0: 1, 1: 1}  # not before the device is quiet
                assert system.transport.pop(0) is None  # rings already stopped
                gate.set()
            assert system.vectors.uses == {} and system.transport.status == 0
            assert system.transport.live_queues() == []
            assert system.transport.read(L.common + CommonCfg.QUEUE_MSIX_VECTOR, 2) == NO
            await blk.start()  # and it comes back
            assert await blk.read(0, 512) == bytes(512)


async def test_hostile_ring_sets_needs_reset_and_raises_a_config_interrupt(image: int) -> None:
    async with virtio_system(lambda: BlkDevice(image)) as system:
        with trio.fail_after(10):
            blk = BlkDriver(system.driver)
            await blk.start()
            ring = system.driver.queues[0]
            system.memory.write_u16(ring.layout.avail + 2, 300)  # avail idx jumps by 300
            await system.transport.write(L.notify_address(0), 2, 0)
            await system.driver.wait_config_change()
            assert system.transport.status & Status.DEVICE_NEEDS_RESET
            assert "300 entries past" in (system.transport.queue_error(0) or "")
            assert system.transport.live_queues() == []
            system.memory.write_u16(ring.layout.avail + 2, 0)
            await blk.start()  # a reset brings it back
            assert not system.transport.status & Status.DEVICE_NEEDS_RESET
            await blk.write(0, b"b" * 512)


async def test_blk_request_without_status_byte_stops_the_queue(image: int) -> None:
    async with virtio_system(lambda: BlkDevice(image)) as system:
        with trio.fail_after(10):
            blk = BlkDriver(system.driver)
            await blk.start()
            ring = system.driver.queues[0]
            header = system.driver.allocator.alloc(16)
            ring.add([(header, 16)], [], "no status")
            await system.transport.write(L.notify_address(0), 2, 0)
            await system.driver.wait_config_change()
            assert "no status byte" in (system.transport.queue_error(0) or "")


async def test_new_memory_table_is_followed_by_live_rings(image: int) -> None:
    async with virtio_system(lambda: BlkDevice(image)) as system:
        with trio.fail_after(10):
            blk = BlkDriver(system.driver)
            await blk.start()
            await blk.write(0, b"m" * 512)
            old = system.transport.memory
            fresh = GuestMemory.from_memfd(system.fd, MEMORY_SIZE)
            system.transport.set_memory(fresh)
            assert old.close() is True  # nothing of the device pins the old table any more
            assert await blk.read(0, 512) == b"m" * 512
            with memfd(4096) as small_fd:
                too_small = GuestMemory.from_memfd(small_fd, 4096)
            system.transport.set_memory(too_small)  # the ring is not covered any more
            assert system.transport.status & Status.DEVICE_NEEDS_RESET
            assert "outside guest memory" in (system.transport.queue_error(0) or "")
            system.transport.set_memory(fresh)
            too_small.close()
