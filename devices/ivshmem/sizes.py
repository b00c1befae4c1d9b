"""Sizes of an ivshmem region: how users spell them and what the region really gets.

Spelling follows QEMU's size parser (``-l`` of contrib/ivshmem-server, ``size=`` of
memory backends), so a script written for QEMU's server passes the same strings:

* ``4194304`` bytes, or decimal with a one-letter suffix ``B K M G T P E`` (either case;
  binary multiples: ``1K`` is 1024); a fraction needs a suffix above bytes (``1.5M``)
  and is rounded to the nearest byte;
* ``0x400000`` hexadecimal, bytes only (no suffix, no fraction);
* no sign, no octal, no exponent, nothing after the suffix; the value must fit in 64 bits.

What the region gets: QEMU's server rounds the size up to a power of two (the device exposes
the region as PCI BAR2, and a BAR is a power of two), and never creates one above 1 GiB
(its ftruncate loop stops there). msixhub does the same, and also rounds up to at least one
page, because the region is shared by ``mmap``, whose unit is a page.
"""

from __future__ import annotations

import mmap
import re
from fractions import Fraction

MAX_SHM_SIZE = 1 << 30
"""The largest region QEMU's contrib server creates; asking for more is an error."""

MIN_SHM_SIZE = mmap.PAGESIZE

_SUFFIX_SHIFT = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_DECIMAL = re.compile(r"(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?(?P<suffix>[A-Za-z]?)")
_HEX = re.compile(r"0[xX](?P<hex>[0-9A-Fa-f]+)")


class SizeError(ValueError):
    """A size that cannot be parsed, or that no ivshmem region can have."""


def parse_size(text: str) -> int:
    """Bytes named by ``text`` ("4M", "1.5G", "0x1000", "65536"), QEMU's syntax (see module)."""
    stripped = text.lstrip()
    hex_match = _HEX.fullmatch(stripped)
    if hex_match is not None:
        return _below_2_64(int(hex_match["hex"], 16), text)
    match = _DECIMAL.fullmatch(stripped)
    if match is None or not (match["int"] or match["frac"]):
        raise SizeError(
            f"invalid size {text!r}: expected a number with an optional suffix B, K, M, G, T, P or E"
        )
    suffix = match["suffix"].upper()
    if suffix and suffix not in _SUFFIX_SHIFT:
        raise SizeError(f"invalid size {text!r}: unknown suffix {match['suffix']!r}")
    shift = _SUFFIX_SHIFT[suffix] if suffix else 0
    value = Fraction(int(match["int"] or "0"))
    if match["frac"]:
        if shift == 0:
            raise SizeError(f"invalid size {text!r}: a fraction needs a suffix K, M, G, T, P or E")
        value += Fraction(int(match["frac"]), 10 ** len(match["frac"]))
    return _below_2_64(int(value * (1 << shift) + Fraction(1, 2)), text)


def _below_2_64(value: int, text: str) -> int:
    if value >= 1 << 64:
        raise SizeError(f"invalid size {text!r}: must be below 2^64 bytes")
    return value


def shm_size(requested: int) -> int:
    """The size a region asked to hold ``requested`` bytes gets: the next power of two, at
    least a page; at most ``MAX_SHM_SIZE``."""
    if requested <= 0:
        raise SizeError(f"shared memory size must be positive, got {requested}")
    size = max(1 << (requested - 1).bit_length(), MIN_SHM_SIZE)
    if size > MAX_SHM_SIZE:
        raise SizeError(
            f"shared memory size {requested} bytes is too large: rounded up to a power of two "
            f"it exceeds the maximum of {MAX_SHM_SIZE} bytes (1G)"
        )
    return size


def is_valid_shm_size(size: int) -> bool:
    """True if ``size`` is one ``shm_size`` can return (a power of two within the limits)."""
    return MIN_SHM_SIZE <= size <= MAX_SHM_SIZE and size & (size - 1) == 0
