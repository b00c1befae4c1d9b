"""``msixhub client``: attach one device and poke it by hand, for people debugging a device.

    msixhub client [--socket S] DEVICE STEP [ARGS] [STEP [ARGS] ...]

The steps run in order on one attachment: the command attaches DEVICE, runs them, and
detaches. Attaching is per connection, and detaching function-masks the device (the hub
keeps its MSI-X state; notifications become pending bits, delivered once to whoever
unmasks next). So a ``wait`` belongs in the same invocation as the steps that program and
enable the vectors it waits for. With testdev (BAR0: 0x10 USE vector, 0x00 NOTIFY
vector | count << 16)::

    msixhub client dev0 write 0 0x10 0 msix 0 0xfee00000 0x41 enable write 0 0 0x10000 wait 1

Numbers are decimal or 0x-hex. Exit status: 0, 1 when the hub or device refused a step or
a wait timed out, 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from msixhub.server.status import DEFAULT_SOCKET

if TYPE_CHECKING:
    from msixhub.client.vmm import AttachedDevice, VmmClient


class StepError(ValueError):
    """A step on the command line is unknown or has the wrong arguments."""


@dataclass(frozen=True, slots=True)
class StepSpec:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    help: str


STEPS: dict[str, StepSpec] = {
    "info": StepSpec((), (), "print the device's vectors, queues, BARs and MSI-X layout"),
    "read": StepSpec(("BAR", "OFFSET"), ("SIZE",), "print a register (SIZE 1/2/4/8, default 4)"),
    "write": StepSpec(("BAR", "OFFSET", "VALUE"), ("SIZE",), "write a register"),
    "msix": StepSpec(
        ("VECTOR", "ADDRESS", "DATA"), (), "program VECTOR's table entry and unmask it"
    ),
    "mask": StepSpec(("VECTOR",), (), "set VECTOR's mask bit"),
    "unmask": StepSpec(("VECTOR",), (), "clear VECTOR's mask bit"),
    "pba": StepSpec(("VECTOR",), (), "print VECTOR's pending bit"),
    "enable": StepSpec((), (), "Message Control: MSI-X on, function mask off"),
    "disable": StepSpec((), (), "Message Control: MSI-X off (a device with INTx uses it)"),
    "control": StepSpec(("VALUE",), (), "write Message Control as given"),
    "kick": StepSpec(("QUEUE",), (), "notify QUEUE (write its kick eventfd)"),
    "wait": StepSpec((), ("COUNT",), "print events until COUNT interrupts came (default 1)"),
}
ACCESS_SIZES = (1, 2, 4, 8)
MSIX_ENABLE = 0x8000


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    args: tuple[int, ...]


def parse_steps(tokens: Sequence[str]) -> list[Step]:
    """Split the command line after DEVICE into steps; a step's optional argument is
    present when the next token is a number rather than a step name."""
    steps: list[Step] = []
    index = 0
    while index < len(tokens):
        name = tokens[index]
        spec = STEPS.get(name)
        if spec is None:
            raise StepError(f"unknown step {name!r} (steps: {', '.join(STEPS)})")
        index += 1
        args: list[int] = []
        for position, label in enumerate(spec.required + spec.optional):
            if index >= len(tokens) or tokens[index] in STEPS:
                if position < len(spec.required):
                    raise StepError(f"{name} needs {' '.join(spec.required)}; {label} is missing")
                break
            args.append(_number(name, label, tokens[index]))
            index += 1
        steps.append(_checked(Step(name, tuple(args))))
    if not steps:
        raise StepError("no steps given (try: info)")
    return steps


def _number(step: str, label: str, token: str) -> int:
    try:
        value = int(token, 0)
    except ValueError:
        raise StepError(f"{step} {label}: {token!r} is not a number") from None
    if value < 0:
        raise StepError(f"{step} {label}: {token!r} is negative")
    return value


def _checked(step: Step) -> Step:
    name, args = step.name, step.args
    if name in ("read", "write"):
        size_at = 2 if name == "read" else 3
        size = args[size_at] if len(args) > size_at else 4
        if size not in ACCESS_SIZES:
            raise StepError(f"{name} SIZE must be one of {ACCESS_SIZES}, not {size}")
        if name == "write" and args[2] >= 1 << (8 * size):
            raise StepError(f"write VALUE {args[2]:#x} does not fit {size} bytes")
    elif name == "msix" and (args[1] >= 1 << 64 or args[2] >= 1 << 32):
        raise StepError("msix ADDRESS must fit 64 bits and DATA 32 bits")
    elif name == "control" and args[0] > 0xFFFF:
        raise StepError("control VALUE must fit 16 bits")
    return step


# --- running the steps ------------------------------------------------------------------------


Print = Callable[[str], None]


async def run_steps(
    socket_path: str,
    device_id: str,
    steps: Sequence[Step],
    *,
    timeout: float = 5.0,
    memory: int = 0,
    out: Print = print,
) -> None:
    """Attach ``device_id``, run ``steps`` in order, detach. Hub refusals raise RemoteError,
    a wait that runs out of time trio.TooSlowError."""
    from msixhub.client.vmm import connect

    async with connect(socket_path, name=f"msixhub-client-{os.getpid()}") as vm:
        if memory:
            await vm.add_memory(memory)
        device = await vm.attach(device_id)
        for step in steps:
            await _run_step(vm, device, step, timeout, out)
        await vm.detach(device_id)


async def _run_step(
    vm: VmmClient, device: AttachedDevice, step: Step, timeout: float, out: Print
) -> None:
    from msixhub.client.msix_guest import pba_pending, program_vector, set_vector_mask

    name, args = step.name, step.args
    if name == "info":
        info = device.info
        bars = ", ".join(f"BAR{bar.index} {bar.size:#x}" for bar in info.bars)
        out(
            f"{info.device} ({info.kind}): {info.num_vectors} vectors, {info.num_queues} queues, "
            f"INTx {'yes' if info.intx else 'no'}; {bars}; MSI-X table BAR{info.msix.bar}"
            f"+{info.msix.table_offset:#x}, PBA BAR{info.msix.bar}+{info.msix.pba_offset:#x}"
        )
    elif name == "read":
        bar, offset, size = (*args, 4)[:3]
        value = await device.mmio_read(bar, offset, size)
        out(f"bar{bar}+{offset:#x} = {value:#x} ({value})")
    elif name == "write":
        bar, offset, value, size = (*args, 4)[:4]
        await device.mmio_write(bar, offset, size, value)
    elif name == "msix":
        await program_vector(device, args[0], args[1], args[2], masked=False)
    elif name in ("mask", "unmask"):
        await set_vector_mask(device, args[0], name == "mask")
    elif name == "pba":
        out(f"vector {args[0]} pending {int(await pba_pending(device, args[0]))}")
    elif name == "enable":
        await device.msix_control_write(MSIX_ENABLE)
    elif name == "disable":
        await device.msix_control_write(0)
    elif name == "control":
        await device.msix_control_write(args[0])
    elif name == "kick":
        if args[0] >= len(device.kicks):
            raise StepError(f"{device.id} has {len(device.kicks)} queues, no queue {args[0]}")
        device.kick(args[0])
    elif name == "wait":
        await _wait(vm, args[0] if args else 1, timeout, out)
    else:  # parse_steps lets no other name through
        raise AssertionError(name)


async def _wait(vm: VmmClient, count: int, timeout: float, out: Print) -> None:
    import trio
    from msixhub.client.vmm import DeviceEvent, Interrupt, IntxEvent

    seen = 0
    with trio.fail_after(timeout):
        while seen < count:
            event = await vm.next_event()
            if isinstance(event, Interrupt):
                seen += 1
                out(
                    f"interrupt {event.device} vector {event.vector} address {event.address:#x} "
                    f"data {event.data:#x} count {event.count}"
                )
            elif isinstance(event, IntxEvent):
                out(f"intx {event.device} {int(event.level)}")
            elif isinstance(event, DeviceEvent):
                out(f"device {event.device} {event.state}")


# --- the subcommand ---------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Attach DEVICE, run the steps in order, detach. Detaching function-masks the device\n"
        "(pending bits wait in the hub for whoever unmasks next), so program and enable\n"
        "the vectors you 'wait' for in the same invocation.\n\nsteps:\n"
        + "\n".join(
            f"  {' '.join([name, *spec.required, *(f'[{o}]' for o in spec.optional)]):32}"
            f"{spec.help}"
            for name, spec in STEPS.items()
        )
        + "\n\nexample (testdev: BAR0 register 0x10 makes it use a vector):\n"
        + "  msixhub client dev0 write 0 0x10 0 msix 0 0xfee00000 0x41 enable kick 0 wait 1"
    )
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="the hub's unix socket")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds a 'wait' step waits (default 5)"
    )
    parser.add_argument(
        "--memory", type=lambda text: int(text, 0), default=0, help="guest RAM to give (bytes)"
    )
    parser.add_argument("device", metavar="DEVICE", help="the device id")
    parser.add_argument("steps", metavar="STEP", nargs=argparse.REMAINDER, help="see above")


def run(args: argparse.Namespace) -> int:
    import trio
    from msixhub.protocol.errors import ConnectionClosed, RemoteError

    try:
        steps = parse_steps(args.steps)
    except StepError as exc:
        print(f"msixhub client: {exc}", file=sys.stderr)
        return 2

    def out(line: str) -> None:
        print(line, flush=True)

    try:
        trio.run(
            lambda: run_steps(
                args.socket, args.device, steps, timeout=args.timeout, memory=args.memory, out=out
            )
        )
    except BaseException as raised:
        failure = _unwrap(raised)
        if isinstance(failure, RemoteError | ConnectionClosed | ValueError):  # StepError too
            print(f"msixhub client: {failure}", file=sys.stderr)
            return 1
        if isinstance(failure, trio.TooSlowError):
            print(f"msixhub client: no more interrupts within {args.timeout} s", file=sys.stderr)
            return 1
        raise
    return 0


def _unwrap(exc: BaseException) -> BaseException:
    """The one failure inside the nurseries' exception groups, if there is exactly one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
