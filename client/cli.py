"""The ``msixhub`` console script: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``configure(parser)`` and
``run(args) -> int``. Those modules keep their top-level imports light (trio and
the rest are imported inside ``run``) so that ``msixhub --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

# (name, module, one-line help)
SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("demo", "msixhub.client.demo", "run the whole system once, checking itself (start here)"),
    ("serve", "msixhub.server.serve", "run the hub in the foreground"),
    ("spawn", "msixhub.devices.spawn", "run one device daemon in the foreground"),
    ("status", "msixhub.server.status", "show a running hub's devices and vectors"),
    ("client", "msixhub.client.poke", "attach a device and poke it by hand (registers, MSI-X)"),
    ("bench", "msixhub.bench.cli", "run a benchmark (ours against a bare baseline)"),
    ("chaos", "msixhub.testing.chaos", "run the workloads under random faults, check invariants"),
    (
        "ivshmem-server",
        "msixhub.devices.ivshmem.server_cli",
        "serve QEMU's ivshmem protocol (drop-in for QEMU's contrib ivshmem-server)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msixhub",
        description="A device server whose hub owns every device's MSI-X state.",
    )
    parser.add_argument(
        "--version", action="version", version=f"msixhub {importlib.metadata.version('msixhub')}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        _configure(sub_parser, module)
    return parser


def _configure(parser: argparse.ArgumentParser, module: str) -> None:
    importlib.import_module(module).configure(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
