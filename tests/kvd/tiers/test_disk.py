"""L2 on a real directory: round trip, corruption, quota, unwritable paths, and the index rebuilt on restart."""

from __future__ import annotations

import resource
import threading
from pathlib import Path

import pytest

from kvd.tiers import disk_files
from kvd.tiers.disk import DiskBackend
from tests.kvd.tiers.conftest import MiB, disk_config

NS = "model|fp|tp0/1"


def key(i: int) -> tuple[str, bytes]:
    return NS, i.to_bytes(8, "big")


def payload(i: int, n: int = 64 * 1024) -> bytes:
    return bytes([i % 251]) * n


def blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def started(path: Path, capacity: int = 64 * MiB) -> DiskBackend:
    disk = DiskBackend(disk_config(path, capacity))
    await disk.start()
    await disk.wait_indexed()
    return disk


async def test_round_trip(tmp_path: Path) -> None:
    disk = await started(tmp_path / "l2")
    try:
        assert await disk.put([(key(i), payload(i)) for i in range(4)]) == [True] * 4
        got = await disk.get([key(0), key(3), key(9)])
        assert [bytes(g) if g is not None else None for g in got] == [payload(0), payload(3), None]
        assert await disk.contains([key(1), key(9)]) == [True, False]
        await disk.delete([key(1)])
        assert await disk.contains([key(1)]) == [False]
        assert not [p for p in blob_files(tmp_path) if p.name.startswith(".tmp-")]  # writes were renamed
        assert disk.used()[1] == 3
    finally:
        await disk.close()


async def test_flipped_byte_is_a_miss_counted_and_removed(tmp_path: Path) -> None:
    disk = await started(tmp_path / "l2")
    try:
        await disk.put([(key(1), payload(1))])
        (path,) = blob_files(tmp_path / "l2")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(data)
        assert await disk.get([key(1)]) == [None]
        assert disk.counters.corrupt == 1
        assert not path.exists()
        assert await disk.contains([key(1)]) == [False]
    finally:
        await disk.close()


async def test_quota_evicts_least_recently_used(tmp_path: Path) -> None:
    disk = await started(tmp_path / "l2", capacity=1 * MiB)
    try:
        for i in range(12):  # 12 x 64 KiB = 768 KiB
            await disk.put([(key(i), payload(i))])
        await disk.get([key(0)])  # 0 is now the most recently used
        for i in range(12, 24):
            await disk.put([(key(i), payload(i))])
        used, blocks = disk.used()
        assert used <= 1 * MiB
        assert blocks < 24 and disk.counters.evictions == 24 - blocks
        assert sum(p.stat().st_size for p in blob_files(tmp_path / "l2")) == used
        present = await disk.contains([key(i) for i in range(24)])
        assert present[0] and not present[1] and present[23]
        # A blob larger than the whole tier is dropped, not stored.
        assert await disk.put([(key(99), payload(99, 2 * MiB))]) == [False]
        assert disk.counters.dropped_writes == 1
    finally:
        await disk.close()


async def test_unwritable_directory_drops_the_write(tmp_path: Path) -> None:
    disk = await started(tmp_path / "l2")
    try:
        await disk.put([(key(0), payload(0))])
        ns_dir = next((tmp_path / "l2").iterdir())
        other = (NS, b"\xab\xcd")
        (ns_dir / "ab").write_bytes(b"not a directory")  # mkdir of the fan-out directory fails (EEXIST)
        assert await disk.put([(other, payload(5))]) == [False]
        assert disk.counters.dropped_writes == 1
        assert await disk.get([other]) == [None]
    finally:
        await disk.close()


async def test_disk_full_drops_the_write(tmp_path: Path) -> None:
    """A file-size limit makes write() fail with EFBIG mid-blob, as a full disk fails it with ENOSPC."""
    disk = await started(tmp_path / "l2")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, hard))
        try:
            assert await disk.put([(key(7), payload(7))]) == [False]
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert disk.counters.dropped_writes == 1
        assert blob_files(tmp_path / "l2") == []  # the partial temporary file is gone
        assert await disk.put([(key(7), payload(7))]) == [True]  # and the tier works again
    finally:
        await disk.close()


async def test_index_rebuilt_after_restart(tmp_path: Path) -> None:
    disk = await started(tmp_path / "l2")
    await disk.put([(key(i), payload(i)) for i in range(5)])
    await disk.close()
    ns_dir = next((tmp_path / "l2").iterdir())
    stray = ns_dir / "00" / ".tmp-interrupted"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"half a blob")  # what a crash mid-write leaves behind

    again = DiskBackend(disk_config(tmp_path / "l2"))
    await again.start()
    try:
        assert await again.contains([key(0), key(4)]) == [True, True]  # answered even before the scan ends
        await again.wait_indexed()
        assert again.used()[1] == 5
        assert not stray.exists()
        got = await again.get([key(i) for i in range(5)])
        assert [bytes(g) for g in got if g is not None] == [payload(i) for i in range(5)]
    finally:
        await again.close()


async def test_io_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = await started(tmp_path / "l2")
    seen: list[int] = []
    original = disk_files.write_blob

    def spy(*args: object) -> int:
        seen.append(threading.get_ident())
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(disk_files, "write_blob", spy)
    try:
        await disk.put([(key(1), payload(1))])
        assert seen and threading.get_ident() not in seen
    finally:
        await disk.close()
