"""File descriptors with exactly one owner.

An ``OwnedFd`` closes its fd exactly once and then holds ``-1`` (a closed fd number is
reused by the kernel at once, so a stale number must never be closed again). Ownership
moves with ``detach()``. Linux primitives msixhub is built on: eventfd and memfd.
"""

from __future__ import annotations

import os
from types import TracebackType


class OwnedFd:
    __slots__ = ("_fd", "name")

    def __init__(self, fd: int, name: str = "") -> None:
        if fd < 0:
            raise ValueError(f"not an fd: {fd}")
        self._fd = fd
        self.name = name

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"fd {self.name or ''} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership: the caller now closes the returned fd."""
        fd, self._fd = self.fileno(), -1
        return fd

    def dup(self) -> OwnedFd:
        return OwnedFd(os.dup(self.fileno()), self.name)

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd}, {self.name!r})"


def close_all(fds: list[OwnedFd]) -> None:
    """Close every fd in the list (each exactly once), even if some close raises."""
    errors: list[OSError] = []
    for fd in fds:
        try:
            fd.close()
        except OSError as exc:
            errors.append(exc)
    fds.clear()
    if errors:
        raise errors[0]


def eventfd(initial: int = 0) -> OwnedFd:
    """A non-blocking, close-on-exec eventfd (counter mode: a read returns and clears the sum)."""
    return OwnedFd(os.eventfd(initial, os.EFD_CLOEXEC | os.EFD_NONBLOCK), "eventfd")


def vector_eventfd() -> OwnedFd:
    """The eventfd of a vector channel, which the hub, a device and a VMM (or ivshmem peers)
    share. Blocking, so that a reader with nothing else to do (a thread per vector, as KVM
    consumes an irqfd in the kernel) waits for an interrupt in one read; msixhub's own readers
    wait for readiness and read with RWF_NOWAIT (``NowaitReader``), so they never block on it.
    Non-blocking on a kernel whose eventfds refuse RWF_NOWAIT (the hub could block there)."""
    flags = os.EFD_CLOEXEC if NOWAIT_READS else os.EFD_CLOEXEC | os.EFD_NONBLOCK
    return OwnedFd(os.eventfd(0, flags), "vector")


def memfd(size: int, name: str = "msixhub-guest", *, hugetlb: bool = False) -> OwnedFd:
    """Anonymous shared memory of ``size`` bytes that can be passed to other processes."""
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    if hugetlb:
        flags = os.MFD_CLOEXEC | os.MFD_HUGETLB
    fd = OwnedFd(os.memfd_create(name, flags), name)
    try:
        os.ftruncate(fd.fileno(), size)
    except BaseException:
        fd.close()
        raise
    return fd


def eventfd_read(fd: int) -> int:
    """Read and clear an eventfd counter; 0 if nothing was there (non-blocking)."""
    try:
        return os.eventfd_read(fd)  # the C helper: no bytes object, a third cheaper than os.read
    except BlockingIOError:
        return 0


class NowaitReader:
    """Reads eventfd counters without ever blocking, whatever ``fd``'s O_NONBLOCK says.

    The flag belongs to the open file, not to the fd: vector eventfds are blocking
    (``vector_eventfd``), and any process holding a copy of an eventfd can change the flag
    for every other holder, or read a count a reader was woken for. A reader that must not
    block (the hub, the VMM client) reads with RWF_NOWAIT, which makes the one read
    non-blocking. Into a buffer of its own: a reader runs once per interrupt, and allocating
    one per read costs a third more. One per task (not for threads sharing it). On a kernel
    whose eventfds refuse RWF_NOWAIT it is ``eventfd_read`` (see ``NOWAIT_READS``)."""

    __slots__ = ("_buffers", "_counter")

    def __init__(self) -> None:
        buffer = bytearray(8)
        self._buffers = (buffer,)
        self._counter = memoryview(buffer).cast("Q")

    def read(self, fd: int) -> int:
        """The counter of ``fd``, cleared; 0 if it was empty."""
        if not NOWAIT_READS:
            return eventfd_read(fd)
        try:
            os.preadv(fd, self._buffers, -1, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        return self._counter[0]


def eventfd_read_nowait(fd: int) -> int:
    """One ``NowaitReader.read`` (for a reader that does not run per interrupt)."""
    return NowaitReader().read(fd)


def eventfd_write(fd: int, value: int = 1) -> None:
    os.eventfd_write(fd, value)


def _eventfds_take_rwf_nowait() -> bool:
    """Whether this kernel's eventfds take RWF_NOWAIT reads (it lets a blocking one say
    EAGAIN rather than wait)."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, on purpose
    try:
        os.preadv(fd, (bytearray(8),), -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False  # a read of an empty eventfd returned: cannot happen


NOWAIT_READS = _eventfds_take_rwf_nowait()
