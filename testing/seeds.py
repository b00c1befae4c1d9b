"""Seeds that make faults reproducible: one seed per run, one derived seed per test.

A run's seed comes from ``--msixhub-seed`` or ``$MSIXHUB_SEED`` (else it is drawn at random
and printed with any failure); each test's seed hashes the run's seed with the test's id, so
rerunning one test alone with the run's seed reproduces exactly what it did in the run.
"""

from __future__ import annotations

import hashlib
import os
import random

SEED_ENV = "MSIXHUB_SEED"


def run_seed(option: int | None = None) -> int:
    """The run's seed: ``option`` if given, else the environment's, else a random one."""
    if option is not None:
        return option
    if os.environ.get(SEED_ENV):
        return int(os.environ[SEED_ENV])
    return random.randrange(1 << 32)


def derive_seed(seed: int, name: str) -> int:
    """The seed of one test (or campaign step) ``name`` in a run seeded with ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")
