"""``msixhub serve``: the hub process. Foreground, logs to stderr, clean shutdown on
SIGINT/SIGTERM (every fd closed, the socket file removed).

The unix socket is created mode 0600 and each peer's uid (SO_PEERCRED) must be the hub's
own unless the config says ``allow_other_users = true``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import trio
from msixhub.protocol.errors import ConnectionClosed, ProtocolError
from msixhub.protocol.peer import Peer, handshake
from msixhub.protocol.transport import Transport
from msixhub.server.hub import Hub
from msixhub.server.ivshmem import QemuSocket, QemuSocketError, serve_qemu_socket
from msixhub.server.routes import RoutePolicy, RouteTable
from msixhub.server.status import DEFAULT_SOCKET
from msixhub.server.supervisor import DeviceSpec, Supervisor

log = logging.getLogger("msixhub.serve")

ACCEPT_RETRY = 0.1  # seconds between accept attempts while out of fds or memory
_ACCEPT_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ConfigError(ValueError):
    """The hub config file is wrong; the message says where."""


@dataclass(slots=True)
class HubConfig:
    socket: str = DEFAULT_SOCKET
    tcp: tuple[str, int] | None = None
    route_policy: RoutePolicy = RoutePolicy.STATIC
    route_budget: int = 4096
    allow_other_users: bool = False
    devices: list[DeviceSpec] = field(default_factory=list)
    ivshmem: QemuSocket | None = None  # QEMU's ivshmem protocol on a socket of its own


def load_config(path: str | None, args: argparse.Namespace | None = None) -> HubConfig:
    """The config file (if any), overridden by command-line options that were given."""
    config = HubConfig()
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        hub = data.get("hub", {})
        unknown = set(hub) - {"socket", "tcp", "route_policy", "route_budget", "allow_other_users"}
        if unknown:
            raise ConfigError(f"{path}: unknown [hub] keys {sorted(unknown)}")
        config.socket = str(hub.get("socket", config.socket))
        if "tcp" in hub:
            config.tcp = parse_host_port(str(hub["tcp"]))
        config.route_policy = _policy(hub.get("route_policy", config.route_policy))
        config.route_budget = _budget(hub.get("route_budget", config.route_budget))
        config.allow_other_users = bool(hub.get("allow_other_users", False))
        for index, entry in enumerate(data.get("device", [])):
            try:
                config.devices.append(
                    DeviceSpec(
                        str(entry["kind"]),
                        str(entry["id"]),
                        tuple(str(a) for a in entry.get("args", [])),
                    )
                )
            except (KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path}: [[device]] #{index + 1} needs kind and id ({exc})"
                ) from None
    if args is not None:
        if args.socket:
            config.socket = args.socket
        if args.tcp:
            config.tcp = parse_host_port(args.tcp)
        if args.route_policy:
            config.route_policy = _policy(args.route_policy)
        if args.route_budget is not None:
            config.route_budget = _budget(args.route_budget)
        if args.ivshmem_socket:
            try:
                config.ivshmem = QemuSocket.parse(
                    args.ivshmem_socket, args.ivshmem_name, args.ivshmem_size, args.ivshmem_vectors
                )
            except QemuSocketError as exc:
                raise ConfigError(f"--ivshmem-*: {exc}") from None
    return config


def _policy(value: object) -> RoutePolicy:
    try:
        return RoutePolicy(str(value))
    except ValueError:
        raise ConfigError(
            f"route policy must be one of {[p.value for p in RoutePolicy]}, not {value!r}"
        ) from None


def _budget(value: object) -> int:
    if not isinstance(value, int) or not 1 <= value <= 1 << 20:
        raise ConfigError(f"route budget must be an integer in 1..{1 << 20}, not {value!r}")
    return value


def parse_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def bind_unix(path: str) -> trio.socket.SocketType:
    """A listening unix socket at ``path``, mode 0600 from the start (no window where others can connect)."""
    with contextlib.suppress(FileNotFoundError):
        if Path(path).is_socket():
            os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


class HubServer:
    """Accepts connections for one Hub on a unix socket (and optionally TCP)."""

    def __init__(self, hub: Hub, *, allow_other_users: bool = False) -> None:
        self.hub = hub
        self.allow_other_users = allow_other_users
        self.connections = 0
        self.tcp_addresses: list[tuple[str, int]] = []  # where TCP listens (port 0: the one taken)

    async def accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_SHORTAGES:
                    raise
                # The connection stays queued: one shortage must not take down the hub and
                # every device on it. Try again once others may have released something.
                log.warning("cannot accept a connection (%s); retrying", exc)
                await trio.sleep(ACCEPT_RETRY)
                continue
            if sock.family == socket.AF_INET or sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(self.serve_connection, Transport(sock))

    async def serve_connection(self, transport: Transport) -> None:
        self.connections += 1
        try:
            credentials = transport.peer_credentials()
            if credentials and not self.allow_other_users and credentials[1] != os.getuid():
                log.warning("refused pid %d: uid %d is not ours", credentials[0], credentials[1])
                return
            try:
                connection = await handshake(transport, "admin", name="hub")
            except (ProtocolError, ConnectionClosed, trio.TooSlowError) as exc:
                log.warning("handshake failed: %s", exc)
                return
            await self.hub.serve_peer(Peer(transport, connection))
        finally:
            await transport.aclose()


async def run_hub(
    config: HubConfig, *, task_status: trio.TaskStatus[HubServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; then close every fd and remove the socket file."""
    listener = await bind_unix(config.socket)
    listeners = [listener]
    tcp_listeners: list[trio.socket.SocketType] = []
    try:
        if config.tcp:
            tcp_listeners = [
                listener.socket
                for listener in await trio.open_tcp_listeners(config.tcp[1], host=config.tcp[0])
            ]
            listeners += tcp_listeners
        async with trio.open_nursery() as nursery:
            hub = Hub(RouteTable(config.route_policy, config.route_budget), nursery)
            server = HubServer(hub, allow_other_users=config.allow_other_users)
            server.tcp_addresses = [tcp.getsockname()[:2] for tcp in tcp_listeners]
            try:
                nursery.start_soon(server.accept_loop, listener, nursery)
                for tcp in tcp_listeners:
                    nursery.start_soon(server.accept_loop, tcp, nursery)
                supervisor = Supervisor(config.socket)
                hub.on_registered = supervisor.registered
                for spec in config.devices:
                    nursery.start_soon(supervisor.supervise, spec)
                if config.ivshmem:
                    await nursery.start(serve_qemu_socket, hub, config.ivshmem)
                log.info(
                    "hub listening on %s (policy %s, budget %d)",
                    config.socket,
                    config.route_policy,
                    config.route_budget,
                )
                task_status.started(server)
                await trio.sleep_forever()
            finally:
                nursery.cancel_scope.cancel()
                # First, before the daemons are stopped (seconds, for one that ignores
                # SIGTERM): no peer joins a hub that is going, and a hub killed meanwhile
                # leaves no socket behind.
                _stop_listening(config.socket, listeners)
                with trio.CancelScope(shield=True):
                    await hub.aclose()
    finally:
        _stop_listening(config.socket, listeners)


def _stop_listening(path: str, listeners: list[trio.socket.SocketType]) -> None:
    """Close the listeners and remove the socket file, once: the list is emptied, so a
    second call cannot remove a socket another hub has bound at the same path since."""
    if not listeners:
        return
    for listener in listeners:
        listener.close()
    listeners.clear()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.info("stopped listening on %s", path)


async def _serve_until_signal(config: HubConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_hub, config)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", help=f"unix socket path (default {DEFAULT_SOCKET})")
    parser.add_argument(
        "--tcp", metavar="HOST:PORT", help="also listen on TCP (no fd passing there)"
    )
    parser.add_argument(
        "--route-policy", choices=[p.value for p in RoutePolicy], help="default static"
    )
    parser.add_argument(
        "--route-budget", type=int, help="routes shared by all devices (default 4096)"
    )
    parser.add_argument(
        "--config", help="TOML file: [hub] settings and [[device]] daemons to spawn"
    )
    ivshmem = parser.add_argument_group(
        "QEMU's ivshmem protocol (an unmodified QEMU joins as a peer)"
    )
    ivshmem.add_argument("--ivshmem-socket", metavar="PATH", help="serve it on this unix socket")
    ivshmem.add_argument("--ivshmem-name", default="ivshmem", help="its domain (default ivshmem)")
    ivshmem.add_argument("--ivshmem-size", default="4M", help="region size (default 4M)")
    ivshmem.add_argument("--ivshmem-vectors", type=int, default=1, help="vectors (default 1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = load_config(args.config, args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    trio.run(_serve_until_signal, config)
    return 0
