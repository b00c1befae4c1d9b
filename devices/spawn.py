"""``msixhub spawn KIND --id ID [--socket HUB] [options]``: run one device daemon in the
foreground. The hub's supervisor starts daemons this same way.

Each kind is a module exposing ``configure(parser)`` and ``async serve(args)``; a module that
serves several kinds is named ``module:variant`` and exposes ``configure_variant`` and
``serve_variant``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
from typing import Any

from msixhub.protocol.errors import MsixhubError
from msixhub.server.status import DEFAULT_SOCKET

log = logging.getLogger("msixhub.spawn")

KINDS: dict[str, str] = {
    "testdev": "msixhub.devices.testdev",
    "ivshmem": "msixhub.devices.ivshmem.daemon",
    "virtio-blk": "msixhub.devices.virtio.daemon:blk",
    "virtio-rng": "msixhub.devices.virtio.daemon:rng",
}


def _entry(kind: str, what: str) -> Any:
    """The ``configure`` or ``serve`` function of ``kind``."""
    module, _, variant = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), f"{what}_{variant}" if variant else what)


def configure(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, entry in KINDS.items():
        module = importlib.import_module(entry.partition(":")[0])
        sub = kinds.add_parser(kind, help=(module.__doc__ or "").split("\n")[0])
        sub.add_argument(
            "--id", default=kind, help="device id, stable across restarts (default: KIND)"
        )
        sub.add_argument("--socket", default=DEFAULT_SOCKET, help="the hub's unix socket")
        sub.add_argument("-v", "--verbose", action="store_true")
        _entry(kind, "configure")(sub)


def run(args: argparse.Namespace) -> int:
    import trio

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {args.id}[%(process)d] %(levelname)s %(message)s",
    )
    serve = _entry(args.kind, "serve")

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                await serve(args)
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # A daemon that gives up (say, its registration was refused) raises SystemExit with
        # its status after logging why: exit with that status, not with a traceback. One
        # that cannot reach the hub or open what it serves says so in one line.
        exits, others = group.split(SystemExit)
        if exits is not None and others is None:
            leaf = _first(exits)
            assert isinstance(leaf, SystemExit)
            return leaf.code if isinstance(leaf.code, int) else 1
        failures, others = group.split((MsixhubError, OSError))
        if failures is None or others is not None:
            raise
        failure = _first(failures)
        log.error("%s", failure, exc_info=failure if args.verbose else None)
        return 1
    return 0


def _first(group: BaseExceptionGroup) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf
