"""Where the host pool puts blocks once it is full: a save that evicts the oldest blocks takes their slots in order,
so its copies still merge into one DMA per run of consecutive slots; and a slot is found without scanning slabs."""

from __future__ import annotations

import itertools

import pytest

from kvd.config import HostPoolConfig
from kvd.memory.host_pool import Entry, HostPool
from kvd.types import BlockKey

KiB = 1 << 10
SLAB = 64 * KiB
BLOCK = 2 * KiB  # 32 slots per slab, like 2 MiB blocks in 64 MiB slabs
SLABS = 16


def key(tag: str, i: int) -> BlockKey:
    return ("ns", f"{tag}:{i}".encode())


@pytest.fixture
def pool() -> HostPool:
    # Plain LRU (slots reused the moment their block is evicted): placement is what these tests look at.
    config = HostPoolConfig(capacity_bytes=SLABS * SLAB, slab_bytes=SLAB, populate_threads=1, reuse_grace_ms=0)
    made = HostPool(config)
    yield made
    made.close()


def save(pool: HostPool, tag: str, count: int) -> list[Entry]:
    entries = [pool.reserve(key(tag, i), BLOCK) for i in range(count)]
    for entry in entries:
        pool.commit(entry)
    return entries


def runs(entries: list[Entry]) -> int:
    return 1 + sum(1 for a, b in itertools.pairwise(entries) if b.address != a.address + BLOCK)


def test_saves_into_a_full_pool_take_the_evicted_slots_in_order(pool: HostPool) -> None:
    per_request = SLABS * SLAB // BLOCK // 4  # four requests fill the pool
    first = [save(pool, f"r{r}", per_request) for r in range(4)]
    assert [runs(entries) for entries in first] == [1, 1, 1, 1]
    for r in range(4, 12):  # each new request evicts the oldest one and reuses its slots
        entries = save(pool, f"r{r}", per_request)
        assert runs(entries) == 1
        assert [e.address for e in entries] == [e.address for e in first[r % 4]]
        assert pool.evictions == (r - 3) * per_request


def test_a_slot_freed_in_a_full_slab_is_found_again(pool: HostPool) -> None:
    entries = save(pool, "fill", SLABS * SLAB // BLOCK)
    victim = entries[100]
    pool.discard(victim)
    again = pool.reserve(key("again", 0), BLOCK)
    assert again.address == victim.address and pool.evictions == 0
    pool.discard(again)
    for entry in entries[:32]:  # a whole slab emptied goes back to the free slabs, for any block size
        pool.discard(entry)
    other = pool.reserve(key("other", 0), SLAB)
    assert other.address == entries[0].address


def test_a_load_pins_its_stored_blocks_and_makes_them_the_most_recently_used(pool: HostPool) -> None:
    first, second = save(pool, "a", 2), save(pool, "b", SLABS * SLAB // BLOCK - 2)  # the pool is full
    got = pool.pin_stored([key("a", 0), key("missing", 0), key("a", 1)])
    assert got == [first[0], None, first[1]] and first[0].pins == first[1].pins == 1
    newcomer = pool.reserve(key("c", 0), BLOCK)  # evicts the least recently used: not the pinned, touched ones
    assert key("a", 0) in pool and key("a", 1) in pool and key("b", 0) not in pool
    assert newcomer.address == second[0].address
    for entry in first:
        pool.unpin(entry)
