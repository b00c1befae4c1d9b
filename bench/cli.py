"""``msixhub bench NAME [--json] [--seconds S]``; ``msixhub bench all`` runs every one."""

from __future__ import annotations

import argparse
import importlib
import json

from msixhub.bench.report import Report
from msixhub.devices.cli_args import float_in

# name -> module exposing ``measure(seconds: float) -> Report``
BENCHMARKS: dict[str, str] = {
    "blk": "msixhub.bench.blk",
    "irq": "msixhub.bench.irq",
    "ivshmem": "msixhub.bench.ivshmem",
    "msix": "msixhub.bench.msix",
    "protocol": "msixhub.bench.protocol",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark")
    parser.add_argument("--json", action="store_true", help="print one JSON object per benchmark")
    parser.add_argument(
        "--seconds",
        type=float_in(0.05, 3600, "seconds"),
        default=3.0,
        help="time budget per measured figure (default 3)",
    )


def run(args: argparse.Namespace) -> int:
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        report: Report = importlib.import_module(BENCHMARKS[name]).measure(args.seconds)
        print(json.dumps(report.to_json()) if args.json else report.render(), flush=True)
    return 0
