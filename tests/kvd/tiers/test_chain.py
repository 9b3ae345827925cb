"""The tier chain in-process, with its real parts: a real host pool, a real disk directory, a real redis-server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kvd.config import DiskAdmission, HostPoolConfig, TiersConfig, TierWritePolicy
from kvd.memory.host_pool import HostPool
from kvd.tiers.base import StorageBackend
from kvd.tiers.chain import TieredBlockStore
from kvd.tiers.disk import DiskBackend
from kvd.tiers.kvstore import RedisBackend
from kvd.tiers.store import HostStore
from kvd.types import BlockKey, Tier
from tests.kvd.tiers.conftest import KiB, MiB, RedisServer, disk_config, redis_config

NS = "model|fp|tp0/1"
BLOCK = 16 * KiB  # 4 MiB pool: 256 blocks
# Anything below L1 is worth loading; every block leaving L1 goes to disk (admission by reuse: test_writeback.py).
GENEROUS = TiersConfig(recompute_us_per_token=1e6, disk_admission=DiskAdmission.ALWAYS)


def key(i: int) -> BlockKey:
    return NS, b"blk" + i.to_bytes(4, "big")


def content(i: int) -> bytes:
    return (i.to_bytes(4, "big") * (BLOCK // 4))[:BLOCK]


def save(store: TieredBlockStore, ids: Sequence[int]) -> None:
    """What a save does: reserve, let a transport copy (here: write the slot), commit."""
    plan = store.prepare_save([key(i) for i in ids], BLOCK)
    assert not plan.no_room
    for pos, entry in plan.to_write:
        store.pool.slot_view(entry)[:] = content(ids[pos])
    store.complete_save(plan, ok=True)


async def load(store: TieredBlockStore, ids: Sequence[int]) -> list[bytes | None]:
    entries = await store.prepare_load([key(i) for i in ids])
    try:
        return [None if e is None else bytes(store.pool.slot_view(e)) for e in entries]
    finally:
        store.complete_load(entries)


async def make(pool: HostPool, backends: list[StorageBackend], config: TiersConfig = GENEROUS) -> TieredBlockStore:
    store = TieredBlockStore(HostStore(pool), backends, config, write_queue_bytes=2 * MiB)
    await store.start()
    for b in backends:
        if isinstance(b, DiskBackend):
            await b.wait_indexed()
        if isinstance(b, RedisBackend):
            assert await b.wait_healthy(5)
    return store


async def fill_and_evict(store: TieredBlockStore, count: int) -> None:
    for start in range(0, count, 16):
        save(store, range(start, min(count, start + 16)))
        assert await store.flush(10)


async def test_evict_to_disk_hit_promote_load(pool: HostPool, tmp_path: Path) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = await make(pool, [disk])
    try:
        await fill_and_evict(store, 320)  # 256 fit in L1: the oldest went down on eviction
        assert pool.evictions >= 64
        assert disk.used()[1] >= 64
        hit, tiers = await store.lookup([key(i) for i in range(8)])
        assert hit == 8 and tiers == (Tier.DISK,) * 8
        await store.wait_fetches()  # promotion was started by the lookup
        assert all(key(i) in pool for i in range(8))
        hit, tiers = await store.lookup([key(i) for i in range(8)])
        assert tiers == (Tier.HOST_MEMORY,) * 8
        assert await load(store, range(8)) == [content(i) for i in range(8)]
        # A prefix: an L1 run, then a disk run, then the first block nowhere.
        hit, tiers = await store.lookup([key(300), key(10), key(11), key(9999), key(12)])
        assert hit == 3 and tiers == (Tier.HOST_MEMORY, Tier.DISK, Tier.DISK)
        snaps = {s.tier: s for s in store.snapshots()}
        assert snaps[Tier.DISK].hits >= 10 and snaps[Tier.DISK].blocks == disk.used()[1]
    finally:
        await store.close()


async def test_load_fetches_blocks_not_in_l1_once(pool: HostPool, tmp_path: Path) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = await make(pool, [disk])
    try:
        await fill_and_evict(store, 320)
        gets = disk.counters.gets
        hit, _ = await store.lookup([key(i) for i in range(20, 30)])  # starts the prefetch...
        assert hit == 10
        got = await load(store, range(20, 30))  # ...which the load awaits instead of reading again
        assert got == [content(i) for i in range(20, 30)]
        assert disk.counters.gets - gets == 10
        # Without a lookup first, the load fetches by itself.
        assert await load(store, [40, 41, 40]) == [content(40), content(41), content(40)]
        assert disk.counters.gets - gets == 12
    finally:
        await store.close()


async def test_l3_hit_from_a_second_node(pool: HostPool, redis_server: RedisServer) -> None:
    config = GENEROUS.model_copy(update={"write_policy": TierWritePolicy.WRITE_THROUGH})
    node_a = await make(pool, [RedisBackend(redis_config(redis_server))], config)
    other = HostPool(HostPoolConfig(capacity_bytes=4 * MiB, slab_bytes=64 * KiB, pin=False, populate_threads=1))
    node_b = await make(other, [RedisBackend(redis_config(redis_server))], config)
    try:
        save(node_a, range(6))
        assert (await node_a.lookup([key(i) for i in range(6)]))[0] == 6  # read-your-writes at once, from L1
        assert await node_a.flush(10)  # write-through happens in the background
        hit, tiers = await node_b.lookup([key(i) for i in range(7)])
        assert hit == 6 and tiers == (Tier.REMOTE,) * 6
        assert await load(node_b, range(6)) == [content(i) for i in range(6)]
        assert (await node_b.lookup([key(0)]))[1] == (Tier.HOST_MEMORY,)
    finally:
        await node_a.close()
        await node_b.close()
        other.close()


async def test_cost_model_rejects_a_tier_slower_than_recompute(pool: HostPool, tmp_path: Path) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = await make(pool, [disk], GENEROUS.model_copy(update={"recompute_us_per_token": 0.0001}))  # ~free
    try:
        await fill_and_evict(store, 320)
        assert (await store.lookup([key(0), key(1)]))[0] == 0  # on disk, but not worth loading
        assert store.counters()["tier_admission_rejected_blocks"] == 2
        hit, tiers = await store.lookup([key(300), key(301), key(0)])
        assert hit == 2 and tiers == (Tier.HOST_MEMORY,) * 2  # L1 always counts
    finally:
        await store.close()


async def test_measured_bandwidth_feeds_admission(pool: HostPool, tmp_path: Path) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = await make(pool, [disk])
    try:
        await fill_and_evict(store, 320)
        await load(store, range(0, 32))  # 512 KiB read from disk: a bandwidth sample
        cost = store.cost.tier(Tier.DISK)
        assert cost.bandwidth_bps is not None and cost.samples >= 1
        assert "tier_disk_read_mbps" in store.counters()
    finally:
        await store.close()


async def test_corrupt_disk_blob_is_never_loaded(pool: HostPool, tmp_path: Path) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = await make(pool, [disk], GENEROUS.model_copy(update={"promote_on_hit": False}))
    try:
        await fill_and_evict(store, 320)
        victim = disk.path_of(key(3))
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(data)
        got = await load(store, [2, 3, 4])
        assert got == [content(2), None, content(4)]  # a miss, never wrong bytes
        snaps = {s.tier: s for s in store.snapshots()}
        assert snaps[Tier.DISK].corrupt == 1
        assert not victim.exists()
        assert (await store.lookup([key(3)]))[0] == 0
    finally:
        await store.close()


async def test_redis_down_degrades_but_serves(pool: HostPool, tmp_path: Path, redis_server: RedisServer) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    remote = RedisBackend(redis_config(redis_server))
    config = GENEROUS.model_copy(update={"write_policy": TierWritePolicy.WRITE_THROUGH})
    store = await make(pool, [disk, remote], config)
    try:
        save(store, range(4))
        assert await store.flush(10)
        assert store.degraded_tiers() == ()
        redis_server.kill()
        save(store, range(4, 8))  # written to disk; the kvstore write is dropped
        assert await store.flush(10)
        hit, tiers = await store.lookup([key(i) for i in range(8)])
        assert hit == 8 and tiers == (Tier.HOST_MEMORY,) * 8
        assert await store.lookup([key(100)]) == (0, ())  # asks the dead kvstore: a quick miss
        assert store.degraded_tiers() == ("redis",)
        assert {s.name: s.healthy for s in store.snapshots()} == {"host": True, "disk": True, "redis": False}
        assert disk.used()[1] == 8
        redis_server.start()
        assert await remote.wait_healthy(5)
        assert store.degraded_tiers() == ()
    finally:
        await store.close()


@pytest.mark.parametrize("policy", list(TierWritePolicy))
async def test_read_your_writes_under_eviction(pool: HostPool, tmp_path: Path, policy: TierWritePolicy) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = await make(pool, [disk], GENEROUS.model_copy(update={"write_policy": policy}))
    try:
        for start in range(0, 400, 16):
            ids = range(start, start + 16)
            evicted = pool.evictions
            save(store, ids)
            # Found at once, and so are the blocks this save just evicted, before any write-down has run.
            assert (await store.lookup([key(i) for i in ids]))[0] == 16
            if pool.evictions > evicted:
                assert (await store.lookup([key(i) for i in range(start - 256, start - 240)]))[0] == 16
            assert await store.flush(10)
        hit, _ = await store.lookup([key(i) for i in range(0, 400)])
        assert hit == 400
        await store.wait_fetches()
        assert await load(store, [0, 150, 399]) == [content(0), content(150), content(399)]
    finally:
        await store.close()


async def test_write_queue_past_twice_its_limit_drops_and_counts(pool: HostPool, tmp_path: Path) -> None:
    disk = DiskBackend(disk_config(tmp_path / "l2"))
    store = TieredBlockStore(HostStore(pool), [disk], GENEROUS, write_queue_bytes=4 * BLOCK)
    await store.start()
    try:
        save(store, range(256))
        save(store, range(256, 272))  # 16 evictions at once, with no make_room before: room for 2 x 4
        counters = store.counters()
        assert counters["tier_write_down_dropped_queue_full_blocks"] == 8
        assert counters["tier_write_down_dropped_blocks"] == 8
        assert await store.flush(10)
        assert disk.used()[1] == 8
    finally:
        await store.close()
