"""argparse types for the numbers msixhub's commands take. A bad number is a usage error that
names the range, before anything starts, not a traceback from where the number is first used
(a queue size that is not a power of two used to kill the virtio daemon at startup)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """An integer (decimal, or 0x/0o/0b) in ``low..high``."""
    return _number_in(lambda text: int(text, 0), "an integer", low, high, what)


def float_in(low: float, high: float, what: str) -> Callable[[str], float]:
    """A number in ``low..high`` (NaN is not in any range)."""
    return _number_in(float, "a number", low, high, what)


def _number_in(
    convert: Callable[[str], N], kind: str, low: N, high: N, what: str
) -> Callable[[str], N]:
    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: not {kind}: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be in {low:g}..{high:g}, not {text}")
        return value

    return parse


def power_of_two_up_to(high: int, what: str) -> Callable[[str], int]:
    """A power of two in ``1..high`` (a split virtqueue's size)."""
    in_range = int_in(1, high, what)

    def parse(text: str) -> int:
        value = in_range(text)
        if value & (value - 1):
            raise argparse.ArgumentTypeError(f"{what} must be a power of two, not {value}")
        return value

    return parse
