"""``msixhub spawn KIND --id ID [--socket HUB] [options]``: run one device daemon in the
foreground. The hub's supervisor starts daemons this same way.

Each kind is a module exposing ``configure(parser)`` and ``async serve(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal

from msixhub.server.status import DEFAULT_SOCKET

KINDS: dict[str, str] = {
    "testdev": "msixhub.devices.testdev",
}


def configure(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, module in KINDS.items():
        sub = kinds.add_parser(
            kind, help=(importlib.import_module(module).__doc__ or "").split("\n")[0]
        )
        sub.add_argument(
            "--id", default=kind, help="device id, stable across restarts (default: KIND)"
        )
        sub.add_argument("--socket", default=DEFAULT_SOCKET, help="the hub's unix socket")
        sub.add_argument("-v", "--verbose", action="store_true")
        importlib.import_module(module).configure(sub)


def run(args: argparse.Namespace) -> int:
    import trio

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {args.id}[%(process)d] %(levelname)s %(message)s",
    )
    module = importlib.import_module(KINDS[args.kind])

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                await module.serve(args)
                nursery.cancel_scope.cancel()

    trio.run(main)
    return 0
