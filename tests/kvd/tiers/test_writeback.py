"""The write-down policies with real parts (a real host pool, a real disk directory, a real redis-server): a save
waits for the write-down of the blocks it evicts instead of losing them, what is still dropped is counted per
reason, and the disk takes only blocks that were reused."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from kvd.config import DiskAdmission, TiersConfig
from kvd.memory.host_pool import HostPool
from kvd.tiers.base import StorageBackend
from kvd.tiers.chain import TieredBlockStore
from kvd.tiers.disk import DiskBackend
from kvd.tiers.kvstore import RedisBackend
from kvd.tiers.store import HostStore
from tests.kvd.tiers.conftest import RedisServer, disk_config, redis_config
from tests.kvd.tiers.test_chain import BLOCK, content, key

L1_BLOCKS = 256  # the 4 MiB pool of 16 KiB blocks
CONFIG = TiersConfig(recompute_us_per_token=1e6)  # the defaults otherwise: write_on_evict, disk admission by reuse


async def make(
    pool: HostPool, backends: list[StorageBackend], config: TiersConfig = CONFIG, queue_blocks: int = 32
) -> TieredBlockStore:
    store = TieredBlockStore(HostStore(pool), backends, config, write_queue_bytes=queue_blocks * BLOCK)
    await store.start()
    for b in backends:
        if isinstance(b, DiskBackend):
            await b.wait_indexed()
        if isinstance(b, RedisBackend):
            assert await b.wait_healthy(5)
    return store


async def save(store: TieredBlockStore, ids: Sequence[int]) -> None:
    """What the service does for a save: make room (may wait), reserve, copy, commit."""
    keys = [key(i) for i in ids]
    await store.make_room(keys, BLOCK)
    plan = store.prepare_save(keys, BLOCK)
    assert not plan.no_room
    for pos, entry in plan.to_write:
        store.pool.slot_view(entry)[:] = content(ids[pos])
    store.complete_save(plan, ok=True)


async def test_eviction_waits_for_the_write_down_instead_of_dropping(pool: HostPool, redis_server: RedisServer) -> None:
    remote = RedisBackend(redis_config(redis_server, timeout_ms=2000))
    store = await make(pool, [remote])
    raw = redis_server.client()
    try:
        await save(store, range(L1_BLOCKS))
        # The store stalls every write for a while (slow, not down): blocks leave L1 faster than they go down.
        raw.execute_command("CLIENT", "PAUSE", "600", "WRITE")
        for start in range(L1_BLOCKS, L1_BLOCKS + 160, 16):
            await save(store, range(start, start + 16))
        assert await store.flush(10)
        counters = store.counters()
        assert counters["tier_write_down_waits"] > 0
        assert counters["tier_write_down_dropped_blocks"] == 0, counters
        # Every completed save is somewhere: the evicted ones in the kvstore, the rest in L1.
        everything = [key(i) for i in range(L1_BLOCKS + 160)]
        hit, _ = await store.lookup(everything)
        assert hit == len(everything)
        assert remote.used()[1] == 160
    finally:
        raw.execute_command("CLIENT", "UNPAUSE")
        raw.close()
        await store.close()


async def test_what_is_still_dropped_is_counted_per_reason(pool: HostPool, redis_server: RedisServer) -> None:
    remote = RedisBackend(redis_config(redis_server))
    store = await make(pool, [remote])
    try:
        await save(store, range(L1_BLOCKS))
        redis_server.kill()
        await remote.get([key(0)])  # the tier finds out it is down
        assert not remote.healthy
        start = asyncio.get_running_loop().time()
        await save(store, range(L1_BLOCKS, L1_BLOCKS + 16))  # no healthy tier to wait for: no wait
        assert asyncio.get_running_loop().time() - start < 0.5
        counters = store.counters()
        assert counters["tier_write_down_dropped_no_healthy_tier_blocks"] == 16
        assert counters["tier_write_down_dropped_blocks"] == 16
    finally:
        await store.close()


async def test_disk_takes_only_reused_blocks(pool: HostPool, tmp_path: Path) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = await make(pool, [disk], CONFIG.model_copy(update={"disk_admission": DiskAdmission.REUSED_ONLY}))
    try:
        await save(store, range(L1_BLOCKS))
        hot = list(range(0, 16))
        assert (await store.lookup([key(i) for i in hot]))[0] == 16  # reused while in L1
        for start in range(L1_BLOCKS, 3 * L1_BLOCKS, 16):  # evicts all of the first 256 (and the next 256)
            await save(store, range(start, start + 16))
        assert await store.flush(10)
        # Only the reused blocks went to disk; the others were turned away (counted), not rewritten at full rate.
        assert await disk.contains([key(i) for i in hot]) == [True] * 16
        assert disk.used()[1] == 16 and disk.counters.bytes_written == disk.used()[0]
        counters = store.counters()
        assert counters["tier_disk_not_admitted_blocks"] == 2 * L1_BLOCKS - 16
        assert counters["tier_write_down_dropped_not_admitted_blocks"] == 2 * L1_BLOCKS - 16

        # A block turned away and saved again was reused after all: the second time it leaves L1 it goes down.
        again = list(range(16, 32))
        await save(store, again)
        for start in range(3 * L1_BLOCKS, 4 * L1_BLOCKS, 16):
            await save(store, range(start, start + 16))
        assert await store.flush(10)
        assert await disk.contains([key(i) for i in again]) == [True] * 16
    finally:
        await store.close()


async def test_reused_never_drops_a_block_that_has_no_other_home(pool: HostPool, tmp_path: Path) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = await make(pool, [disk])  # the default, "reused", and no kvstore: the disk is every block's only home
    try:
        for start in range(0, 2 * L1_BLOCKS, 16):
            await save(store, range(start, start + 16))
        assert await store.flush(10)
        assert disk.used()[1] == L1_BLOCKS
        assert store.counters()["tier_write_down_dropped_blocks"] == 0
        hit, _ = await store.lookup([key(i) for i in range(2 * L1_BLOCKS)])
        assert hit == 2 * L1_BLOCKS  # read-your-writes, whatever left L1
    finally:
        await store.close()


async def test_global_store_takes_what_the_disk_turns_away(
    pool: HostPool, tmp_path: Path, redis_server: RedisServer
) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    remote = RedisBackend(redis_config(redis_server))
    store = await make(pool, [disk, remote])
    try:
        for start in range(0, 2 * L1_BLOCKS, 16):
            await save(store, range(start, start + 16))
        assert await store.flush(10)
        assert disk.used()[1] == 0 and remote.used()[1] == L1_BLOCKS  # never reused: the kvstore only
        assert store.counters()["tier_write_down_dropped_blocks"] == 0
        hit, _ = await store.lookup([key(i) for i in range(2 * L1_BLOCKS)])
        assert hit == 2 * L1_BLOCKS

        # The kvstore goes down: the disk takes what it turned away, rather than those blocks being lost.
        redis_server.kill()
        await remote.get([key(0)])
        assert not remote.healthy
        for start in range(2 * L1_BLOCKS, 3 * L1_BLOCKS, 16):
            await save(store, range(start, start + 16))
        assert await store.flush(10)
        assert disk.used()[1] == L1_BLOCKS
        assert store.counters()["tier_write_down_dropped_blocks"] == 0
    finally:
        await store.close()
