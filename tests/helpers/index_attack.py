"""Tries every way a client holding an index fd could write the daemon's index; prints one JSON object
{attempt: "refused: <error>" | "ALLOWED"} and, under "after", the first 64 bytes of the index as seen afterwards.

    python -m tests.helpers.index_attack FD
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import sys
from collections.abc import Callable

FALLOC_FL_KEEP_SIZE_PUNCH_HOLE = 0x01 | 0x02


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def attempts(fd: int, size: int) -> dict[str, Callable[[], object]]:
    def reopen_rw_and_map() -> object:
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            return mmap.mmap(rw, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(rw)

    def mprotect_writable() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        _libc_call("mprotect", ctypes.c_void_p(address), ctypes.c_size_t(size), mmap.PROT_READ | mmap.PROT_WRITE)
        ctypes.memmove(address, b"XXXXXXXX", 8)  # only reached if mprotect allowed it

    return {
        "mmap_shared_writable": lambda: mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
        "write": lambda: os.pwrite(fd, b"XXXXXXXX", 0),
        "shrink": lambda: os.ftruncate(fd, 0),
        "grow": lambda: os.ftruncate(fd, size * 2),
        "punch_hole": lambda: _libc_call(
            "fallocate", fd, FALLOC_FL_KEEP_SIZE_PUNCH_HOLE, ctypes.c_long(0), ctypes.c_long(size)
        ),
        "reopen_read_write": reopen_rw_and_map,
        "mprotect_writable": mprotect_writable,
        "add_seal": lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE),
    }


def main() -> None:
    fd = int(sys.argv[1])
    size = os.fstat(fd).st_size
    out: dict[str, object] = {}
    for name, attempt in attempts(fd, size).items():
        try:
            attempt()
            out[name] = "ALLOWED"
        except OSError as exc:
            out[name] = f"refused: {exc}"
    private = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    private[:8] = b"XXXXXXXX"  # copy-on-write: this process's own copy, never the daemon's
    out["after"] = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)[:64].hex()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
