"""File descriptors across a real process boundary, and no fd leaked by a thousand
connections that each go wrong in a different way."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import sys
import textwrap

import pytest
import trio
from msixhub.protocol.connection import PROTOCOL_VERSION
from msixhub.protocol.errors import ConnectionClosed, ProtocolError
from msixhub.protocol.fds import (
    NOWAIT_READS,
    NowaitReader,
    close_all,
    eventfd,
    eventfd_read,
    eventfd_read_nowait,
    eventfd_write,
    memfd,
    vector_eventfd,
)
from msixhub.protocol.frame import DEFAULT_MAX_FRAME, HEADER
from msixhub.protocol.messages import (
    Attach,
    Attached,
    Echo,
    Hello,
    Region,
    SetCallFd,
    SetMemTable,
)
from msixhub.protocol.peer import Peer, handshake, open_peer
from msixhub.protocol.transport import Transport
from protocol_helpers import open_fd_numbers, raw_frame, raw_handshake, scm_rights

CHILD = textwrap.dedent(
    """
    import mmap, os, socket, sys
    import trio
    from msixhub.protocol.fds import eventfd, eventfd_write
    from msixhub.protocol.messages import (
        Attach, Attached, Bar, DeviceInfo, MsixLayout, SetCallFd, SetMemTable,
    )
    from msixhub.protocol.ops import Empty
    from msixhub.protocol.peer import open_peer
    from msixhub.protocol.transport import Transport

    async def handle(peer, request):
        body = request.body
        if isinstance(body, SetMemTable):  # write into the guest memory we were given
            for region, fd in zip(body.regions, request.fds):
                with mmap.mmap(fd.fileno(), region.size, offset=region.offset) as mem:
                    note = b"written by the child %8d" % os.getpid()
                    mem[: len(note)] = note
            return Empty()
        if isinstance(body, SetCallFd):  # signal the vector through the eventfd we were given
            eventfd_write(request.fds[0].fileno(), body.vector + 1000)
            return Empty()
        if isinstance(body, Attach):  # and fds the other way: one kick eventfd per queue
            info = DeviceInfo(body.device, "test", 2, 3, [Bar(0, 4096)], MsixLayout(0, 0, 2048))
            return Attached(info), [eventfd(10 + queue) for queue in range(3)]
        raise AssertionError(body)

    async def main():
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=int(sys.argv[1])))
        async with open_peer(Transport(sock), "device", on_request=handle) as peer:
            await peer.closed.wait()

    trio.run(main)
    """
)


async def test_eventfd_and_memfd_cross_a_process_boundary() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    try:
        with trio.fail_after(30):
            transport = Transport(trio.socket.from_stdlib_socket(ours))
            async with open_peer(transport, "vmm") as peer:
                with memfd(2 * mmap.PAGESIZE) as guest, eventfd() as call:
                    await peer.call(
                        SetMemTable([Region(0, mmap.PAGESIZE, mmap.PAGESIZE)]), [guest.fileno()]
                    )
                    with mmap.mmap(guest.fileno(), 2 * mmap.PAGESIZE) as mem:
                        assert mem[: mmap.PAGESIZE] == bytes(mmap.PAGESIZE)  # untouched
                        note = b"written by the child %8d" % process.pid
                        assert mem[mmap.PAGESIZE : mmap.PAGESIZE + len(note)] == note
                    await peer.call(SetCallFd(5), [call.fileno()])
                    assert eventfd_read(call.fileno()) == 1005
                reply, kicks = await peer.request(Attach("blk0"))
                assert isinstance(reply, Attached) and reply.info.num_queues == 3
                assert [eventfd_read(fd.fileno()) for fd in kicks] == [10, 11, 12]
                close_all(kicks)
            assert await process.wait() == 0  # it saw us close and exited cleanly
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


# --- a thousand broken connections leak nothing ------------------------------------------------


async def _serve(transport: Transport) -> None:
    """What the hub does with each connection: handshake, then serve until it ends."""
    try:
        connection = await handshake(transport, "admin", timeout=5)
    except (ProtocolError, ConnectionClosed, trio.TooSlowError):
        await transport.aclose()
        return

    async def echo(peer: Peer, request: object) -> Echo:
        return Echo(b"ok")

    await Peer(transport, connection, on_request=echo).serve()  # type: ignore[arg-type]


async def _misbehave(sock: trio.socket.SocketType, kind: int) -> None:
    """One way of going wrong; then wait until the server has hung up."""
    if kind == 0:  # not our protocol at all
        await sock.send(b"SSH-2.0-OpenSSH_9.6\r\n")
    elif kind == 1:  # a frame larger than the server accepts
        await raw_handshake(sock)
        await sock.send(HEADER.pack(b"MX", 0, 0, DEFAULT_MAX_FRAME + 1))
    elif kind == 2:  # more fds than the frame declares
        await raw_handshake(sock)
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
        frame = raw_frame([1, 1, "set_call_fd", {"vector": 1}], 1)
        await sock.sendmsg([frame], scm_rights(fds))
        for fd in fds:
            os.close(fd)
    elif kind == 3:  # a hello that does not validate
        bad = Hello(PROTOCOL_VERSION, "guest", DEFAULT_MAX_FRAME, 8, [])  # type: ignore[arg-type]
        await sock.send(raw_frame([0, bad.to_wire()]))
    elif kind == 6:  # a hello in another version
        other = Hello(PROTOCOL_VERSION + 1, "vmm", DEFAULT_MAX_FRAME, 8, [])
        await sock.send(raw_frame([0, other.to_wire()]))
    elif kind == 4:  # vanishes in the middle of a frame that carries fds
        await raw_handshake(sock)
        fds = [os.eventfd(0, os.EFD_CLOEXEC)]
        frame = raw_frame([1, 1, "set_call_fd", {"vector": 1}], 1)
        await sock.sendmsg([frame[:10]], scm_rights(fds))
        os.close(fds[0])
        sock.shutdown(socket.SHUT_WR)
    elif kind == 5:  # requests whose fds are refused: unknown op, wrong count, unexpected fds
        await raw_handshake(sock)
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
        await sock.sendmsg([raw_frame([1, 1, "bogus", {}], 2)], scm_rights(fds))
        await sock.sendmsg([raw_frame([1, 2, "set_call_fd", {"vector": 1}], 2)], scm_rights(fds))
        await sock.sendmsg([raw_frame([1, 3, "echo", {"payload": b""}], 1)], scm_rights(fds[:1]))
        for fd in fds:
            os.close(fd)
        sock.shutdown(socket.SHUT_WR)
    while await sock.recv(65536):  # drain until the server hangs up
        pass
    sock.close()


async def test_a_thousand_broken_connections_leak_no_fd() -> None:
    before = open_fd_numbers()
    with trio.fail_after(120):
        for batch in range(20):
            async with trio.open_nursery() as nursery:
                for index in range(50):
                    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    nursery.start_soon(_serve, Transport(ours))
                    nursery.start_soon(_misbehave, theirs, (batch * 50 + index) % 7)
    assert open_fd_numbers() == before


def test_a_nowait_read_of_a_blocking_eventfd_does_not_block() -> None:
    """A peer holding a copy can clear O_NONBLOCK (the flag is the file's, not the fd's)."""
    if not NOWAIT_READS:
        pytest.skip("this kernel's eventfds refuse RWF_NOWAIT reads")
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
    try:
        assert eventfd_read_nowait(fd) == 0
        eventfd_write(fd, 3)
        eventfd_write(fd, 4)
        assert eventfd_read_nowait(fd) == 7
        assert eventfd_read_nowait(fd) == 0
    finally:
        os.close(fd)


def test_vector_eventfds_block_where_the_hub_can_read_them_without_blocking() -> None:
    """Blocking, so a VMM with nothing else to do waits in one read; but never where a reader
    that must not block would have no way not to (no RWF_NOWAIT for eventfds)."""
    with vector_eventfd() as fd:
        flags = fcntl.fcntl(fd.fileno(), fcntl.F_GETFL)
        assert bool(flags & os.O_NONBLOCK) is not NOWAIT_READS
        assert fcntl.fcntl(fd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        reader = NowaitReader()
        assert reader.read(fd.fileno()) == 0
        eventfd_write(fd.fileno(), 5)
        eventfd_write(fd.fileno(), (1 << 63) - 1)  # a count past 2**62: a buffer of 64 bits
        assert reader.read(fd.fileno()) == (1 << 63) + 4
        assert reader.read(fd.fileno()) == 0
