"""The hub's socket is private (mode 0600) and a SIGTERM ends the hub cleanly: exit status 0,
socket file gone, with a device daemon and a VMM still connected (the daemon then exits too).
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import trio
from msixhub.testing.system import running_system

EXIT_TIMEOUT = 10.0


async def test_socket_is_private_and_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    async with running_system(tmp_path) as system:
        await system.testdev.setup(range(1))
        socket = Path(system.hub.socket)
        mode = socket.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600

        system.hub.send_signal(signal.SIGTERM)
        with trio.fail_after(EXIT_TIMEOUT):
            assert await system.hub.wait() == 0, system.hub.log_tail()
        assert not socket.exists()
        await system.hub.wait_for_line("SIGTERM: shutting down")

        assert system.daemon is not None
        with trio.fail_after(EXIT_TIMEOUT):  # its hub is gone: the daemon returns, exit 0
            assert await system.daemon.wait() == 0
        with trio.fail_after(EXIT_TIMEOUT):
            await system.vm.peer.closed.wait()


async def test_sigterm_stops_the_daemons_the_hub_spawned(tmp_path: Path) -> None:
    async with running_system(tmp_path, supervised=True) as system:
        pid = (await system.status.device("dev0"))["pid"]
        assert Path(f"/proc/{pid}").exists()

        system.hub.send_signal(signal.SIGTERM)
        with trio.fail_after(EXIT_TIMEOUT):
            assert await system.hub.wait() == 0, system.hub.log_tail()
        assert not Path(system.hub.socket).exists()
        assert not Path(f"/proc/{pid}").exists()  # stopped and reaped by the hub


async def test_the_socket_goes_first_while_a_stuck_daemon_holds_up_the_exit(
    tmp_path: Path,
) -> None:
    """A spawned daemon that cannot take SIGTERM (stopped) keeps the hub for its grace
    period; the socket file is gone before that, so a hub killed meanwhile leaves none."""
    async with running_system(tmp_path, supervised=True) as system:
        pid = (await system.status.device("dev0"))["pid"]
        os.kill(pid, signal.SIGSTOP)
        socket = Path(system.hub.socket)

        system.hub.send_signal(signal.SIGTERM)
        with trio.fail_after(EXIT_TIMEOUT):
            await system.hub.wait_for_line("stopped listening on")
        assert not socket.exists()
        assert system.hub.process is not None and system.hub.process.returncode is None
        with trio.fail_after(EXIT_TIMEOUT):  # the grace runs out, the daemon is killed
            assert await system.hub.wait() == 0, system.hub.log_tail()
        assert not Path(f"/proc/{pid}").exists()
