"""The chaos campaign: its pure parts (the fault schedule, the notification balance, the hub
config it writes), and a short run as a user would start it, every invariant holding."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from msixhub.server.serve import load_config
from msixhub.testing.chaos import (
    DAEMONS,
    KILL_GAP,
    OTHER_GAP,
    Fault,
    FaultSchedule,
    VectorBalance,
    hub_config,
    percent_change,
    vector_balance,
)


def simulate(seed: int, seconds: float, fault_takes: float = 0.0) -> list[tuple[float, Fault]]:
    """The schedule's faults over ``seconds``, each fault taking ``fault_takes`` to apply."""
    schedule = FaultSchedule(random.Random(seed), 0.0)
    now, faults = 0.0, []
    while True:
        at, fault = schedule.next(now)
        if at >= seconds:
            return faults
        faults.append((at, fault))
        now = at + fault_takes


@pytest.mark.parametrize("fault_takes", [0.0, 0.5, 1.9])
def test_kill_k_comes_within_k_times_3_seconds_whatever_the_faults_take(
    fault_takes: float,
) -> None:
    faults = simulate(seed=1, seconds=600, fault_takes=fault_takes)
    kills = [at for at, fault in faults if fault is Fault.KILL]
    # Kill k is due within k gaps of the start; a fault in progress (shorter than a gap)
    # delays it by at most its own length, and later kills catch up: the rate holds.
    for k, at in enumerate(kills, start=1):
        assert KILL_GAP[0] * k - 1e-9 <= at <= KILL_GAP[1] * k + fault_takes + 1e-9
    assert len(kills) >= (600 - fault_takes) / KILL_GAP[1] - 1
    others = {fault for _, fault in faults} - {Fault.KILL}
    assert others == {Fault.STOP, Fault.MASK_STORM}


def test_the_schedule_is_the_seeds() -> None:
    assert simulate(seed=7, seconds=60) == simulate(seed=7, seconds=60)
    assert simulate(seed=7, seconds=60) != simulate(seed=8, seconds=60)


def test_impossible_gaps_are_refused() -> None:
    with pytest.raises(ValueError, match="bad fault gaps"):
        FaultSchedule(random.Random(0), 0.0, kill_gap=(0.0, 1.0))
    with pytest.raises(ValueError, match="bad fault gaps"):
        FaultSchedule(random.Random(0), 0.0, other_gap=(2.0, 1.0))
    assert OTHER_GAP[1] < KILL_GAP[0]  # other faults fit between two kills


def test_a_balanced_vector_loses_nothing() -> None:
    row = {"coalesced": 30, "pending": True, "cleared": 2, "dropped": 0, "intx": 0}
    balance = vector_balance(3, sent=100, received=67, row=row)
    assert balance == VectorBalance(3, 100, 67, 30, 1, 2, 0, 0)
    assert (balance.accounted, balance.lost) == (100, 0)


def test_missing_notifications_are_lost_and_extra_ones_duplicated() -> None:
    assert vector_balance(0, sent=10, received=7, row={"coalesced": 2}).lost == 1
    assert vector_balance(0, sent=10, received=9, row={"coalesced": 2}).lost == -1
    # A vector the hub never saw (no status row) counts as all zeros.
    assert vector_balance(1, sent=5, received=5, row={}).lost == 0


def test_percent_change() -> None:
    assert percent_change(200, 210) == 5.0
    assert percent_change(200, 190) == -5.0
    assert percent_change(0, 5) == 0.0


def test_the_hub_config_spawns_the_four_daemons(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(hub_config(tmp_path / "hub sock", tmp_path / "disk.img"))
    loaded = load_config(str(config))
    assert loaded.socket == str(tmp_path / "hub sock")
    assert loaded.route_policy.value == "static"
    assert tuple(spec.id for spec in loaded.devices) == DAEMONS
    blk = loaded.devices[0]
    assert (blk.kind, blk.args) == ("virtio-blk", ("--image", str(tmp_path / "disk.img")))


def test_a_short_chaos_run_holds_every_invariant() -> None:
    command = ["chaos", "--seconds", "5", "--seed", "1", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "msixhub.client.cli", *command],
        capture_output=True,
        text=True,
        timeout=90,
    )
    report = json.loads(result.stdout)  # --json: exactly one object on stdout
    failed = [check for check in report["checks"] if not check["passed"]]
    assert result.returncode == 0 and report["passed"] and not failed, (failed, result.stderr)
    assert report["seed"] == 1 and report["command"] == "msixhub chaos --seconds 5 --seed 1"
    assert report["faults"]["kills_total"] >= 1
    assert report["restarts"] == {d: report["faults"]["kills"].get(d, 0) for d in DAEMONS}
    notifications, requests = report["notifications"], report["requests"]
    assert notifications["sent"] > 0 and notifications["lost"] == 0
    assert notifications["pending"] == 0
    assert requests["completed"] == requests["submitted"] > 0
    assert requests["lost"] == requests["duplicated"] == requests["failed"] == 0
    assert report["hub"]["restarts"] == 0
    assert report["hub"]["fds_end"] <= report["hub"]["fds_start"]
    assert report["elapsed"] < 30
