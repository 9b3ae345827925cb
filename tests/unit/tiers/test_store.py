"""The L1 store's verbs, as the service uses them around a copy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from kvd.config import HostPoolConfig
from kvd.memory.host_pool import HostPool
from kvd.tiers.store import HostStore
from kvd.types import BlockKey, Tier

BLOCK = 4096


def key(i: int) -> BlockKey:
    return ("ns", bytes([i]))


@pytest.fixture
def pool() -> Iterator[HostPool]:
    made = HostPool(HostPoolConfig(capacity_bytes=1 << 20, slab_bytes=256 << 10, populate_threads=1))
    yield made
    made.close()


async def test_a_save_reserves_each_new_key_once_and_commits_on_success(pool: HostPool) -> None:
    store = HostStore(pool)
    plan = store.prepare_save([key(1), key(2), key(1)], BLOCK)
    assert [i for i, _ in plan.to_write] == [0, 1] and not plan.in_flight and not plan.no_room
    assert (await store.lookup([key(1)]))[0] == 0  # not visible before the copy is complete
    store.complete_save(plan, ok=True)
    assert await store.lookup([key(1), key(2), key(3)]) == (2, (Tier.HOST_MEMORY,) * 2)
    assert store.prepare_save([key(1)], BLOCK).to_write == []  # stored: nothing to do
    snapshot = store.snapshots()[0]
    assert (snapshot.hits, snapshot.misses, snapshot.blocks) == (2, 2, 2)
    assert store.max_block_bytes == 256 << 10 and store.degraded_tiers() == ()
    assert store.counters() == {"host_grace_cut": 0}


async def test_a_save_of_a_key_being_written_waits_for_that_write(pool: HostPool) -> None:
    store = HostStore(pool)
    first = store.prepare_save([key(1)], BLOCK)
    second = store.prepare_save([key(1)], BLOCK)
    assert second.to_write == [] and [i for i, _ in second.in_flight] == [0]
    store.complete_save(first, ok=False)  # the first copy failed: the slot is dropped, the waiter told
    assert await second.in_flight[0][1] is False
    assert key(1) not in pool and pool.used_bytes == 0


async def test_a_load_pins_what_is_stored_until_it_completes(pool: HostPool) -> None:
    store = HostStore(pool)
    plan = store.prepare_save([key(1)], BLOCK)
    store.complete_save(plan, ok=True)
    entries = await store.prepare_load([key(1), key(2)])
    assert entries[1] is None and entries[0] is not None and entries[0].pins == 1
    store.complete_load(entries)
    assert entries[0].pins == 0


async def test_close_releases_saves_still_waiting(pool: HostPool) -> None:
    store = HostStore(pool)
    store.prepare_save([key(1)], BLOCK)
    waiting = store.prepare_save([key(1)], BLOCK).in_flight[0][1]
    await store.close()
    assert waiting.done() and waiting.result() is False


async def test_a_save_on_a_full_pool_retires_blocks_ahead_only_after_it_is_committed() -> None:
    """Retiring blocks ahead of need is upkeep for later saves: it runs on the loop's turn after the save that
    reserved is committed, never between its request and its copy (nor while its copy waits to be queued)."""
    config = HostPoolConfig(capacity_bytes=1 << 20, slab_bytes=256 << 10, populate_threads=1, reuse_grace_ms=60_000)
    pool = HostPool(config)
    try:
        store = HostStore(pool)
        per_pool = (1 << 20) // BLOCK
        for i in range(per_pool):  # full, every block in the index
            store.complete_save(store.prepare_save([("ns", i.to_bytes(4, "big"))], BLOCK), ok=True)
            await asyncio.sleep(0)
        retired_later = 0
        for i in range(per_pool // 2):  # saves on the full pool: each takes a slot retired ahead
            evictions, new = pool.evictions, ("ns", b"new" + i.to_bytes(4, "big"))
            plan = store.prepare_save([new], BLOCK)
            await asyncio.sleep(0)  # the loop's turns while the copy is queued and runs
            assert pool.evictions == evictions, "nothing retired while the save is planned and copied"
            store.complete_save(plan, ok=True)
            assert new in pool
            await asyncio.sleep(0)  # the turn after the commit
            retired_later += pool.evictions - evictions
        assert retired_later > 0, "the upkeep retired blocks ahead of the next saves"
    finally:
        pool.close()


async def test_retire_ahead_left_on_the_loop_does_nothing_once_the_pool_is_closed() -> None:
    """Saves committed just before shutdown leave their upkeep on the loop; it must not touch the released pool."""
    config = HostPoolConfig(capacity_bytes=1 << 20, slab_bytes=256 << 10, populate_threads=1, reuse_grace_ms=60_000)
    pool = HostPool(config)
    store = HostStore(pool)
    pool.evict_hooks.append(lambda entry, view: view[0])  # a write-on-evict hook reads the retiring block's bytes
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    for i in range((1 << 20) // BLOCK):  # the pool filled without a turn of the loop: every upkeep still scheduled
        store.complete_save(store.prepare_save([("ns", i.to_bytes(4, "big"))], BLOCK), ok=True)
    pool.close()
    await asyncio.sleep(0)  # the upkeeps' turn: no-ops now, not reads of a released pool
    assert not errors and pool.evictions == 0
