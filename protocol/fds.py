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


def eventfd_write(fd: int, value: int = 1) -> None:
    os.eventfd_write(fd, value)
