"""BAR0 register model and size parsing of ivshmem (pure, no I/O)."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msixhub.devices.ivshmem.regs import (
    Doorbell,
    IvshmemRegisters,
    Register,
    RegisterAccessError,
    RegisterStats,
)
from msixhub.devices.ivshmem.sizes import (
    MAX_SHM_SIZE,
    SizeError,
    is_valid_shm_size,
    parse_size,
    shm_size,
)

# peer id -> vector count; 0 means no such peer
PEERS = {0: 2, 3: 2, 0xFFFF: 1}


def regs(peer_id: int = 3) -> IvshmemRegisters:
    return IvshmemRegisters(peer_id, lambda peer: PEERS.get(peer, 0))


def test_reset_state() -> None:
    r = regs()
    assert r.read(Register.INTR_MASK) == 0
    assert r.read(Register.INTR_STATUS) == 0
    assert r.read(Register.IV_POSITION) == 3
    assert not r.intx_asserted
    assert r.statistics() == RegisterStats(0, 0, 0, 0)


def test_ivposition_is_read_only() -> None:
    r = regs()
    assert r.write(Register.IV_POSITION, 0x1234) is None
    assert r.read(Register.IV_POSITION) == 3


def test_intr_mask_reads_back() -> None:
    r = regs()
    r.write(Register.INTR_MASK, 0xFFFF_FFFF)
    assert r.read(Register.INTR_MASK) == 0xFFFF_FFFF
    assert r.read(Register.INTR_MASK) == 0xFFFF_FFFF  # reading the mask has no side effect


def test_intr_status_read_clears() -> None:
    r = regs()
    r.write(Register.INTR_STATUS, 0x5)
    assert r.read(Register.INTR_STATUS) == 0x5
    assert r.read(Register.INTR_STATUS) == 0


def test_intx_level_is_status_and_mask() -> None:
    r = regs()
    r.raise_intx()
    assert r.intr_status == 1
    assert not r.intx_asserted  # masked (mask resets to 0)
    r.write(Register.INTR_MASK, 1)
    assert r.intx_asserted
    assert r.read(Register.INTR_STATUS) == 1  # the guest's ISR reads and so deasserts
    assert not r.intx_asserted
    assert r.statistics().intx_raised == 1


def test_intx_raise_sets_status_to_one_as_qemu() -> None:
    r = regs()
    r.write(Register.INTR_STATUS, 0x100)
    r.raise_intx()
    assert r.read(Register.INTR_STATUS) == 1


def test_doorbell_to_existing_peer_and_vector() -> None:
    r = regs()
    assert r.write(Register.DOORBELL, 0 << 16 | 1) == Doorbell(peer=0, vector=1)
    assert r.write(Register.DOORBELL, 0xFFFF << 16 | 0) == Doorbell(0xFFFF, 0)
    assert r.write(Register.DOORBELL, 3 << 16) == Doorbell(3, 0)  # ringing ourselves is allowed
    assert r.statistics() == RegisterStats(3, 0, 0, 0)


def test_doorbell_to_missing_peer_or_vector_is_counted_and_ignored() -> None:
    r = regs()
    assert r.write(Register.DOORBELL, 7 << 16 | 0) is None
    assert r.write(Register.DOORBELL, 0 << 16 | 2) is None
    assert r.write(Register.DOORBELL, 0xFFFF << 16 | 1) is None
    # bits 0..15 are the vector (QEMU would ring vector 0 here: it looks at 8 bits)
    assert r.write(Register.DOORBELL, 0 << 16 | 0x100) is None
    assert r.statistics() == RegisterStats(0, 1, 3, 0)
    assert r.read(Register.DOORBELL) == 0  # write-only


@given(peer=st.integers(0, 0xFFFF), vector=st.integers(0, 0xFFFF))
@settings(max_examples=200, deadline=None)
def test_doorbell_decode_encode_round_trip(peer: int, vector: int) -> None:
    doorbell = Doorbell(peer, vector)
    assert Doorbell.decode(doorbell.encode()) == doorbell


def test_doorbell_encode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        Doorbell(0x10000, 0).encode()
    with pytest.raises(ValueError):
        Doorbell(0, -1).encode()


def test_a_narrow_read_at_a_register_sees_its_low_bytes() -> None:
    r = regs(0x1234)
    assert r.read(Register.IV_POSITION, 1) == 0x34
    assert r.read(Register.IV_POSITION, 2) == 0x1234


def test_a_narrow_read_inside_a_register_is_zero_as_in_qemu() -> None:
    r = regs(0x1234)
    assert r.read(Register.IV_POSITION + 1, 1) == 0
    assert r.read(Register.IV_POSITION + 2, 2) == 0


def test_a_narrow_status_read_clears_the_whole_register_and_inside_it_nothing() -> None:
    r = regs()
    r.write(Register.INTR_STATUS, 0x0101)
    assert r.read(Register.INTR_STATUS + 1, 1) == 0  # matches no register: no side effect
    assert r.intr_status == 0x0101
    assert r.read(Register.INTR_STATUS, 1) == 0x01
    assert r.read(Register.INTR_STATUS, 4) == 0


def test_a_narrow_write_stores_its_value_unshifted_as_in_qemu() -> None:
    r = regs()
    r.write(Register.INTR_MASK, 0xFFFF_FFFF)
    r.write(Register.INTR_MASK + 1, 0xAB, 1)
    assert r.intr_mask == 0xAB  # no read-modify-write, no shift
    r.write(Register.INTR_MASK + 2, 0xBEEF, 2)
    assert r.intr_mask == 0xBEEF
    rung = r.write(Register.DOORBELL + 2, 1, 2)  # value 1 at any byte: peer 0, vector 1
    assert rung == Doorbell(0, 1)


def test_reserved_space_reads_zero_and_ignores_writes() -> None:
    r = regs()
    assert r.write(16, 0xFFFF_FFFF) is None
    assert r.read(16) == 0
    assert r.read(252) == 0
    assert r.read(255, 1) == 0


@pytest.mark.parametrize(
    ("offset", "size"),
    [(256, 4), (254, 4), (-4, 4), (0, 8), (0, 3), (1, 4), (2, 4), (1, 2), (255, 2)],
)
def test_bad_accesses_raise_and_change_nothing(offset: int, size: int) -> None:
    r = regs()
    r.write(Register.INTR_STATUS, 1)
    with pytest.raises(RegisterAccessError):
        r.read(offset, size)
    with pytest.raises(RegisterAccessError):
        r.write(offset, 0, size)
    assert r.intr_status == 1


def test_value_wider_than_access_is_refused() -> None:
    r = regs()
    with pytest.raises(RegisterAccessError):
        r.write(Register.INTR_MASK, 0x100, 1)
    with pytest.raises(RegisterAccessError):
        r.write(Register.INTR_MASK, -1)
    assert r.intr_mask == 0


def test_peer_id_range() -> None:
    with pytest.raises(ValueError):
        regs(0x10000)
    with pytest.raises(ValueError):
        regs(-1)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4194304", 4 << 20),
        ("4M", 4 << 20),
        ("4m", 4 << 20),
        ("1K", 1024),
        ("1k", 1024),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("1E", 1 << 60),
        ("512B", 512),
        ("1.5M", 3 << 19),
        ("1.k", 1024),
        (".5K", 512),
        ("12.345M", 12944671),  # rounded to the nearest byte
        ("0x1000", 4096),
        ("0X10", 16),
        ("  4M", 4 << 20),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "M", ".", "-1", "-1M", "+1M", "1.5", "1.5B", "4MB", "4M ", "4X", "1e3", "0x10M",
     "0x1.8", "four", "16E", "18446744073709551616", "0x10000000000000000"],
)  # fmt: skip
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


@pytest.mark.parametrize(
    ("requested", "size"),
    [
        (1, mmap.PAGESIZE),
        (mmap.PAGESIZE, mmap.PAGESIZE),
        (3 << 20, 4 << 20),
        (4 << 20, 4 << 20),
        ((4 << 20) + 1, 8 << 20),
        (MAX_SHM_SIZE, MAX_SHM_SIZE),
    ],
)
def test_shm_size_rounds_up_to_power_of_two(requested: int, size: int) -> None:
    assert shm_size(requested) == size
    assert is_valid_shm_size(size)


@pytest.mark.parametrize("requested", [0, -1, MAX_SHM_SIZE + 1, 1 << 64])
def test_shm_size_rejects(requested: int) -> None:
    with pytest.raises(SizeError):
        shm_size(requested)


def test_valid_shm_sizes() -> None:
    assert not is_valid_shm_size(3 << 20)
    assert not is_valid_shm_size(2 * MAX_SHM_SIZE)
    assert not is_valid_shm_size(mmap.PAGESIZE // 2)
