"""``msixhub bench protocol``: request/reply round trips per second through the trio
``Peer`` over a unix socket (client in this process, an echo server ``Peer`` in a child
process), beside the bare loop the protocol has to stand next to: the same payloads,
``msgpack.packb``/``unpackb`` over a socketpair between two processes with blocking
sockets, no framing, no validation, no event loop.

A third loop is measured for context, not as a target: the least any trio program can do
per round trip (one task per side, ``wait_readable`` + ``recv`` + msgpack, no protocol).
The gap between it and the bare loop is trio's event loop, which every trio adapter pays.

Each pinning is measured in alternating rounds (bare, floor, ours, bare, ...) so drift in
the machine hits all alike, and the median round is reported. Pinning is done with
``sched_setaffinity`` in each process, identically for every loop: client and server on
one CPU (each round trip is two context switches there) and, with two CPUs or more, client
on the first and server on the second (each round trip is two cross-CPU wake-ups). The
server uses ``inline_requests=True``: echo never waits on its peer.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import msgpack
import trio
from msixhub.bench.report import Report
from msixhub.protocol.connection import Request
from msixhub.protocol.messages import Echo
from msixhub.protocol.peer import Peer, open_peer
from msixhub.protocol.schema import Message
from msixhub.protocol.transport import Transport

PAYLOAD = bytes(range(64))  # a control message: a few fields and a short blob
ROUNDS = 3
WARMUP = 0.2  # seconds at the start of each round, not counted
BATCH = 64  # round trips between two looks at the clock
KINDS = ("bare", "floor", "peer")


def measure(seconds: float) -> Report:
    cpus = sorted(os.sched_getaffinity(0))
    pinnings = [("one cpu", cpus[0], cpus[0])]
    if len(cpus) > 1:
        pinnings.append(("two cpus", cpus[0], cpus[1]))
    report = Report(
        "protocol",
        "; ".join(f"{label}: client cpu{c}, server cpu{s}" for label, c, s in pinnings)
        + " (sched_setaffinity, the same for every loop)",
    )
    original = os.sched_getaffinity(0)
    try:
        for label, client_cpu, server_cpu in pinnings:
            os.sched_setaffinity(0, {client_cpu})
            rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for _ in range(ROUNDS):
                for kind in KINDS:
                    rates[kind].append(_round(kind, server_cpu, max(seconds / ROUNDS, 0.3)))
            ours, bare, floor = (statistics.median(rates[k]) for k in ("peer", "bare", "floor"))
            report.add(f"echo round trips ({label})", "per s", ours, bare, higher_is_better=True)
            report.notes.append(
                f"{label}: per round trip ours {1e6 / ours:.1f} us, bare {1e6 / bare:.1f} us, "
                f"trio floor {1e6 / floor:.1f} us (floor/bare {floor / bare:.2f}x, "
                f"ours/floor {ours / floor:.2f}x); rounds per s: "
                + ", ".join(f"{k} {[round(r) for r in rates[k]]}" for k in KINDS)
            )
    finally:
        os.sched_setaffinity(0, original)
    report.notes.append(
        f"payload {len(PAYLOAD)} B; python {sys.version.split()[0]}; "
        f"msgpack {'.'.join(map(str, msgpack.version))}; trio {trio.__version__}; "
        f"load average {os.getloadavg()[0]:.2f} at the end; command: msixhub bench protocol"
    )
    return report


def _round(kind: str, server_cpu: int, seconds: float) -> float:
    """Round trips per second of one round against a fresh server child."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [sys.executable, "-m", "msixhub.bench.protocol", kind, str(theirs.fileno())]
    child = subprocess.Popen([*command, str(server_cpu)], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        if kind == "bare":
            return _bare_client(ours, seconds)
        client = _floor_client if kind == "floor" else _peer_client
        return trio.run(client, ours, seconds)
    finally:
        ours.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _request() -> list[object]:
    return [1, 1, "echo", {"payload": PAYLOAD}]  # what the protocol's request envelope holds


# --- the bare loop ---------------------------------------------------------------------------


def _bare_client(sock: socket.socket, seconds: float) -> float:
    request = _request()

    def round_trip() -> None:
        sock.sendall(msgpack.packb(request))
        reply = msgpack.unpackb(sock.recv(65536))
        assert reply[2]["payload"] == PAYLOAD

    end = time.perf_counter() + WARMUP
    while time.perf_counter() < end:
        round_trip()
    count, start = 0, time.perf_counter()
    while (now := time.perf_counter()) < start + seconds or not count:
        for _ in range(BATCH):
            round_trip()
        count += BATCH
    return count / (now - start)


def _bare_server(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        _, request_id, _, body = msgpack.unpackb(data)
        sock.sendall(msgpack.packb([2, request_id, body]))


# --- the least a trio program can do ---------------------------------------------------------


async def _floor_client(sock: socket.socket, seconds: float) -> float:
    sock.setblocking(False)
    request = _request()

    async def round_trip() -> None:
        sock.send(msgpack.packb(request))
        await trio.lowlevel.wait_readable(sock)
        reply = msgpack.unpackb(sock.recv(65536))
        assert reply[2]["payload"] == PAYLOAD

    return await _timed(round_trip, seconds)


async def _floor_server(sock: socket.socket) -> None:
    sock.setblocking(False)
    while True:
        await trio.lowlevel.wait_readable(sock)
        data = sock.recv(65536)
        if not data:
            return
        _, request_id, _, body = msgpack.unpackb(data)
        sock.send(msgpack.packb([2, request_id, body]))


# --- through the protocol --------------------------------------------------------------------


async def _peer_client(sock: socket.socket, seconds: float) -> float:
    message = Echo(PAYLOAD)
    async with open_peer(Transport(trio.socket.from_stdlib_socket(sock)), "vmm") as peer:

        async def round_trip() -> None:
            assert await peer.call(message) == message

        return await _timed(round_trip, seconds)


async def _peer_server(sock: socket.socket) -> None:
    async def echo(peer: Peer, request: Request) -> Message:
        return request.body

    transport = Transport(trio.socket.from_stdlib_socket(sock))
    async with open_peer(transport, "device", on_request=echo, inline_requests=True) as peer:
        await peer.closed.wait()


async def _timed(round_trip: Callable[[], Awaitable[None]], seconds: float) -> float:
    end = time.perf_counter() + WARMUP
    while time.perf_counter() < end:
        await round_trip()
    count, start = 0, time.perf_counter()
    while (now := time.perf_counter()) < start + seconds or not count:
        for _ in range(BATCH):
            await round_trip()
        count += BATCH
    return count / (now - start)


def _serve(kind: str, fd: int, cpu: int) -> None:
    """The child: pin, then echo until the client hangs up."""
    os.sched_setaffinity(0, {cpu})
    with socket.socket(fileno=fd) as sock:
        if kind == "bare":
            _bare_server(sock)
        else:
            trio.run(_floor_server if kind == "floor" else _peer_server, sock)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
