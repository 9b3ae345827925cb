"""A request's blocks get runs of consecutive slots (one DMA per run on the GPU): whole empty slabs, adjacent ones
first, then the best-fitting run of free slots; scattered slots only when the free space is scattered."""

from __future__ import annotations

import itertools

import pytest

from kvd.config import HostPoolConfig
from kvd.memory.host_pool import Entry, HostPool
from kvd.types import BlockKey

KiB = 1 << 10
SLAB = 64 * KiB
BLOCK = 2 * KiB  # 32 slots per slab, like 2 MiB blocks in 64 MiB slabs
PER_SLAB = SLAB // BLOCK
SLABS = 64


def keys(tag: str, count: int) -> list[BlockKey]:
    return [("ns", f"{tag}:{i}".encode()) for i in range(count)]


def runs(entries: list[Entry]) -> int:
    return 1 + sum(1 for a, b in itertools.pairwise(entries) if b.address != a.address + BLOCK)


def save(pool: HostPool, tag: str, count: int) -> list[Entry]:
    entries = pool.reserve_many(keys(tag, count), BLOCK)
    pool.commit_many(entries)
    return entries


@pytest.fixture(params=[0, 200], ids=["lru", "grace"])
def pool(request: pytest.FixtureRequest) -> HostPool:
    config = HostPoolConfig(
        capacity_bytes=SLABS * SLAB, slab_bytes=SLAB, populate_threads=1, reuse_grace_ms=request.param
    )
    made = HostPool(config)
    yield made
    made.close()


def test_large_saves_get_one_run_each_while_the_pool_fills_and_once_it_evicts(pool: HostPool) -> None:
    big = SLABS * PER_SLAB // 4  # 512 blocks: four fill the pool
    for r in range(12):
        entries = save(pool, f"r{r}", big)
        assert len(entries) == big
        assert runs(entries) <= 2, "a fresh 512-block save is one or two DMAs, not 512"
    assert pool.evictions >= 8 * big - len(pool) + big  # the later saves evicted the older ones
    assert len({e.address for key in keys("r11", big) if (e := pool.get(key)) is not None}) == big


def test_a_save_takes_whole_free_slabs_rather_than_scattered_holes(pool: HostPool) -> None:
    filled = save(pool, "fill", SLABS * PER_SLAB)
    for entry in filled[: 4 * PER_SLAB : 2]:  # every other slot of slabs 0-3: 64 scattered holes
        pool.discard(entry)
    for entry in filled[8 * PER_SLAB : 12 * PER_SLAB]:  # slabs 8-11 emptied: free for any block size
        pool.discard(entry)
    entries = save(pool, "new", 4 * PER_SLAB)
    assert runs(entries) == 1
    assert entries[0].address == filled[8 * PER_SLAB].address
    holes = save(pool, "holes", 4)  # nothing free but the holes: scattered, lowest first
    assert [e.address for e in holes] == [filled[i].address for i in (0, 2, 4, 6)]


def test_a_small_save_takes_the_shortest_run_it_fits(pool: HostPool) -> None:
    filled = save(pool, "fill", SLABS * PER_SLAB)
    for entry in filled[PER_SLAB : PER_SLAB + 16]:  # a 16-slot run in slab 1
        pool.discard(entry)
    for entry in filled[2 * PER_SLAB + 4 : 2 * PER_SLAB + 12]:  # an 8-slot run in slab 2
        pool.discard(entry)
    eight = save(pool, "eight", 8)
    assert runs(eight) == 1 and eight[0].address == filled[2 * PER_SLAB + 4].address
    sixteen = save(pool, "sixteen", 16)
    assert runs(sixteen) == 1 and sixteen[0].address == filled[PER_SLAB].address
    assert pool.evictions == 0 or pool.grace_s > 0  # a full pool retires blocks ahead of need (kvd.memory.retire)


def test_fragmented_free_space_still_serves_every_slot(pool: HostPool) -> None:
    filled = save(pool, "fill", SLABS * PER_SLAB)
    for entry in filled[::3]:
        pool.discard(entry)
    free = SLABS * PER_SLAB - len(pool)
    entries = save(pool, "again", free)
    assert len(entries) == free
    assert pool.evictions == 0 or pool.grace_s > 0  # a full pool retires blocks ahead of need (kvd.memory.retire)
    assert len({e.address for e in pool._entries.values()}) == SLABS * PER_SLAB  # no slot handed out twice
