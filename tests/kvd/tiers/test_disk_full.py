"""L2 on a real filesystem smaller than the tier's capacity (an 8 MiB tmpfs): it evicts to make room instead of
failing every write, degrades (one log line) only when nothing it can evict makes room, recovers by itself (one
line), and its bytes are always the bytes of its files."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from kvd.config import DiskTierConfig
from kvd.tiers.disk import DiskBackend
from kvd.tiers.disk_files import TMP_PREFIX
from tests.kvd.tiers.conftest import SMALL_FS_BYTES, KiB, MiB, fill_up

NS = "model|fp|tp0/1"
BLOCK = 64 * KiB


def key(i: int) -> tuple[str, bytes]:
    return NS, i.to_bytes(8, "big")


def payload(i: int) -> bytes:
    return i.to_bytes(4, "big") * (BLOCK // 4)


def file_bytes(root: Path) -> int:
    """What the tier's blob files hold (its probe and temporary files excluded)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX))


async def started(root: Path) -> DiskBackend:
    # Capacity 8x the filesystem: only the filesystem's own limit can stop the tier.
    config = DiskTierConfig(path=root, capacity_bytes=64 * MiB, io_threads=2, reserve_bytes=256 * KiB, retry_ms=50)
    disk = DiskBackend(config)
    await disk.start()
    await disk.wait_indexed()
    return disk


def tier_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("kvd.tiers") and r.levelno == level]


async def test_filesystem_smaller_than_capacity_evicts_instead_of_failing(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    disk = await started(small_fs / "l2")
    try:
        # 3x the filesystem, one block at a time (as write-downs come).
        results = [await disk.put([(key(i), payload(i))]) for i in range(3 * SMALL_FS_BYTES // BLOCK)]
        assert all(ok == [True] for ok in results), sum(ok == [False] for ok in results)
        assert disk.healthy and disk.counters.dropped_writes == 0
        used, _ = disk.used()
        assert used == file_bytes(small_fs / "l2")  # the tier's bytes are its files
        assert SMALL_FS_BYTES // 2 < used < SMALL_FS_BYTES and disk.counters.evictions > 0
        got = await disk.get([key(i) for i in range(len(results) - 4, len(results))])  # the newest are there
        assert [bytes(g) if g is not None else None for g in got] == [
            payload(i) for i in range(len(results) - 4, len(results))
        ]
        assert tier_records(caplog, logging.WARNING) == []
    finally:
        await disk.close()


async def test_full_filesystem_degrades_once_and_recovers_by_itself(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    disk = await started(small_fs / "l2")
    ballast = small_fs / "other-data"
    try:
        assert await disk.put([(key(i), payload(i)) for i in range(8)]) == [True] * 8
        # Something else fills the filesystem: the tier makes room by evicting its own blocks.
        fill_up(ballast)
        assert await disk.put([(key(100), payload(100))]) == [True]
        assert disk.healthy and disk.used()[1] < 9
        assert disk.used()[0] == file_bytes(small_fs / "l2")

        # Now nothing the tier can evict makes room: degraded, every write dropped at once, one warning in all.
        await disk.delete([key(i) for i in range(200)])
        fill_up(ballast)
        results = [await disk.put([(key(200 + i), payload(200 + i))]) for i in range(200)]
        assert results == [[False]] * 200
        assert not disk.healthy and disk.extra_counters()["degraded"] == 1
        assert disk.counters.dropped_writes == 200 and disk.dropped["degraded"] >= 199
        assert len(tier_records(caplog, logging.WARNING)) == 1, tier_records(caplog, logging.WARNING)
        assert disk.used() == (0, 0) and file_bytes(small_fs / "l2") == 0

        # The other data goes: the probe finds the filesystem writable and the tier serves again by itself.
        ballast.unlink()
        for _ in range(200):
            if disk.healthy:
                break
            await asyncio.sleep(0.05)
        assert disk.healthy
        assert await disk.put([(key(500), payload(500))]) == [True]
        assert len(tier_records(caplog, logging.WARNING)) == 1
        assert any("writable again" in m for m in tier_records(caplog, logging.INFO))
        assert disk.used()[0] == file_bytes(small_fs / "l2")
    finally:
        await disk.close()
