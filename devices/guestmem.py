"""Guest memory: a table of regions, each an ``mmap`` (MAP_SHARED) of part of an fd.

Both sides use it: the VMM client owns the memfd and maps it; a device daemon maps the
fds the hub hands it. Every access goes through :meth:`GuestMemory.translate` (or the
helpers built on it), which checks the whole range ``[gpa, gpa + length)`` against the
table, so a guest-supplied address can never reach outside a mapping.

Rules of a range (each violation is a :class:`GuestMemoryError`, a ``ValueError``):

* ``gpa >= 0`` and ``length > 0``: a zero-size access names no memory and is refused,
  like QEMU refuses zero-sized descriptors;
* ``gpa + length <= 2**64``: guest physical addresses are 64-bit;
* :meth:`translate` wants the range inside ONE region; :meth:`gather` accepts a range that
  runs across regions that are adjacent in guest-physical space (no hole in between).

Views and unmapping. ``translate`` returns a ``memoryview`` into the mapping; while such a
view is alive CPython refuses ``mmap.close()`` (``BufferError``). Callers keep views
short-lived (``with memory.translate(...) as view:`` releases at once) and the
integer helpers here never hand a view out. ``close()`` / ``remove_region()`` unmap every
mapping that has no live view; a mapping that still has one is dropped from the table and
unmapped by CPython when its last view is released. Either way the memory a live view
points at stays mapped while the view exists, so no access can fault.

A peer that shrinks a memfd under our mapping would make the next access raise SIGBUS.
So mapping a sealable fd adds ``F_SEAL_SHRINK`` (seals bind the file, whoever holds it);
a fd that cannot be sealed (a regular file, an old hugetlbfs) is trusted as is.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from msixhub.protocol.fds import OwnedFd

GPA_LIMIT = 1 << 64

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(ValueError):
    """A guest-physical range that the memory table does not cover, or a bad table."""


@dataclass(frozen=True, slots=True)
class Region:
    """``size`` bytes of guest-physical space at ``gpa``, backed by an fd at ``offset``."""

    gpa: int
    size: int
    offset: int = 0

    def __post_init__(self) -> None:
        if self.gpa < 0 or self.size <= 0 or self.offset < 0:
            raise GuestMemoryError(f"bad region {self}: gpa/offset must be >= 0 and size > 0")
        if self.gpa + self.size > GPA_LIMIT:
            raise GuestMemoryError(f"region {self} ends past 2**64")
        if self.offset % mmap.ALLOCATIONGRANULARITY:
            raise GuestMemoryError(
                f"region {self}: fd offset must be a multiple of {mmap.ALLOCATIONGRANULARITY}"
            )

    @property
    def end(self) -> int:
        return self.gpa + self.size


class _Mapping:
    """One region's mmap, the long-lived view that translations slice from, and views of it
    as 2-, 4- and 8-byte words for the integer stores (see :meth:`GuestMemory.write_u16`)."""

    __slots__ = ("end", "gpa", "mm", "region", "view", "words")

    def __init__(self, region: Region, mm: mmap.mmap) -> None:
        self.region = region
        self.gpa = region.gpa  # plain attributes: the hot paths read them per access
        self.end = region.end
        self.mm = mm
        self.view = memoryview(mm)
        self.words = {
            size: self.view[: len(self.view) - len(self.view) % size].cast(code)
            for size, code in ((2, "H"), (4, "I"), (8, "Q"))
        }

    def unmap(self) -> bool:
        """Unmap now if no translated view is alive; else leave it to CPython (see module doc)."""
        for words in self.words.values():
            words.release()
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            return False
        return True


def _fileno(fd: OwnedFd | int) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


def _seal_against_shrink(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a sealable file: nothing to protect with
            return
        if exc.errno == errno.EPERM and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            return  # already sealed (and the seals themselves sealed)
        raise GuestMemoryError(f"cannot seal fd {fd} against shrinking: {exc}") from exc


class GuestMemory:
    """The memory table of one guest: non-overlapping regions, sorted by gpa."""

    def __init__(self) -> None:
        self._maps: list[_Mapping] = []
        self._starts: list[int] = []
        self._closed = False
        self._last: _Mapping | None = None  # the region the last access fell in, tried first

    # -- construction -------------------------------------------------------------------

    @classmethod
    def map(cls, regions: Sequence[Region], fds: Sequence[OwnedFd | int]) -> GuestMemory:
        """Map ``regions[i]`` from ``fds[i]``. The fds stay the caller's (mmap keeps a dup)."""
        if len(regions) != len(fds):
            raise GuestMemoryError(f"{len(regions)} regions but {len(fds)} fds")
        memory = cls()
        try:
            for region, fd in zip(regions, fds, strict=True):
                memory.add_region(region, fd)
        except BaseException:
            memory.close()
            raise
        return memory

    @classmethod
    def from_memfd(cls, fd: OwnedFd | int, size: int, gpa: int = 0) -> GuestMemory:
        """The VMM side: all ``size`` bytes of a memfd it created, as one region at ``gpa``."""
        return cls.map([Region(gpa, size)], [fd])

    def add_region(self, region: Region, fd: OwnedFd | int) -> None:
        """Map a new region; refused if it overlaps one already in the table."""
        self._check_open()
        index = bisect.bisect_right(self._starts, region.gpa)
        if index > 0 and self._maps[index - 1].region.end > region.gpa:
            raise GuestMemoryError(f"{region} overlaps {self._maps[index - 1].region}")
        if index < len(self._maps) and region.end > self._maps[index].region.gpa:
            raise GuestMemoryError(f"{region} overlaps {self._maps[index].region}")
        number = _fileno(fd)
        _seal_against_shrink(number)
        try:
            mm = mmap.mmap(
                number,
                region.size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=region.offset,
            )
        except (OSError, ValueError) as exc:
            raise GuestMemoryError(f"cannot map {region} from fd {number}: {exc}") from exc
        self._maps.insert(index, _Mapping(region, mm))
        self._starts.insert(index, region.gpa)

    def remove_region(self, gpa: int) -> bool:
        """Drop the region that starts at ``gpa``; True if it was unmapped at once."""
        self._check_open()
        index = bisect.bisect_left(self._starts, gpa)
        if index == len(self._starts) or self._starts[index] != gpa:
            raise GuestMemoryError(f"no region starts at {gpa:#x}")
        del self._starts[index]
        self._last = None
        return self._maps.pop(index).unmap()

    def close(self) -> bool:
        """Release every mapping; True if all were unmapped at once. Idempotent."""
        self._closed = True
        self._last = None
        maps, self._maps, self._starts = self._maps, [], []
        return all([mapping.unmap() for mapping in maps])

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def regions(self) -> list[Region]:
        return [mapping.region for mapping in self._maps]

    @property
    def closed(self) -> bool:
        return self._closed

    # -- translation ---------------------------------------------------------------------

    def translate(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa + length)``, which must lie inside one region."""
        mapping = self._within(gpa, length)
        start = gpa - mapping.gpa
        return mapping.view[start : start + length]

    def _within(self, gpa: int, length: int) -> _Mapping:
        """The region that holds all of ``[gpa, gpa + length)``, or GuestMemoryError. The
        region of the last access is tried first (guests keep their rings and buffers in
        one region); the full checks run when it does not hold the range."""
        mapping = self._last
        if mapping is None or not (mapping.gpa <= gpa and 0 < length <= mapping.end - gpa):
            mapping = self._lookup(gpa, length)
            if gpa + length > mapping.end:
                raise GuestMemoryError(
                    f"[{gpa:#x}, +{length:#x}) runs past the end of region {mapping.region}"
                )
            self._last = mapping
        return mapping

    def gather(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa + length)``, split where it crosses adjacent regions."""
        mapping = self._last
        if mapping is not None and mapping.gpa <= gpa and 0 < length <= mapping.end - gpa:
            start = gpa - mapping.gpa
            return [mapping.view[start : start + length]]
        index = self._locate(gpa, length)
        mapping = self._maps[index]
        views: list[memoryview] = []
        while True:
            start = gpa - mapping.region.gpa
            take = min(length, mapping.region.size - start)
            views.append(mapping.view[start : start + take])
            gpa += take
            length -= take
            if not length:
                return views
            index += 1
            if index == len(self._maps) or self._maps[index].region.gpa != gpa:
                for view in views:
                    view.release()
                raise GuestMemoryError(f"no guest memory at {gpa:#x} (hole in the range)")
            mapping = self._maps[index]

    def _lookup(self, gpa: int, length: int) -> _Mapping:
        return self._maps[self._locate(gpa, length)]

    def _locate(self, gpa: int, length: int) -> int:
        """Index of the region holding ``gpa``, after the range rules every access obeys."""
        self._check_open()
        if gpa < 0 or length <= 0:
            raise GuestMemoryError(f"bad range gpa={gpa:#x} length={length}: need gpa>=0, len>0")
        if gpa + length > GPA_LIMIT:
            raise GuestMemoryError(f"[{gpa:#x}, +{length:#x}) wraps past 2**64")
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index < 0 or gpa >= self._maps[index].region.end:
            raise GuestMemoryError(f"no guest memory at {gpa:#x}")
        return index

    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory is closed")

    # -- integer and byte helpers (no view escapes) -------------------------------------

    def _unpack(self, fmt: struct.Struct, gpa: int) -> int:
        mapping = self._within(gpa, fmt.size)
        value: int = fmt.unpack_from(mapping.view, gpa - mapping.gpa)[0]
        return value

    def _store(self, size: int, gpa: int, value: int) -> None:
        """One store of a ``size``-byte word when ``gpa`` is aligned to it, so a peer that
        reads the word concurrently sees the old value or the new one. (``struct.pack_into``
        would not do: it zeroes its destination before writing, a transient 0 the peer can
        read.) An unaligned word is copied bytewise, as hardware would not make it atomic
        either."""
        mapping = self._within(gpa, size)
        if not 0 <= value < 1 << (8 * size):
            raise GuestMemoryError(f"{value} does not fit {size} bytes")
        offset = gpa - mapping.gpa
        words = mapping.words[size]
        if offset % size == 0 and offset // size < len(words):
            words[offset // size] = value
        else:
            mapping.view[offset : offset + size] = value.to_bytes(size, "little")

    def read_u16(self, gpa: int) -> int:
        return self._unpack(_U16, gpa)

    def read_u32(self, gpa: int) -> int:
        return self._unpack(_U32, gpa)

    def read_u64(self, gpa: int) -> int:
        return self._unpack(_U64, gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self._store(2, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._store(4, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._store(8, gpa, value)

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of ``[gpa, gpa + length)`` (may cross adjacent regions)."""
        mapping = self._last
        if mapping is not None and mapping.gpa <= gpa and 0 < length <= mapping.end - gpa:
            start = gpa - mapping.gpa
            return mapping.mm[start : start + length]
        return b"".join(_consume(self.gather(gpa, length)))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to ``gpa`` (may cross adjacent regions)."""
        source = memoryview(data).cast("B")
        length = len(source)
        mapping = self._last
        if mapping is not None and mapping.gpa <= gpa and 0 < length <= mapping.end - gpa:
            start = gpa - mapping.gpa
            mapping.view[start : start + length] = source
            return
        done = 0
        for view in self.gather(gpa, len(source)):
            with view:
                view[:] = source[done : done + len(view)]
                done += len(view)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``[gpa, gpa + length)`` to ``byte`` (the toolkit zeroes rings with it)."""
        for view in self.gather(gpa, length):
            with view:
                view[:] = bytes([byte]) * len(view)


def _consume(views: list[memoryview]) -> Iterator[bytes]:
    for view in views:
        with view:
            yield view.tobytes()
