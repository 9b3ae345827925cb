"""The host pool's bookkeeping: slots, LRU eviction within a block size, slab stealing between block sizes, and the
two kinds of slot that are never evicted (being written, being read)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from kvd.config import HostPoolConfig
from kvd.errors import InvalidArgument, ResourceExhausted
from kvd.memory.host_pool import Entry, HostPool, SlotState
from kvd.types import BlockKey

KiB = 1 << 10
SLAB = 256 * KiB  # four slabs in the smallest pool the config allows (1 MiB)
HALF, QUARTER, SMALL = SLAB // 2, SLAB // 4, SLAB // 16


def key(i: int) -> BlockKey:
    return ("ns", i.to_bytes(4, "big"))


def make_pool(grace_ms: int) -> HostPool:
    return HostPool(
        HostPoolConfig(capacity_bytes=4 * SLAB, slab_bytes=SLAB, populate_threads=1, reuse_grace_ms=grace_ms)
    )


@pytest.fixture
def pool() -> HostPool:
    """Plain LRU: a slot is reused the moment its block is evicted (the grace period has its own tests below)."""
    made = make_pool(grace_ms=0)
    yield made
    made.close()


def stored(pool: HostPool, i: int, nbytes: int) -> Entry:
    entry = pool.reserve(key(i), nbytes)
    pool.commit(entry)
    return entry


def test_a_reserved_slot_is_invisible_until_committed(pool: HostPool) -> None:
    entry = pool.reserve(key(1), SMALL)
    assert entry.state is SlotState.RESERVED and key(1) not in pool and pool.get(key(1)) is None
    pool.commit(entry)
    assert pool.get(key(1)) is entry and pool.used_bytes == SMALL
    assert pool.region.base_address == pool.base_address and pool.region.nbytes == pool.capacity_bytes


def test_a_discarded_slot_is_reused(pool: HostPool) -> None:
    first = stored(pool, 1, SMALL)
    pool.discard(first)
    assert key(1) not in pool and pool.used_bytes == 0
    again = stored(pool, 2, SMALL)
    assert again.address == first.address


def test_consecutive_reservations_take_consecutive_slots(pool: HostPool) -> None:
    entries = [stored(pool, i, SMALL) for i in range(4)]
    assert [e.address - entries[0].address for e in entries] == [0, SMALL, 2 * SMALL, 3 * SMALL]


def test_refuses_blocks_larger_than_a_slab_and_keys_already_there(pool: HostPool) -> None:
    with pytest.raises(InvalidArgument):
        pool.reserve(key(1), SLAB + 1)
    stored(pool, 1, SMALL)
    with pytest.raises(InvalidArgument):
        pool.reserve(key(1), SMALL)


def test_a_full_pool_evicts_the_least_recently_used_block(pool: HostPool) -> None:
    per_slab = SLAB // (QUARTER)
    for i in range(4 * per_slab):
        stored(pool, i, QUARTER)
    pool.touch(pool.get(key(0)))  # 0 is now the most recent; 1 the oldest
    evicted: list[BlockKey] = []
    pool.evict_hooks.append(lambda entry, view: evicted.append(entry.key))
    stored(pool, 100, QUARTER)
    assert evicted == [key(1)] and key(0) in pool and pool.evictions == 1


def test_touch_prefix_counts_the_stored_prefix_and_refreshes_it(pool: HostPool) -> None:
    for i in range(3):
        stored(pool, i, SMALL)
    assert pool.touch_prefix([key(0), key(1), key(9), key(2)]) == 2


def test_pinned_and_reserved_blocks_are_never_evicted(pool: HostPool) -> None:
    per_slab = SLAB // (HALF)
    entries = [stored(pool, i, HALF) for i in range(4 * per_slab - 1)]
    for entry in entries:
        pool.pin(entry)
    writing = pool.reserve(key(99), HALF)  # the last slot: being written
    with pytest.raises(ResourceExhausted):
        pool.reserve(key(100), HALF)
    assert all(pool.get(e.key) is e for e in entries) and writing.state is SlotState.RESERVED
    with pytest.raises(InvalidArgument):
        pool.discard(entries[0])  # being read
    pool.unpin(entries[0])
    assert pool.reserve(key(100), HALF) is not None  # unpinned: evictable again


def test_a_block_size_with_nothing_to_evict_steals_the_lru_slab_of_another(pool: HostPool) -> None:
    small = [stored(pool, i, QUARTER) for i in range(4 * (SLAB // (QUARTER)))]  # every slab: quarter-slab blocks
    for entry in small[4:]:
        pool.touch(entry)  # slab 0's blocks are now the least recently used
    evicted: list[BlockKey] = []
    pool.evict_hooks.append(lambda entry, view: evicted.append(entry.key))
    big = stored(pool, 1000, HALF)
    assert sorted(evicted) == [key(i) for i in range(4)]  # one slab's worth, whole
    assert big.slab == small[0].slab and all(e.key in pool for e in small[4:])


def test_a_slab_with_a_pinned_block_is_not_stolen(pool: HostPool) -> None:
    small = [stored(pool, i, QUARTER) for i in range(4 * (SLAB // (QUARTER)))]
    for slab in range(4):
        pool.pin(next(e for e in small if e.slab == slab))
    with pytest.raises(ResourceExhausted):
        pool.reserve(key(1000), HALF)


def test_an_emptied_slab_serves_another_block_size(pool: HostPool) -> None:
    entries = [stored(pool, i, QUARTER) for i in range(4)]  # one slab
    for entry in entries:
        pool.discard(entry)
    big = stored(pool, 10, SLAB)
    assert big.slab == entries[0].slab and pool.evictions == 0


class Listener:
    """Records what the pool tells the published index."""

    def __init__(self) -> None:
        self.published: set[BlockKey] = set()

    def stored(self, key: BlockKey, source: object) -> None:
        self.published.add(key)

    def dropped(self, key: BlockKey, source: object) -> None:
        self.published.discard(key)

    def stored_many(self, keys: Sequence[BlockKey], source: object) -> None:
        self.published.update(keys)

    def staging(self, keys: Sequence[BlockKey]) -> None:
        return None  # published at commit, through stored_many

    def dropped_many(self, keys: Sequence[BlockKey], source: object) -> None:
        self.published.difference_update(keys)


def test_an_evicted_block_leaves_the_index_but_stays_loadable_for_the_grace_period() -> None:
    pool = make_pool(grace_ms=60_000)
    listener = Listener()
    pool.listener = listener
    try:
        per_pool = 4 * (SLAB // SMALL)
        entries = [stored(pool, i, SMALL) for i in range(per_pool)]
        for i, entry in enumerate(entries):
            pool.slot_view(entry)[:4] = i.to_bytes(4, "big")
        # Full now: the least recently used retired ahead already (a quarter at most), the rest in the index.
        assert 0 < sum(e.state is SlotState.RETIRED for e in entries) <= per_pool // 4
        assert listener.published == {e.key for e in entries if e.state is SlotState.READY}
        extra = [stored(pool, 1000 + i, SMALL) for i in range(8)]  # full: each takes the slot of an LRU block
        assert pool.grace_cut == 8, "every slot taken was a retired block within its grace"
        retired = [e for e in entries if e.state is SlotState.RETIRED]
        assert retired, "a full pool under reserves keeps blocks retired ahead"
        for entry in retired:
            assert entry.key not in pool and entry.key not in listener.published  # gone from lookups and the index
        # A load of a retired block takes it back, bytes intact: the lookup that found it was right.
        back = pool.reclaim(retired[0].key)
        assert back is retired[0] and back.state is SlotState.READY and back.key in listener.published
        assert bytes(pool.slot_view(back)[:4]) == entries.index(back).to_bytes(4, "big")
        assert all(e.key in pool for e in extra)
    finally:
        pool.close()


def test_a_retired_slot_is_reused_only_after_its_grace() -> None:
    pool = make_pool(grace_ms=50)
    try:
        per_pool = 4 * (SLAB // SMALL)
        for i in range(per_pool):
            stored(pool, i, SMALL)
        stored(pool, 1000, SMALL)  # cuts the grace of the one it needs; retires one more ahead
        cut = pool.grace_cut
        time.sleep(0.1)
        stored(pool, 1001, SMALL)  # the one retired ahead has had its grace: no cut
        assert pool.grace_cut == cut
        retired = pool.reserve(key(5000), SMALL)
        pool.commit(retired)
        assert pool.evictions >= 3
    finally:
        pool.close()
