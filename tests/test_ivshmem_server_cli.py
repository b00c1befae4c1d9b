"""``msixhub ivshmem-server`` as a real process, joined by peers written from the spec alone.

``SpecPeer`` knows nothing of msixhub: it follows docs/specs/ivshmem-spec.rst
(``ivshmem_harness.SpecPeerState``) with a plain blocking socket and ``recvmsg`` (every wait
bounded by the socket timeout or ``select``).
"""

from __future__ import annotations

import mmap
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ivshmem_harness import SpecPeerState, decode_message, receive_part

TIMEOUT = 10.0
MSIXHUB = [sys.executable, "-m", "msixhub.client.cli"]


class SpecPeer(SpecPeerState):
    """A spec peer on a blocking socket (every wait bounded by its timeout or ``select``)."""

    def __init__(self, path: str, vectors: int) -> None:
        super().__init__(vectors)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        while not self.greeted:
            self.handle(*self.receive())

    def receive(self) -> tuple[int, int | None]:
        data = b""
        fds: list[int] = []
        while len(data) < 8:
            data += receive_part(self.sock, 8 - len(data), fds)
        return decode_message(data, fds)

    def wait_for_join(self, peer_id: int, vectors: int) -> None:
        while len(self.peers.get(peer_id, ())) < vectors:
            self.handle(*self.receive())

    def wait_for_departure(self, peer_id: int) -> None:
        while peer_id not in self.gone:
            self.handle(*self.receive())

    def wait_rung(self, vector: int) -> int:
        fd = self.own[vector]
        readable, _, _ = select.select([fd], [], [], TIMEOUT)
        assert readable, f"vector {vector} of peer {self.id} not rung within {TIMEOUT}s"
        return int.from_bytes(os.read(fd, 8), sys.byteorder)

    def close(self) -> None:
        self.sock.close()
        self.close_fds()


class ServerProcess:
    """``msixhub ivshmem-server -F -v`` in a child process; its stdout is drained by a thread
    so that verbose output can never block it."""

    def __init__(self, args: list[str], socket_path: str) -> None:
        self.socket_path = socket_path
        self.proc = subprocess.Popen(
            [*MSIXHUB, "ivshmem-server", "-F", "-v", "-S", socket_path, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._drain = threading.Thread(target=self._read_stdout, daemon=True)
        self._drain.start()
        self.wait_for_line("listening on")

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self.lines.put(line.decode())
        self.lines.put("")

    def wait_for_line(self, needle: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"server did not print {needle!r}") from None
            if not line:
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"server exited: {self.proc.wait()}: {stderr}")
            if needle in line:
                return line

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=TIMEOUT)
        self._drain.join(timeout=TIMEOUT)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"msixhub-test-{uuid.uuid4().hex[:12]}"
    yield name
    Path("/dev/shm", name).unlink(missing_ok=True)


@pytest.fixture
def server(tmp_path: Path, shm_name: str) -> Iterator[ServerProcess]:
    server = ServerProcess(["-M", shm_name, "-l", "1M", "-n", "2"], str(tmp_path / "ivshmem.sock"))
    yield server
    assert server.stop() == 0
    assert not Path(server.socket_path).exists()  # removed at exit, as QEMU's server does


def test_spec_peers_share_memory_and_ring_each_other(server: ServerProcess, shm_name: str) -> None:
    first = SpecPeer(server.socket_path, 2)
    second = SpecPeer(server.socket_path, 2)
    try:
        assert (first.id, second.id) == (0, 1)
        first.wait_for_join(second.id, 2)
        assert list(second.peers) == [first.id] and len(second.peers[first.id]) == 2
        size = os.fstat(first.shm).st_size
        assert size == 1 << 20 == os.stat(f"/dev/shm/{shm_name}").st_size
        with (
            mmap.mmap(first.shm, size) as one,
            mmap.mmap(second.shm, size) as two,
        ):
            one[size - 4 :] = b"ping"
            assert two[size - 4 :] == b"ping"
        for vector in (0, 1):
            first.ring(second.id, vector)
            assert second.wait_rung(vector) == 1
            second.ring(first.id, vector)
            second.ring(first.id, vector)
            assert first.wait_rung(vector) == 2  # an eventfd adds up the rings
    finally:
        first.close()
        second.close()


def test_sigkill_of_a_peer_process_is_announced(server: ServerProcess) -> None:
    watcher = SpecPeer(server.socket_path, 2)
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, server.socket_path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert victim.stdout is not None
        victim_id = int(victim.stdout.readline())
        watcher.wait_for_join(victim_id, 2)
        victim.kill()
        assert victim.wait(timeout=TIMEOUT) == -signal.SIGKILL
        watcher.wait_for_departure(victim_id)
        assert victim_id not in watcher.peers
        server.wait_for_line(f"peer {victim_id} left")
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        if victim.stdout is not None:
            victim.stdout.close()
        watcher.close()


VICTIM = """
import socket, sys, signal
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
data = b""
while len(data) < 16:
    data += sock.recv(16 - len(data))
print(int.from_bytes(data[8:16], "little", signed=True), flush=True)
signal.pause()
"""


def test_join_leave_storm_leaks_no_fd(server: ServerProcess) -> None:
    watcher = SpecPeer(server.socket_path, 2)

    def cycle() -> int:
        transient = SpecPeer(server.socket_path, 2)
        transient_id = transient.id
        transient.close()
        watcher.wait_for_join(transient_id, 2)
        # The server closed the transient's socket and eventfds before announcing this:
        watcher.wait_for_departure(transient_id)
        return transient_id

    try:
        # Count after a departure: the server's dup of an fd it sends is closed just after
        # the peer can read it, so right after a join announcement one may still be open.
        cycle()
        before = server.fd_count()
        ids = [cycle() for _ in range(300)]
        assert server.fd_count() == before
        assert ids == list(range(2, 302))  # ids kept increasing: none reused
    finally:
        watcher.close()


def test_file_backed_memory_in_a_directory(tmp_path: Path) -> None:
    server = ServerProcess(["-m", str(tmp_path), "-l", "3M"], str(tmp_path / "sock"))
    try:
        peer = SpecPeer(server.socket_path, 1)
        try:
            assert os.fstat(peer.shm).st_size == 4 << 20  # rounded up to a power of two
            assert os.fstat(peer.shm).st_nlink == 0  # created in the directory, then unlinked
            assert os.readlink(f"/proc/self/fd/{peer.shm}").startswith(f"{tmp_path}/ivshmem.")
        finally:
            peer.close()
    finally:
        assert server.stop() == 0


def test_existing_posix_shm_of_the_right_size_keeps_its_contents(
    tmp_path: Path, shm_name: str
) -> None:
    Path("/dev/shm", shm_name).write_bytes(b"kept" + bytes((64 << 10) - 4))
    server = ServerProcess(["-M", f"/{shm_name}", "-l", "64K"], str(tmp_path / "sock"))
    try:
        peer = SpecPeer(server.socket_path, 1)
        try:
            assert os.pread(peer.shm, 4, 0) == b"kept"
        finally:
            peer.close()
    finally:
        assert server.stop() == 0


def test_daemon_mode_writes_the_pid_file_before_returning(tmp_path: Path, shm_name: str) -> None:
    pid_file = tmp_path / "server.pid"
    socket_path = str(tmp_path / "sock")
    # The daemon keeps the stdio it was given (as QEMU's does): give it files, not pipes.
    with open(tmp_path / "out", "wb") as out:
        result = subprocess.run(
            [*MSIXHUB, "ivshmem-server", "-p", str(pid_file), "-S", socket_path, "-M", shm_name],
            stdout=out,
            stderr=out,
            timeout=TIMEOUT,
        )
    assert result.returncode == 0, (tmp_path / "out").read_text()
    pid = int(pid_file.read_text())
    exited = os.pidfd_open(pid)  # the daemon is not our child: watch it through a pidfd
    try:
        try:
            peer = SpecPeer(socket_path, 1)  # the defaults: 1 vector, 4M
            assert os.fstat(peer.shm).st_size == 4 << 20
            peer.close()
        finally:
            signal.pidfd_send_signal(exited, signal.SIGTERM)
        readable, _, _ = select.select([exited], [], [], TIMEOUT)
        assert readable, "the daemon did not exit on SIGTERM"
    finally:
        os.close(exited)
    assert not Path(socket_path).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-l", "0"], "must be positive"),
        (["-l", "2G"], "too large"),
        (["-l", "1.5"], "needs a suffix"),
        (["-l", "lots"], "invalid size"),
        (["-n", "65"], "too many requested vectors (max is 64)"),
        (["-n", "0"], "at least one vector"),
        (["-n", "two"], "cannot parse vectors"),
        (["-M", "a/b"], "invalid POSIX shared memory name"),
        (["-M", "/"], "invalid POSIX shared memory name"),
        (["-v"], "cannot use verbose in daemon mode"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    socket_path = tmp_path / "sock"
    result = subprocess.run(
        [*MSIXHUB, "ivshmem-server", "-S", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert not socket_path.exists()


def test_socket_in_use_is_a_clear_error(server: ServerProcess, shm_name: str) -> None:
    result = subprocess.run(
        [*MSIXHUB, "ivshmem-server", "-F", "-S", server.socket_path, "-M", shm_name],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1
    assert f"cannot bind {server.socket_path}: Address already in use" in result.stderr
    SpecPeer(server.socket_path, 2).close()  # the running server is unharmed


def test_vectors_parse_like_qemu(tmp_path: Path, shm_name: str) -> None:
    server = ServerProcess(["-M", shm_name, "-n", "0x3", "-l", "0x10000"], str(tmp_path / "s"))
    try:
        peer = SpecPeer(server.socket_path, 3)
        assert len(peer.own) == 3 and os.fstat(peer.shm).st_size == 0x10000
        peer.close()
    finally:
        assert server.stop() == 0
