"""The disk tier's file operations. Every function here blocks: the tier runs them in its I/O pool.

    <root>/<namespace digest hex>/<first byte of the hash, hex>/<hash hex>

A blob is written to `.tmp-<name>-<random>` in its final directory and renamed over the final name, so a crash
leaves either the whole blob or none of it (and a stray `.tmp-*` file, removed by the next scan).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from kvd.tiers.base import Buffer, blob_header, decode_blob
from kvd.types import BlockKey

IndexKey = tuple[str, str]  # (namespace digest hex, block hash hex): also the file's last two path parts
TMP_PREFIX = ".tmp-"


def blob_path(root: Path, ikey: IndexKey) -> Path:
    ns_hex, hash_hex = ikey
    return root / ns_hex / hash_hex[:2] / hash_hex


def write_blob(path: Path, key: BlockKey, payload: Buffer, fsync: bool) -> int:
    """Write tmp, (fsync), rename over `path`. Returns the blob size; raises OSError (nothing left behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = blob_header(key, payload)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            _write_all(fd, [memoryview(header), memoryview(payload).cast("B")])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(header) + len(payload)


def read_blob(path: Path, key: BlockKey) -> memoryview | None:
    """Read and verify. None: the file is not a valid blob of `key`; FileNotFoundError: no such blob."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    with contextlib.suppress(OSError):
        os.utime(path)  # LRU order for the index rebuilt after a restart (atime is often off)
    try:
        return decode_blob(key, view[:got])
    except ValueError:
        return None


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    while buffers:
        n = os.writev(fd, buffers)
        while buffers and n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers.pop(0)
        if buffers and n:
            buffers[0] = buffers[0][n:]


def scan(root: Path) -> list[tuple[IndexKey, int]]:
    """Every blob under `root` as ((namespace hex, hash hex), size), oldest first; removes interrupted writes."""
    found: list[tuple[float, IndexKey, int]] = []
    if not root.is_dir():
        return []
    for entry in os.scandir(root):
        if entry.name.startswith(TMP_PREFIX):  # a probe of the free space interrupted by a crash
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    for ns_dir in os.scandir(root):
        if not ns_dir.is_dir(follow_symlinks=False):
            continue
        for fan_dir in os.scandir(ns_dir.path):
            if not fan_dir.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(fan_dir.path):
                if entry.name.startswith(TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                found.append((st.st_mtime, (ns_dir.name, entry.name), st.st_size))
    found.sort(key=lambda item: item[0])
    return [(ikey, size) for _, ikey, size in found]


def stat_sizes(paths: list[Path]) -> list[int | None]:
    out: list[int | None] = []
    for path in paths:
        try:
            out.append(path.stat().st_size)
        except OSError:
            out.append(None)
    return out


def unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
