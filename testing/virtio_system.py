"""A whole virtio system for tests and benchmarks: a hub, a virtio-blk daemon on an image file
(and optionally a virtio-rng daemon) as real processes, this process as the VMM with a
pretend guest (``client/guest.py``) driving them.

    async with virtio_system(tmp_path, image_size=8 << 20) as system:
        blk = await system.guest.blk("blk0")
        await blk.write(0, b"x" * 512)

``supervised``: the hub spawns the blk daemon itself from a ``[[device]]`` entry of its config
(and restarts it when it dies); otherwise this process starts it (``device_process``) and
``system.blk_daemon`` is that process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from msixhub.client.guest import Guest
from msixhub.client.vmm import VmmClient, connect
from msixhub.testing.processes import HubProcess, ManagedProcess, device_process, hub_with_device
from msixhub.testing.system import HubStatus, hub_status

BLK, RNG = "blk0", "rng0"


@dataclass(eq=False)
class VirtioSystem:
    hub: HubProcess
    blk_daemon: ManagedProcess | None  # None when the hub spawned it (``supervised``)
    image: Path
    vm: VmmClient
    guest: Guest
    status: HubStatus

    async def blk_pid(self) -> int:
        """The pid of the running blk daemon, as the hub knows it."""
        pid = (await self.status.device(BLK))["pid"]
        assert isinstance(pid, int), f"blk daemon is not up: pid {pid!r}"
        return pid


def blk_args(image: Path, *, read_only: bool = False, queue_size: int | None = None) -> list[str]:
    args = ["--image", str(image)]
    if read_only:
        args.append("--read-only")
    if queue_size is not None:
        args += ["--queue-size", str(queue_size)]
    return args


@asynccontextmanager
async def virtio_system(
    directory: Path,
    *,
    image: Path | None = None,
    image_size: int = 8 << 20,
    read_only: bool = False,
    queue_size: int | None = None,
    rng: bool = False,
    policy: str = "static",
    budget: int = 4096,
    supervised: bool = False,
    ram: int = 64 << 20,
) -> AsyncIterator[VirtioSystem]:
    """Hub + virtio daemons (real processes) and this process as the VMM with a guest.

    ``image``: an existing image file; else a zero-filled one of ``image_size`` bytes is made
    in ``directory``."""
    if image is None:
        image = directory / "disk.img"
        with image.open("wb") as file:
            file.truncate(image_size)
    args = blk_args(image, read_only=read_only, queue_size=queue_size)
    async with AsyncExitStack() as stack:
        hub, blk_daemon = await stack.enter_async_context(
            hub_with_device(
                directory,
                "virtio-blk",
                BLK,
                args,
                supervised=supervised,
                route_policy=policy,
                route_budget=budget,
            )
        )
        if rng:
            await stack.enter_async_context(device_process(hub, "virtio-rng", RNG))
        vm = await stack.enter_async_context(connect(hub.socket, name="vm0"))
        status = await stack.enter_async_context(hub_status(hub.socket))
        guest = await stack.enter_async_context(Guest.open(vm, ram=ram))
        yield VirtioSystem(hub, blk_daemon, image, vm, guest, status)
