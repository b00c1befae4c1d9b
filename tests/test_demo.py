"""The README's main job, run as a user would: ``msixhub demo --json`` passes every check."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_passes_every_check_and_leaves_nothing_behind() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "msixhub.client.cli", "demo", "--json", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["seconds"] < 30
    names = {check["name"] for check in report["checks"]}
    assert "SIGKILL mid-I/O: every request completed exactly once" in names
    assert "nothing left behind" in names
