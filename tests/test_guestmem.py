"""GuestMemory: the range rules, region table edits, sealing, and unmapping with live views."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from msixhub.devices.guestmem import GuestMemory, GuestMemoryError, Region
from msixhub.protocol.fds import OwnedFd, memfd

PAGE = 0x4000
# Two adjacent regions, then one after a hole; all from one 64 KiB memfd.
REGIONS = [Region(0x0, PAGE, 0x0), Region(PAGE, PAGE, PAGE), Region(0x10000, PAGE, 2 * PAGE)]


@pytest.fixture
def fd() -> Iterator[OwnedFd]:
    with memfd(4 * PAGE, "guestmem-test") as owned:
        yield owned


@pytest.fixture
def memory(fd: OwnedFd) -> Iterator[GuestMemory]:
    with GuestMemory.map(REGIONS, [fd, fd, fd]) as mapped:
        yield mapped


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(0, 1), (PAGE - 8, 8), (PAGE, PAGE), (0x10000, PAGE), (0x13FFF, 1)],
)
def test_translate_inside_one_region(memory: GuestMemory, gpa: int, length: int) -> None:
    with memory.translate(gpa, length) as view:
        assert len(view) == length
        assert not view.readonly


@pytest.mark.parametrize(
    ("gpa", "length", "why"),
    [
        (-1, 4, "bad range"),
        (0, 0, "bad range"),
        (0, -5, "bad range"),
        (PAGE - 4, 8, "runs past the end"),  # adjacent, but translate wants one region
        (2 * PAGE, 1, "no guest memory"),  # in the hole
        (0x14000, 1, "no guest memory"),  # past the last region
        ((1 << 64) - 1, 2, "wraps past 2\\*\\*64"),
        (1 << 70, 1, "wraps past"),
    ],
)
def test_translate_refuses_ranges_outside_one_region(
    memory: GuestMemory, gpa: int, length: int, why: str
) -> None:
    with pytest.raises(GuestMemoryError, match=why):
        memory.translate(gpa, length)


def test_gather_splits_across_adjacent_regions_only(memory: GuestMemory) -> None:
    views = memory.gather(PAGE - 4, 12)
    assert [len(v) for v in views] == [4, 8]
    for view in views:
        view.release()
    with pytest.raises(GuestMemoryError, match="hole"):
        memory.gather(2 * PAGE - 4, 8)


def test_little_endian_helpers_and_byte_copies(memory: GuestMemory) -> None:
    memory.write_u16(0x10, 0x1234)
    memory.write_u32(0x20, 0xDEADBEEF)
    memory.write_u64(0x30, 0x0102030405060708)
    assert memory.read(0x10, 2) == b"\x34\x12"
    assert memory.read(0x20, 4) == bytes.fromhex("efbeadde")
    assert memory.read(0x30, 8) == bytes.fromhex("0807060504030201")
    assert (memory.read_u16(0x10), memory.read_u32(0x20)) == (0x1234, 0xDEADBEEF)
    assert memory.read_u64(0x30) == 0x0102030405060708
    memory.write(PAGE - 3, b"abcdef")  # crosses into the adjacent region
    assert memory.read(PAGE - 3, 6) == b"abcdef"
    with pytest.raises(GuestMemoryError):
        memory.write_u32(PAGE - 2, 1)  # an integer never straddles two regions
    with pytest.raises(GuestMemoryError):
        memory.read_u64(0x14000 - 4)


def test_mappings_are_shared_through_the_fd(fd: OwnedFd, memory: GuestMemory) -> None:
    with GuestMemory.from_memfd(fd, 4 * PAGE) as whole:
        memory.write(0x10000 + 5, b"shared")  # region 3 is at fd offset 2*PAGE
        assert whole.read(2 * PAGE + 5, 6) == b"shared"


def test_add_region_refuses_overlap_and_leaves_table_unchanged(
    fd: OwnedFd, memory: GuestMemory
) -> None:
    before = memory.regions
    for region in (Region(PAGE + 0x1000, PAGE), Region(0xC000, 0x8000), Region(0, 1 << 20)):
        with pytest.raises(GuestMemoryError, match="overlaps"):
            memory.add_region(region, fd)
    assert memory.regions == before
    memory.add_region(Region(2 * PAGE, 2 * PAGE), fd)  # fills the hole
    assert [len(v) for v in memory.gather(PAGE, 4 * PAGE)] == [PAGE, 2 * PAGE, PAGE]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gpa": 0, "size": 0},
        {"gpa": -PAGE, "size": PAGE},
        {"gpa": 0, "size": PAGE, "offset": 100},
        {"gpa": (1 << 64) - PAGE, "size": 2 * PAGE},
    ],
)
def test_bad_regions(kwargs: dict[str, int]) -> None:
    with pytest.raises(GuestMemoryError):
        Region(**kwargs)


def test_map_checks_counts_and_file_size(fd: OwnedFd) -> None:
    with pytest.raises(GuestMemoryError, match="2 regions but 1 fds"):
        GuestMemory.map(REGIONS[:2], [fd])
    with pytest.raises(GuestMemoryError, match="cannot map"):
        GuestMemory.map([Region(0, 8 * PAGE)], [fd])


def test_mapping_seals_the_memfd_against_shrinking(fd: OwnedFd, memory: GuestMemory) -> None:
    with pytest.raises(PermissionError):
        os.ftruncate(fd.fileno(), PAGE)
    os.ftruncate(fd.fileno(), 8 * PAGE)  # growing stays allowed


def test_remove_region_and_close_with_and_without_live_views(
    fd: OwnedFd, memory: GuestMemory
) -> None:
    assert memory.remove_region(0x10000) is True
    with pytest.raises(GuestMemoryError):
        memory.translate(0x10000, 1)
    with pytest.raises(GuestMemoryError, match="no region starts"):
        memory.remove_region(0x10000)

    view = memory.translate(PAGE, 16)
    assert memory.remove_region(PAGE) is False  # unmapped when the view goes
    view[:4] = b"live"  # still mapped while the view exists
    assert bytes(view[:4]) == b"live"
    view.release()

    held = memory.translate(0, 8)
    assert memory.close() is False
    held[0] = 1
    held.release()
    assert memory.closed
    with pytest.raises(GuestMemoryError, match="closed"):
        memory.read(0, 1)
    assert memory.close() is True  # idempotent
