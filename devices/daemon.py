"""The shell every device daemon shares: its connection to the hub.

A daemon never sees the MSI-X table. It signals a vector with ``notify(v)``: one eventfd
write when the hub gave it a call fd for ``v`` (the hub is off the path), else a ``notify``
message. It declares the vectors it will use (``use``/``unuse``, refcounted in the hub,
which may refuse with ``no-route``), says when an interrupt's reason is gone
(``deassert``), and answers the guest's register accesses that the hub forwards.

A model plugs in through the ``DeviceModel`` protocol. The hub may send requests before
``register_device`` returns (memory table, call fds, kick fds of a restarted device), so
the model must accept them from the start.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import trio
from msixhub.protocol.connection import Notice, Request
from msixhub.protocol.errors import ConnectionClosed, ErrorCode, MessageError, RemoteError
from msixhub.protocol.fds import NowaitReader, OwnedFd, close_all, eventfd_write
from msixhub.protocol.messages import (
    BarRead,
    BarWrite,
    ClearCallFd,
    Deassert,
    DeviceInfo,
    Notify,
    Region,
    RegisterDevice,
    Registered,
    SetCallFd,
    SetIntx,
    SetKickFd,
    SetMemTable,
    SetMsixEnabled,
    Unuse,
    Use,
    Value,
)
from msixhub.protocol.ops import Empty
from msixhub.protocol.peer import Peer, connect_unix, open_peer
from msixhub.protocol.schema import Message

log = logging.getLogger("msixhub.device")


class NoVectorError(MessageError):
    """The hub refused a vector (no route under ``static``, or past the table)."""


class DeviceModel(Protocol):
    info: DeviceInfo

    def attach_hub(self, hub: HubLink) -> None:
        """Called once, before registration: the model's way to signal vectors."""

    def set_memory(self, regions: Sequence[Region], fds: list[OwnedFd]) -> None:
        """The whole guest memory table (ownership of the fds passes to the model)."""

    async def bar_read(self, bar: int, offset: int, size: int) -> int: ...

    async def bar_write(self, bar: int, offset: int, size: int, value: int) -> None: ...

    async def kicked(self, queue: int) -> None:
        """The VMM notified ``queue`` (one or more times since the last call)."""

    def set_inflight(self, fd: OwnedFd | None, restarted: bool) -> None:
        """The in-flight region the hub keeps for this device (None if none was asked for)."""


class HubLink:
    """The daemon's end of the hub connection, handed to the model."""

    def __init__(self, peer: Peer, nursery: trio.Nursery, model: DeviceModel) -> None:
        self.peer = peer
        self.model = model
        self.nursery = nursery
        self.call_fds: dict[int, OwnedFd] = {}
        self.kick_fds: dict[int, OwnedFd] = {}
        self._kick_readers: dict[int, trio.CancelScope] = {}
        self.notifications = 0
        self.msix_enabled = False
        # A model that cares (virtio: ISR and INTx) sets this; the others ignore the message.
        self.on_msix_enabled: Callable[[bool], None] | None = None
        self._outbox_send, self._outbox_receive = trio.open_memory_channel[Message](math.inf)
        nursery.start_soon(self._send_outbox)
        self.on_notice: Callable[[Message], Awaitable[None]] | None = None
        """Set by a model that takes notices from the hub (ivshmem: its peer id, peers, INTx)."""

    async def notify(self, vector: int) -> None:
        """Signal ``vector``: an eventfd write if routed, else a message through the hub."""
        self.notifications += 1
        fd = self.call_fds.get(vector)
        if fd is not None:
            eventfd_write(fd.fileno())
        else:
            await self.peer.notify(Notify(vector))

    def notify_soon(self, vector: int) -> None:
        """``notify`` for synchronous callers: the eventfd write happens now; a message, if
        one is needed, leaves in order from a task (never dropped)."""
        self.notifications += 1
        fd = self.call_fds.get(vector)
        if fd is not None:
            eventfd_write(fd.fileno())
        else:
            self._outbox_send.send_nowait(Notify(vector))

    def set_intx_soon(self, level: bool) -> None:
        self._outbox_send.send_nowait(SetIntx(level))

    async def _send_outbox(self) -> None:
        async for message in self._outbox_receive:
            try:
                await self.peer.notify(message)
            except ConnectionClosed:
                return

    async def use(self, vector: int) -> None:
        try:
            await self.peer.call(Use(vector))
        except RemoteError as exc:
            if exc.code in (ErrorCode.NO_ROUTE, ErrorCode.BAD_RANGE):
                raise NoVectorError(exc.code, exc.message) from None
            raise

    async def unuse(self, vector: int) -> None:
        await self.peer.call(Unuse(vector))

    async def deassert(self, vector: int) -> None:
        await self.peer.call(Deassert(vector))

    async def set_intx(self, level: bool) -> None:
        await self.peer.notify(SetIntx(level))

    # --- the hub's requests ----------------------------------------------------------------

    async def on_request(self, peer: Peer, request: Request) -> Message:
        body = request.body
        if isinstance(body, BarRead):
            return Value(await self.model.bar_read(body.bar, body.offset, body.size))
        if isinstance(body, BarWrite):
            await self.model.bar_write(body.bar, body.offset, body.size, body.value)
            return Empty()
        if isinstance(body, SetCallFd):
            self._replace(self.call_fds, body.vector, _take(request, 0, f"call{body.vector}"))
            return Empty()
        if isinstance(body, ClearCallFd):
            self._replace(self.call_fds, body.vector, None)
            return Empty()
        if isinstance(body, SetKickFd):
            self._set_kick(body.queue, _take(request, 0, f"kick{body.queue}"))
            return Empty()
        if isinstance(body, SetMsixEnabled):
            self.msix_enabled = body.enabled
            if self.on_msix_enabled is not None:
                self.on_msix_enabled(body.enabled)
            return Empty()
        if isinstance(body, SetMemTable):
            fds = [_take(request, i, "guest-memory") for i in range(len(request.fds))]
            self.model.set_memory(body.regions, fds)
            return Empty()
        raise MessageError(ErrorCode.UNKNOWN_OP, f"a device does not serve {request.op}")

    @staticmethod
    def _replace(table: dict[int, OwnedFd], key: int, fd: OwnedFd | None) -> None:
        old = table.pop(key, None)
        if fd is not None:
            table[key] = fd
        if old is not None:
            old.close()

    def _set_kick(self, queue: int, fd: OwnedFd) -> None:
        scope = self._kick_readers.pop(queue, None)
        if scope is not None:
            scope.cancel()
        old = self.kick_fds.pop(queue, None)
        if old is not None:
            trio.lowlevel.notify_closing(old.fileno())
            old.close()
        self.kick_fds[queue] = fd
        scope = self._kick_readers[queue] = trio.CancelScope()
        self.nursery.start_soon(self._read_kicks, queue, fd, scope)

    async def _read_kicks(self, queue: int, fd: OwnedFd, scope: trio.CancelScope) -> None:
        """A count left from before a restart makes the fd readable at once: a kick is never
        lost. The read cannot block: the VMM holds the file too, and may clear O_NONBLOCK or
        take the count this reader woke for. The fd is closed only after this is cancelled."""
        if scope.cancel_called:
            return  # replaced before it ran: the fd is closed already
        number, read = fd.fileno(), NowaitReader().read
        wait_readable, kicked = trio.lowlevel.wait_readable, self.model.kicked
        with scope:
            try:
                while True:
                    await wait_readable(number)
                    if read(number):
                        await kicked(queue)
            except trio.ClosedResourceError:
                return

    def close(self) -> None:
        for scope in self._kick_readers.values():
            scope.cancel()
        for fd in self.kick_fds.values():
            trio.lowlevel.notify_closing(fd.fileno())
        close_all(list(self.kick_fds.values()))
        close_all(list(self.call_fds.values()))
        self.kick_fds.clear()
        self.call_fds.clear()


def _take(request: Request, index: int, name: str) -> OwnedFd:
    return OwnedFd(request.fds[index].detach(), name)


@asynccontextmanager
async def open_device(
    socket_path: str, model: DeviceModel
) -> AsyncIterator[tuple[HubLink, Registered]]:
    """Connect ``model`` to the hub and register it; the link lives for the block."""
    transport = await connect_unix(socket_path)
    async with trio.open_nursery() as nursery:
        holder: list[HubLink] = []

        async def on_request(peer: Peer, request: Request) -> Message:
            return await holder[0].on_request(peer, request)

        async def on_notice(peer: Peer, notice: Notice) -> None:
            close_all(notice.fds)
            handler = holder[0].on_notice if holder else None
            if handler is not None:
                await handler(notice.body)

        async with open_peer(
            transport, "device", name=model.info.device, on_request=on_request, on_notice=on_notice
        ) as peer:
            link = HubLink(peer, nursery, model)
            holder.append(link)
            model.attach_hub(link)
            try:
                reply, fds = await peer.request(RegisterDevice(model.info))
                assert isinstance(reply, Registered)
                model.set_inflight(fds[0] if fds else None, reply.restarted)
                yield link, reply
            finally:
                link.close()
                nursery.cancel_scope.cancel()


async def run_device(socket_path: str, model: DeviceModel) -> None:
    """Serve ``model`` until the hub goes away (then return, so the daemon exits)."""
    async with open_device(socket_path, model) as (link, reply):
        log.info("%s registered%s", model.info.device, " (restarted)" if reply.restarted else "")
        # What is alive now (interpreter, trio, the model) lives as long as the daemon: keep
        # it out of the collector's full passes, which would otherwise stall the data path.
        gc.freeze()
        await link.peer.closed.wait()
        log.warning("hub connection closed: %s", link.peer.close_reason)
