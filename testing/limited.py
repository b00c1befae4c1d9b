"""Run a command with lowered resource limits: ``python -m msixhub.testing.limited --nofile 32
-- msixhub spawn testdev ...``.

The limits are set in this process and then the command is exec'd in its place (same pid),
so the process a test signals and inspects (``/proc/<pid>/limits``) is the limited one.

``--nofile N``  RLIMIT_NOFILE: the daemon cannot hold more than N fds; fds passed to it
                beyond that are lost in transit (the kernel sets MSG_CTRUNC on ``recvmsg``).
``--fsize B``   RLIMIT_FSIZE: writes at or past byte B of any file fail with EFBIG (Python
                ignores SIGXFSZ), so an image file can be made to fail writes past an offset.

Both the soft and the hard limit are lowered: the limited program cannot undo them.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from collections.abc import Sequence

from msixhub.devices.cli_args import int_in

_LIMIT = int_in(1, (1 << 63) - 1, "limit")


def limit_prefix(*, nofile: int | None = None, fsize: int | None = None) -> list[str]:
    """What to put in front of a command to run it under these limits."""
    wrapper = [sys.executable, "-m", "msixhub.testing.limited"]
    if nofile is not None:
        wrapper += ["--nofile", str(nofile)]
    if fsize is not None:
        wrapper += ["--fsize", str(fsize)]
    return [*wrapper, "--"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msixhub.testing.limited")
    parser.add_argument("--nofile", type=_LIMIT, help="RLIMIT_NOFILE for the command")
    parser.add_argument("--fsize", type=_LIMIT, help="RLIMIT_FSIZE (bytes) for the command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    if args.fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, args.fsize))
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
