"""Sealed memfds: shared memory that clients may only read (the published index, kvd.memory.shm_index), and shared
memory of a fixed size (a session's submission ring and completion queue)."""

from __future__ import annotations

import fcntl
import mmap
import os

from kvd.errors import Unavailable

# Linux 5.1+: no new writable mapping and no write() on the file, while mappings made before the seal keep working.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def fixed_size_memfd(name: str, nbytes: int) -> int:
    """A memfd of `nbytes`, mode 0600, that nobody can resize any more: a mapping of it never faults because the
    other side cut the file short (OSError where the kernel cannot seal)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_sealed_memfd(name: str, nbytes: int) -> tuple[int, mmap.mmap]:
    """A memfd of `nbytes`, its writable shared mapping, then sealed: nobody (us included) can map it writable
    again, write it, grow, shrink or punch it, or change the seals; the mapping returned keeps writing."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        os.fchmod(fd, 0o400)  # reopening through /proc/<pid>/fd needs the owner's uid (or CAP_DAC_OVERRIDE)
        mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except OSError:
            mapping.close()
            raise
    except OSError as exc:
        os.close(fd)
        raise Unavailable(f"cannot create a sealed shared-memory index (Linux 5.1+ memfd seals): {exc}") from exc
    return fd, mapping
