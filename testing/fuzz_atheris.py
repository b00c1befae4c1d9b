"""A coverage-guided (atheris/libFuzzer) target for the hub's message handling, for long runs
past what Hypothesis's generators reach. Atheris is optional, not a dependency::

    pip install atheris
    python -m msixhub.testing.fuzz_atheris -max_total_time=600 [CORPUS_DIR]

Each input becomes a ``Case`` (role, setup, route policy, up to eight sends with fds
attached): in framed mode each send is a frame whose header matches its body, so libFuzzer
only has to find the msgpack inside; in raw mode the bytes go as they are. The case is
played against a fresh in-process hub with the checks of ``msixhub.testing.fuzz``
(``check_in_process``): a failure raises, and libFuzzer saves the input that caused it.
"""

from __future__ import annotations

import logging
import sys

import atheris

with atheris.instrument_imports(include=["msixhub"]):
    from msixhub.protocol.frame import HEADER, MAGIC
    from msixhub.testing.fuzz import FD_KINDS, MAX_SENDS, Case, Role, Send, check_in_process

MAX_BODY = 512


def case_from_bytes(data: bytes) -> Case:
    provider = atheris.FuzzedDataProvider(data)
    role: Role = "device" if provider.ConsumeBool() else "vmm"
    setup = provider.ConsumeBool()
    policy = provider.PickValueInList(["static", "lazy", "direct"])
    budget = provider.PickValueInList([2, 4096])
    framed = provider.ConsumeBool()
    sends = []
    for _ in range(provider.ConsumeIntInRange(1, MAX_SENDS)):
        fds = tuple(
            provider.PickValueInList(list(FD_KINDS))
            for _ in range(provider.ConsumeIntInRange(0, 3))
        )
        payload = provider.ConsumeBytes(provider.ConsumeIntInRange(0, MAX_BODY))
        if framed:
            declared = len(fds) if provider.ConsumeBool() else provider.ConsumeIntInRange(0, 4)
            payload = HEADER.pack(MAGIC, 0, declared, len(payload)) + payload
        sends.append(Send(payload, fds))
    return Case(role, setup, policy, budget, framed, tuple(sends))


def test_one_input(data: bytes) -> None:
    check_in_process(case_from_bytes(data))


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
