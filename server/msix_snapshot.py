"""The snapshot format of one MSI-X capability: a versioned msgpack map.

``{"format": "msixhub-msix", "version": 1, "num_vectors": N, "control": u16,
"table": 16*N bytes, "pba": PBA bytes, "used": [N refcounts]}``

``table`` and ``pba`` are byte-for-byte what the guest reads through the BAR (PCI layout,
little-endian), so a snapshot can be inspected with the spec in hand. Per-vector counters
are statistics of one hub process, not device state, and are not saved.

This module checks that a blob is a well-formed image of an N-vector capability (types,
sizes, reserved bits); whether the image is a state the capability can be in is checked
by :meth:`MsixCapability.restore`.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from typing import TypeVar

import msgpack
from msixhub.protocol.errors import ErrorCode, MessageError

FORMAT = "msixhub-msix"
VERSION = 1

_ENTRY = struct.Struct("<QII")  # address (low dword first), data, vector control
_CONTROL_ENABLE = 0x8000
_CONTROL_FUNCTION_MASK = 0x4000
_CONTROL_TABLE_SIZE = 0x07FF
_ADDRESS_RESERVED = 0x3  # message address bits 1:0 read as zero
_MAX_REFCOUNT = 0xFFFF_FFFF
_KEYS = frozenset({"format", "version", "num_vectors", "control", "table", "pba", "used"})


_T = TypeVar("_T")


class SnapshotError(MessageError):
    """A snapshot blob that cannot be restored here; the capability is left unchanged."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_FIELD, message)


@dataclass(frozen=True, slots=True)
class MsixImage:
    """The whole state of a capability, decoupled from the object holding it."""

    addresses: array[int]  # 'Q', one per vector
    data: array[int]  # 'I'
    masks: bytes  # one byte (0 or 1) per vector: the vector-control mask bit
    pba: bytes  # the PBA as the guest reads it
    enabled: bool
    function_masked: bool
    used: array[int]  # 'I' refcounts

    @property
    def num_vectors(self) -> int:
        return len(self.used)


def pba_size_bytes(num_vectors: int) -> int:
    """The PBA is a whole number of QWORDs (PCI spec), one bit per vector."""
    return (num_vectors + 63) // 64 * 8


def encode(image: MsixImage) -> bytes:
    n = image.num_vectors
    table = bytearray(n * _ENTRY.size)
    for v in range(n):
        _ENTRY.pack_into(table, v * _ENTRY.size, image.addresses[v], image.data[v], image.masks[v])
    control = (
        (_CONTROL_ENABLE if image.enabled else 0)
        | (_CONTROL_FUNCTION_MASK if image.function_masked else 0)
        | (n - 1)
    )
    blob: bytes = msgpack.packb(
        {
            "format": FORMAT,
            "version": VERSION,
            "num_vectors": n,
            "control": control,
            "table": bytes(table),
            "pba": bytes(image.pba),
            "used": image.used.tolist(),
        }
    )
    return blob


def decode(blob: bytes, num_vectors: int) -> MsixImage:
    """Parse and check ``blob`` as the image of a ``num_vectors``-vector capability."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise SnapshotError(f"snapshot must be bytes, not {type(blob).__name__}")
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SnapshotError(f"snapshot is not one well-formed msgpack document: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"not an MSI-X snapshot (expected a map with format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise SnapshotError(f"snapshot version {doc.get('version')!r} is not {VERSION}")
    if set(doc) != _KEYS:
        raise SnapshotError(f"snapshot fields are {sorted(doc)}, expected {sorted(_KEYS)}")
    if doc["num_vectors"] != num_vectors:
        raise SnapshotError(
            f"snapshot table size {doc['num_vectors']!r} does not match this device's {num_vectors}"
        )
    control = _field(doc, "control", int)
    if control & ~(_CONTROL_ENABLE | _CONTROL_FUNCTION_MASK) != num_vectors - 1:
        raise SnapshotError(f"snapshot message control {control:#06x} is not valid here")
    table = _sized_bytes(doc, "table", num_vectors * _ENTRY.size)
    pba = _sized_bytes(doc, "pba", pba_size_bytes(num_vectors))
    used_list = _field(doc, "used", list)
    if len(used_list) != num_vectors or not all(
        type(u) is int and 0 <= u <= _MAX_REFCOUNT for u in used_list
    ):
        raise SnapshotError(f"snapshot refcounts must be {num_vectors} ints in [0, 2**32)")

    addresses = array("Q", bytes(8 * num_vectors))
    data = array("I", bytes(4 * num_vectors))
    masks = bytearray(num_vectors)
    for v, (address, datum, vector_control) in enumerate(_ENTRY.iter_unpack(table)):
        if address & _ADDRESS_RESERVED or vector_control & ~1:
            raise SnapshotError(f"snapshot table entry {v} has reserved bits set")
        addresses[v], data[v], masks[v] = address, datum, vector_control
    if int.from_bytes(pba, "little") >> num_vectors:
        raise SnapshotError(f"snapshot PBA has bits set beyond vector {num_vectors - 1}")
    return MsixImage(
        addresses=addresses,
        data=data,
        masks=bytes(masks),
        pba=pba,
        enabled=bool(control & _CONTROL_ENABLE),
        function_masked=bool(control & _CONTROL_FUNCTION_MASK),
        used=array("I", used_list),
    )


def _field(doc: dict[str, object], key: str, kind: type[_T]) -> _T:
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SnapshotError(f"snapshot field {key!r} must be {kind.__name__}")
    return value


def _sized_bytes(doc: dict[str, object], key: str, size: int) -> bytes:
    value = _field(doc, key, bytes)
    if len(value) != size:
        raise SnapshotError(f"snapshot field {key!r} is {len(value)} bytes, expected {size}")
    return value
