"""``msixhub ivshmem-server``: a drop-in for QEMU's contrib/ivshmem-server.

Same options, defaults and behaviour, so scripts written for it work unchanged::

    -h               help
    -v               verbose (foreground only, as QEMU's)
    -F               stay in the foreground (default: daemonize)
    -p PID_FILE      pid file written in daemon mode (default /var/run/ivshmem-server.pid)
    -S SOCKET        unix socket to listen on (default /tmp/ivshmem_socket)
    -M NAME          POSIX shared memory object /dev/shm/NAME (default ivshmem); kept at exit
    -m DIR           back the memory by an unlinked file created in DIR (e.g. a hugetlbfs)
    -l SIZE          size with K/M/G suffixes (default 4M), rounded up to a power of two
    -n VECTORS       vectors per peer (default 1, at most 64)
    --hub-socket P   also serve msixhub's own protocol on P (mode 0600), as ``msixhub serve``
                     does: ivshmem devices (``msixhub spawn ivshmem --name NAME``) join the
                     same region, and ``msixhub status --socket P`` shows the domain

It is backed by an msixhub hub running in-process: the region is that hub's ivshmem domain,
so QEMU-protocol peers and msixhub peers share it and ring each other, the latter with
MSI-X masking and pending bits kept by the hub (see ``msixhub.server.ivshmem``).

The last of -m and -M wins. An existing /dev/shm object that already has the size is reused
as it is (contents kept), otherwise it is resized. The memory and the socket are set up
before daemonizing, so their errors reach the terminal with exit status 1; SIGTERM or SIGINT
stops the server, which then removes its socket.

Where it differs, on purpose: a daemonizing invocation exits only once the daemon has
written its pid file (so ``cat $pidfile`` right after it works); ``-n 0`` is refused (with no
vectors, peers cannot learn of each other's joins); and a failing send, a peer that stops
reading, or SIGPIPE cost only the peer concerned (see ``qemu_server``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import resource
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from functools import partial

from msixhub.devices.ivshmem.domain import MAX_VECTORS, DomainConfigError, check_domain_params
from msixhub.devices.ivshmem.sizes import MAX_SHM_SIZE, SizeError, parse_size, shm_size
from msixhub.protocol.fds import OwnedFd

DEFAULT_PID_FILE = "/var/run/ivshmem-server.pid"
DEFAULT_SOCKET = "/tmp/ivshmem_socket"
DEFAULT_SHM_NAME = "ivshmem"
DEFAULT_SIZE = "4M"
DEFAULT_VECTORS = "1"
POSIX_SHM_DIR = "/dev/shm"


class UsageError(ValueError):
    """An option value the server cannot start with."""


@dataclass(frozen=True, slots=True)
class ShmSource:
    """Where the memory comes from: a POSIX shm object (``-M``) or a directory (``-m``)."""

    posix: bool
    path: str


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "ivshmem server speaking QEMU's protocol (drop-in for contrib's)"
    parser.add_argument("-v", dest="verbose", action="store_true", help="verbose mode")
    parser.add_argument(
        "-F", dest="foreground", action="store_true", help="foreground mode (default: daemonize)"
    )
    parser.add_argument(
        "-p",
        dest="pid_file",
        default=DEFAULT_PID_FILE,
        metavar="PID_FILE",
        help=f"path to the PID file (daemon mode only; default {DEFAULT_PID_FILE})",
    )
    parser.add_argument(
        "-S",
        dest="socket_path",
        default=DEFAULT_SOCKET,
        metavar="SOCKET",
        help=f"unix socket to listen on (default {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "-M",
        dest="shm",
        type=partial(ShmSource, True),
        default=ShmSource(True, DEFAULT_SHM_NAME),
        metavar="NAME",
        help=f"POSIX shared memory object to use (default {DEFAULT_SHM_NAME})",
    )
    parser.add_argument(
        "-m",
        dest="shm",
        type=partial(ShmSource, False),
        metavar="DIR",
        help="where to create shared memory (an unlinked file in DIR)",
    )
    parser.add_argument(
        "-l",
        dest="size",
        default=DEFAULT_SIZE,
        metavar="SIZE",
        help=f"size of shared memory; suffixes K, M and G (1K = 1024); default {DEFAULT_SIZE}",
    )
    parser.add_argument(
        "-n",
        dest="vectors",
        default=DEFAULT_VECTORS,
        metavar="VECTORS",
        help=f"number of vectors (default {DEFAULT_VECTORS})",
    )
    parser.add_argument(
        "--hub-socket",
        metavar="PATH",
        help="also serve msixhub's protocol here: ivshmem devices join, status works",
    )


def run(args: argparse.Namespace) -> int:
    try:
        size = shm_size(parse_size(args.size))
        vectors = parse_uint(args.vectors, "vectors")
        if vectors > MAX_VECTORS:
            raise UsageError(f"too many requested vectors (max is {MAX_VECTORS})")
        if vectors == 0:
            raise UsageError("at least one vector is needed")
        if args.verbose and not args.foreground:
            raise UsageError("cannot use verbose in daemon mode")
        shm_name = posix_shm_name(args.shm.path) if args.shm.posix else None
    except (UsageError, SizeError) as exc:
        print(f"ivshmem-server: {exc}", file=sys.stderr)
        print("Try 'msixhub ivshmem-server -h' for more information.", file=sys.stderr)
        return 1
    _configure_logging(args.verbose)
    _raise_fd_limit()
    return _start(args, size, vectors, shm_name)


def parse_uint(text: str, what: str) -> int:
    """An unsigned integer as QEMU's option parser reads it: decimal, 0x hex or 0 octal."""
    match = re.fullmatch(
        r"\s*(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<oct>0[0-7]*)|(?P<dec>[1-9][0-9]*))", text
    )
    if match is None:
        raise UsageError(f"cannot parse {what}: {text!r}")
    if match["hex"]:
        return int(match["hex"], 16)
    if match["oct"]:
        return int(match["oct"], 8)
    return int(match["dec"])


def posix_shm_name(name: str) -> str:
    """The file name in /dev/shm that ``shm_open(name)`` opens (glibc drops leading slashes
    and refuses any other)."""
    stripped = name.lstrip("/")
    if not stripped or "/" in stripped or stripped in (".", "..") or len(stripped) > 255:
        raise UsageError(f"invalid POSIX shared memory name {name!r}")
    return stripped


def _start(args: argparse.Namespace, size: int, vectors: int, shm_name: str | None) -> int:
    import trio
    from msixhub.devices.ivshmem.qemu_server import bind_unix_listener

    try:
        shm, name = _open_shm(args.shm.path, shm_name, size)
    except OSError as exc:
        print(
            f"ivshmem-server: cannot open shm file {args.shm.path}: {exc.strerror}", file=sys.stderr
        )
        return 1
    sockets: list[socket.socket] = []
    try:
        check_domain_params(name, os.fstat(shm.fileno()).st_size, vectors)
        for path, bind in ((args.socket_path, bind_unix_listener), (args.hub_socket, _bind_hub)):
            if path is None:
                continue
            try:
                sockets.append(bind(path))
            except OSError as exc:
                raise UsageError(f"cannot bind {path}: {exc.strerror}") from None
    except (UsageError, DomainConfigError) as exc:
        shm.close()
        for sock in sockets:  # bound before the one that failed: ours to remove
            _unlink_socket(sock)
        print(f"ivshmem-server: {exc}", file=sys.stderr)
        return 1
    listener, hub_listener = sockets[0], sockets[1] if len(sockets) == 2 else None
    if not args.foreground:
        status = _daemonize(args.pid_file)
        if status is not None:  # the parent: the daemon has its own copies
            for sock in sockets:
                sock.close()
            shm.close()
            return status
    trio.run(_serve_until_signal, listener, hub_listener, shm, name, vectors)
    return 0


def _bind_hub(path: str) -> socket.socket:
    """The msixhub socket, mode 0600 from the start (as ``msixhub serve`` makes its own)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def _open_shm(path: str, shm_name: str | None, size: int) -> tuple[OwnedFd, str]:
    if shm_name is not None:
        fd = os.open(
            os.path.join(POSIX_SHM_DIR, shm_name),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o700,
        )
        owned, name = OwnedFd(fd, shm_name), shm_name
    else:
        fd, file_path = tempfile.mkstemp(prefix="ivshmem.", dir=path)
        owned, name = OwnedFd(fd, file_path), os.path.basename(file_path)
        os.unlink(file_path)
    try:
        _truncate(owned.fileno(), size)
    except BaseException:
        owned.close()
        raise
    return owned, name


def _truncate(fd: int, size: int) -> None:
    """Give the region ``size`` bytes, or the next power of two that the file system takes
    (a hugetlbfs file only takes multiples of its page size), up to the maximum."""
    if os.fstat(fd).st_size == size:
        return
    while True:
        try:
            os.ftruncate(fd, size)
            return
        except OSError:
            if size * 2 > MAX_SHM_SIZE:
                raise
            size *= 2


def _daemonize(pid_file: str) -> int | None:
    """Detach like daemon(3) without chdir or closing stdio. In the parent, return the exit
    status once the daemon has written its pid file (or failed to); in the daemon, None."""
    ready_read, ready_write = os.pipe()
    if os.fork():
        os.close(ready_write)
        with os.fdopen(ready_read, "rb") as ready:
            report = ready.read().decode()
        if report == "ok":
            return 0
        print(f"ivshmem-server: {report or 'daemon died while starting'}", file=sys.stderr)
        return 1
    os.close(ready_read)
    os.setsid()
    try:
        with open(pid_file, "w") as out:
            out.write(f"{os.getpid()}\n")
    except OSError as exc:
        os.write(ready_write, f"cannot write pid file: {exc}".encode())
        os._exit(1)
    os.write(ready_write, b"ok")
    os.close(ready_write)
    return None


async def _serve_until_signal(
    listener: socket.socket,
    hub_listener: socket.socket | None,
    shm: OwnedFd,
    name: str,
    vectors: int,
) -> None:
    """Run a hub whose domain ``name`` is served on ``listener`` (QEMU's protocol) and, if
    given, ``hub_listener`` (msixhub's), until SIGTERM or SIGINT."""
    import trio
    from msixhub.server.hub import Hub
    from msixhub.server.routes import RouteTable
    from msixhub.server.serve import HubServer

    size = os.fstat(shm.fileno()).st_size
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            hub = Hub(RouteTable(), nursery)
            try:
                await nursery.start(
                    partial(hub.ivshmem.serve_qemu, listener, name, size, vectors, shm=shm)
                )
                if hub_listener is not None:
                    accept = HubServer(hub).accept_loop
                    nursery.start_soon(
                        accept, trio.socket.from_stdlib_socket(hub_listener), nursery
                    )
                async for signum in signals:
                    logging.getLogger("msixhub.ivshmem").info(
                        "%s: shutting down", signal.Signals(signum).name
                    )
                    break
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await hub.aclose()
                if hub_listener is not None:
                    _unlink_socket(hub_listener)


def _unlink_socket(sock: socket.socket) -> None:
    path = sock.getsockname()
    sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _configure_logging(verbose: bool) -> None:
    logger = logging.getLogger("msixhub")
    handler = logging.StreamHandler(sys.stdout if verbose else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _raise_fd_limit() -> None:
    """Each peer costs the server one socket and one eventfd per vector: allow what the
    hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        # An unlimited hard limit cannot be a soft one: then keep what we have.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
