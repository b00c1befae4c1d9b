"""The VMM client's per-device state without a hub: its irq readers and its kick channels."""

from __future__ import annotations

import pytest
import trio
from fd_thief import race_a_thief
from msixhub.client.vmm import (
    MSIX_ENABLE,
    AttachedDevice,
    EventQueue,
    Interrupt,
    IntxEvent,
    VmmClient,
)
from msixhub.protocol.errors import ConnectionClosed, ErrorCode, MessageError
from msixhub.protocol.fds import (
    NOWAIT_READS,
    eventfd,
    eventfd_read,
    eventfd_write,
    vector_eventfd,
)
from msixhub.protocol.messages import Attached, Bar, DeviceInfo, MsixLayout

VECTORS = 2
QUEUES = 2


def _device(nursery: trio.Nursery) -> AttachedDevice:
    """A device whose vectors are all unmasked with MSI-X on, as a re-attach finds them."""
    info = DeviceInfo(
        device="dev0",
        kind="testdev",
        num_vectors=VECTORS,
        num_queues=QUEUES,
        bars=[Bar(0, 4096), Bar(1, 4096)],
        msix=MsixLayout(bar=1, table_offset=0, pba_offset=VECTORS * 16),
    )
    vm = VmmClient(None, nursery)  # type: ignore[arg-type]  # no hub: nothing here calls it
    state = Attached(info, bytes(VECTORS * 16), MSIX_ENABLE)
    return AttachedDevice(vm, info, [eventfd() for _ in range(QUEUES)], state)


async def test_a_reader_stopped_before_it_ran_leaves_the_fd_to_its_successor() -> None:
    """Unmask, mask, unmask with no checkpoint between (a failed table write restarts the
    reader at once): whichever reader trio runs first, the stale one must not wait on the fd
    (trio would raise BusyResourceError in the client's nursery) and each count is read once."""
    for _ in range(20):  # trio runs a batch of tasks in random order
        async with trio.open_nursery() as nursery:
            device = _device(nursery)
            device._set_irq_fd(0, vector_eventfd())  # starts a reader: the vector is unmasked
            device._stop_reading(0)
            device._start_reading(0)
            await trio.testing.wait_all_tasks_blocked()
            eventfd_write(device.irq_fds[0].fileno(), 3)
            with trio.fail_after(5):
                event = await device.vm.next_event()
            assert event == Interrupt("dev0", 0, 0, 0, 3)
            await trio.testing.wait_all_tasks_blocked()
            assert len(device.vm.queue) == 0 and list(device.notifications) == [3, 0]
            device.close()


@pytest.mark.skipif(not NOWAIT_READS, reason="vector eventfds are non-blocking here")
@pytest.mark.timeout(20)  # a reader that blocks in read() stops trio: fail_after cannot fire
async def test_a_count_stolen_by_another_holder_does_not_block_the_reader() -> None:
    """Vector eventfds are blocking files, and the device (or an ivshmem peer) holds a copy:
    if it reads the count the VMM's reader was woken for, the reader finds the fd empty and
    must wait again, not block the VMM in read()."""
    async with trio.open_nursery() as nursery:
        device = _device(nursery)
        device._set_irq_fd(0, vector_eventfd())
        await race_a_thief(device.irq_fds[0], lambda: device.notifications[0])
        nursery.cancel_scope.cancel()
        device.close()


async def test_a_kick_reaches_its_queue_and_a_bad_one_is_a_clear_error() -> None:
    async with trio.open_nursery() as nursery:
        device = _device(nursery)
        device.kick(1)
        assert eventfd_read(device.kicks[1].fileno()) == 1
        for queue in (QUEUES, -1):
            with pytest.raises(MessageError) as error:
                device.kick(queue)
            assert error.value.code == ErrorCode.BAD_RANGE
        assert eventfd_read(device.kicks[0].fileno()) == 0  # -1 did not kick the last queue
        device.close()
        with pytest.raises(ConnectionClosed, match="detached"):
            device.kick(0)


async def test_message_interrupts_coalesce_per_vector_while_queued() -> None:
    """The connection is read whatever the queue holds, so interrupts that come as messages
    take one place per vector (counts add up, the newer message wins), as in an eventfd."""
    queue = EventQueue(limit=4)
    queue.put_interrupt(Interrupt("dev0", 0, 0xFEE0_0000, 1, 2))
    queue.put(IntxEvent("dev0", True))
    for data in range(2, 1002):
        queue.put_interrupt(Interrupt("dev0", 0, 0xFEE0_0000, data, 1))
    queue.put_interrupt(Interrupt("dev0", 1, 0xFEE0_1000, 7, 1))
    assert len(queue) == 3
    with trio.fail_after(5):
        assert await queue.get() == Interrupt("dev0", 0, 0xFEE0_0000, 1001, 1002)
        queue.put_interrupt(Interrupt("dev0", 0, 0xFEE0_0000, 5, 1))  # a new place, at the back
        assert await queue.get() == IntxEvent("dev0", True)
        assert await queue.get() == Interrupt("dev0", 1, 0xFEE0_1000, 7, 1)
        assert await queue.get() == Interrupt("dev0", 0, 0xFEE0_0000, 5, 1)
    assert len(queue) == 0
