"""``msixhub status``: what the hub holds, per device and per vector, as a table or JSON."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from msixhub.server.hub import Hub

DEFAULT_SOCKET = "/tmp/msixhub.sock"


def build_report(hub: Hub) -> dict[str, Any]:
    """A msgpack/JSON-friendly snapshot of the hub's state."""
    devices = []
    for device in hub.devices.values():
        vectors = []
        for vector in range(device.msix.num_vectors):
            stats = device.msix.vector_stats(vector)
            row = asdict(stats)
            row["hub_reading"] = device.channels.is_reading(vector)
            if stats.used or stats.pending or stats.delivered or stats.dropped or stats.coalesced:
                vectors.append(row)
        devices.append(
            {
                "id": device.id,
                "kind": device.info.kind,
                "up": device.peer is not None,
                "pid": device.pid,
                "registrations": device.registrations,
                "vmm": device.vmm.name if device.vmm else None,
                "num_vectors": device.msix.num_vectors,
                "msix_control": device.msix.control,
                "intx": device.intx_level,
                "vectors": vectors,
            }
        )
    return {
        "routes": asdict(hub.routes.stats()),
        "vmms": [vmm.name for vmm in hub.vmms.values()],
        "devices": devices,
    }


def render(report: dict[str, Any]) -> str:
    routes = report["routes"]
    lines = [
        f"routes: policy {routes['policy']}, {routes['in_use']}/{routes['budget']} in use "
        f"(high water {routes['high_water']}, {routes['alloc_failures']} failures, "
        f"{routes['evictions']} evictions, {routes['direct_deliveries']} direct)",
        f"VMMs: {', '.join(report['vmms']) or '-'}",
    ]
    for device in report["devices"]:
        state = f"up pid {device['pid']}" if device["up"] else "DOWN"
        control = device["msix_control"]
        lines.append(
            f"\n{device['id']} ({device['kind']}): {state}, VMM {device['vmm'] or '-'}, "
            f"{device['num_vectors']} vectors, MSI-X {'on' if control & 0x8000 else 'off'}"
            f"{', function masked' if control & 0x4000 else ''}, INTx {int(device['intx'])}"
        )
        header = (
            "vector",
            "used",
            "masked",
            "pending",
            "route",
            "delivered",
            "coalesced",
            "dropped",
        )
        rows = [header] + [
            tuple(
                str("-" if v[key] is None else int(v[key]) if isinstance(v[key], bool) else v[key])
                for key in header
            )
            for v in device["vectors"]
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines.extend(
            "  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
        )
    for domain in report.get("ivshmem", []):
        peers = ", ".join(
            f"{p['peer_id']} ({p['device'] or 'QEMU protocol'})" for p in domain["peers"]
        )
        lines.append(
            f"\nivshmem {domain['name']}: {domain['size']} bytes, {domain['vectors']} vectors, "
            f"{domain['joins']} joins, {domain['leaves']} leaves; peers: {peers or '-'}"
        )
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="the hub's unix socket")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import trio
    from msixhub.client.admin import fetch_status

    report = trio.run(fetch_status, args.socket)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
