"""Where the host pool puts blocks once it is full: a save that evicts the oldest blocks takes their slots in order,
so its copies still merge into one DMA per run of consecutive slots; and a slot is found without scanning slabs."""

from __future__ import annotations

import ctypes
import itertools
import os
from pathlib import Path

import pytest

from kvd.config import HostPoolConfig
from kvd.memory.host_pool import Entry, HostPool
from kvd.memory.region import node_cpus
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


def test_a_numa_nodes_cpus_are_read_from_its_cpulist(tmp_path: Path) -> None:
    (tmp_path / "node1").mkdir()
    (tmp_path / "node1" / "cpulist").write_text("0-3,8,10-11\n")
    assert node_cpus(1, tmp_path) == {0, 1, 2, 3, 8, 10, 11}
    assert node_cpus(2, tmp_path) == set()  # no such node


@pytest.mark.parametrize("node", [0, 999])
def test_the_pool_is_first_touched_from_its_numa_nodes_cpus(node: int, caplog: pytest.LogCaptureFixture) -> None:
    """host_pool.numa_node: the populating threads run on that node's CPUs (so its pages land there); a node with
    no CPUs the daemon may use is one warning, and the pool is populated anyway."""
    seen: set[frozenset[int]] = set()
    pool = HostPool(HostPoolConfig(capacity_bytes=SLABS * SLAB, slab_bytes=SLAB, populate_threads=2, numa_node=node))
    real_memset = ctypes.memset

    def memset(address: int, value: int, count: int) -> int:
        seen.add(frozenset(os.sched_getaffinity(0)))
        return int(real_memset(address, value, count))

    try:
        with caplog.at_level("WARNING"), pytest.MonkeyPatch.context() as patch:
            patch.setattr(ctypes, "memset", memset)
            pool.populate()
    finally:
        pool.close()
    expected = node_cpus(node) & os.sched_getaffinity(0)
    assert seen == {frozenset(expected or os.sched_getaffinity(0))}
    assert ("numa_node" in caplog.text) is (not expected)
