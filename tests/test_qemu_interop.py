"""A real QEMU ivshmem-doorbell against msixhub's ivshmem servers (``msixhub.testing.
qemu_interop``): skipped where qemu-system-x86_64 is not installed (CI has none).

By hand, with QEMU's logs kept: ``python -m msixhub.testing.qemu_interop --keep-logs``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from msixhub.devices.ivshmem.qemu_protocol import encode
from msixhub.testing.qemu_interop import (
    MODES,
    QEMU_BINARY,
    InteropError,
    InteropReport,
    QemuProcess,
    qemu_base_command,
    qemu_binary,
    run_scenario,
)
from msixhub.testing.system import EVENT_TIMEOUT

pytestmark = pytest.mark.skipif(
    qemu_binary() is None,
    reason=f"{QEMU_BINARY} is not on PATH: the interop checks need a real QEMU",
)

EXPECTED_CHECKS = 10


@pytest.mark.parametrize("mode", MODES)
async def test_qemu_interoperates_with_msixhub(tmp_path: Path, mode: str) -> None:
    binary = qemu_binary()
    assert binary is not None
    report = InteropReport()
    await run_scenario(mode, await qemu_base_command(binary), tmp_path / mode, report)
    failed = "\n".join(f"{c.name}: {c.detail}" for c in report.checks if not c.passed)
    assert report.passed, failed
    assert len(report.checks) == EXPECTED_CHECKS


async def test_a_handshake_qemu_refuses_is_reported_with_its_words(tmp_path: Path) -> None:
    """The harness is not blind: a server that speaks protocol version 1 makes QEMU fail its
    device's realize, and the join reports QEMU's own error."""
    binary = qemu_binary()
    assert binary is not None
    server = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    path = tmp_path / "bad.sock"
    await server.bind(str(path))
    server.listen(1)
    qemu = QemuProcess("qemu-bad", await qemu_base_command(binary), tmp_path, path)

    async def serve_version_1() -> None:
        connection, _ = await server.accept()
        with connection:
            await connection.send(encode(1))
            await connection.recv(1)  # until QEMU is gone

    with server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_version_1)
            try:
                with trio.fail_after(EVENT_TIMEOUT * 2), pytest.raises(InteropError) as error:
                    await qemu.start(nursery)
            finally:
                with trio.CancelScope(shield=True):
                    await qemu.close()
            nursery.cancel_scope.cancel()
    assert qemu.process is not None and qemu.process.returncode == 1
    assert "server sent version 1, expecting 0" in str(error.value)
