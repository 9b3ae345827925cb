"""L3 on a real 3-shard Redis Cluster (redis-server in cluster mode, joined by redis-cli): batches across shards,
a shard killed or hung mid-run (its blocks miss, the others hit, the tier degraded, then back by itself)."""

from __future__ import annotations

import time

from kvd.tiers.kvstore import RedisBackend
from tests.kvd.tiers.conftest import RedisClusterServers, redis_config

NS = "model|fp|tp0/1"
BLOCKS = 48


def key(i: int) -> tuple[str, bytes]:
    return NS, i.to_bytes(8, "big")


def payload(i: int, n: int = 16 * 1024) -> bytes:
    return i.to_bytes(4, "big") * (n // 4)


async def started(cluster: RedisClusterServers, **kwargs: object) -> RedisBackend:
    backend = RedisBackend(redis_config(cluster, **kwargs))
    await backend.start()
    assert await backend.wait_healthy(10)
    return backend


def keys_per_shard(cluster: RedisClusterServers) -> list[int]:
    out = []
    for node in cluster.nodes:
        client = node.client()
        out.append(int(client.dbsize()))  # type: ignore[arg-type]
        client.close()
    return out


def shard_of_block(backend: RedisBackend, cluster: RedisClusterServers, i: int) -> int:
    return cluster.shard_of(backend._key(key(i)))


async def test_batches_span_every_shard_and_read_back_identical(redis_cluster: RedisClusterServers) -> None:
    backend = await started(redis_cluster)
    try:
        assert await backend.put([(key(i), payload(i)) for i in range(BLOCKS)]) == [True] * BLOCKS
        per_shard = keys_per_shard(redis_cluster)
        assert sum(per_shard) == BLOCKS and all(n > 0 for n in per_shard), per_shard
        got = await backend.get([key(i) for i in range(BLOCKS)] + [key(999)])
        assert [bytes(g) if g is not None else None for g in got] == [payload(i) for i in range(BLOCKS)] + [None]
        sizes = await backend.sizes([key(0), key(999)])
        assert sizes[0] is not None and sizes[0] > 16 * 1024 and sizes[1] is None
        await backend.delete([key(i) for i in range(0, BLOCKS, 2)])
        assert sum(keys_per_shard(redis_cluster)) == BLOCKS // 2
        assert backend.used()[1] == BLOCKS // 2
        assert backend.extra_counters()["shards"] == 3
    finally:
        await backend.close()


async def test_shard_killed_mid_run_misses_only_its_blocks(redis_cluster: RedisClusterServers) -> None:
    backend = await started(redis_cluster)
    try:
        await backend.put([(key(i), payload(i)) for i in range(BLOCKS)])
        where = {i: shard_of_block(backend, redis_cluster, i) for i in range(BLOCKS + 16)}
        redis_cluster.kill_shard(1)

        start = time.monotonic()
        got = await backend.get([key(i) for i in range(BLOCKS)])
        for i, g in enumerate(got):
            if where[i] == 1:
                assert g is None  # its shard is gone: a miss
            else:
                assert g is not None and bytes(g) == payload(i)  # the others still hit, byte-identical
        assert not backend.healthy and backend.extra_counters()["shards_down"] == 1
        # While the shard is down its keys answer at once; the other shards keep taking writes.
        fresh = list(range(BLOCKS, BLOCKS + 16))
        stored = await backend.put([(key(i), payload(i)) for i in fresh])
        assert stored == [where[i] != 1 for i in fresh]
        assert time.monotonic() - start < 2.0

        redis_cluster.restart_shard(1)  # back empty (nothing persisted), same node id and slots
        assert await backend.wait_healthy(10)
        assert await backend.put([(key(i), payload(i)) for i in fresh]) == [True] * len(fresh)
        got = await backend.get([key(i) for i in fresh])
        assert [bytes(g) if g is not None else None for g in got] == [payload(i) for i in fresh]
        assert backend.disconnects == 1
    finally:
        await backend.close()


async def test_hung_shard_costs_one_timeout(redis_cluster: RedisClusterServers) -> None:
    backend = await started(redis_cluster, timeout_ms=200)
    try:
        await backend.put([(key(i), payload(i)) for i in range(BLOCKS)])
        where = {i: shard_of_block(backend, redis_cluster, i) for i in range(BLOCKS)}
        redis_cluster.nodes[2].stop()  # SIGSTOP: connections open, nothing answers
        try:
            start = time.monotonic()
            got = await backend.get([key(i) for i in range(BLOCKS)])
            assert time.monotonic() - start < 1.5  # about one socket timeout, not the length of the hang
            assert [g is None for g in got] == [where[i] == 2 for i in range(BLOCKS)]
            assert not backend.healthy
            start = time.monotonic()
            assert await backend.sizes([key(i) for i in range(BLOCKS) if where[i] == 2][:4]) == [None] * 4
            assert time.monotonic() - start < 0.1  # marked down: answered without waiting
        finally:
            redis_cluster.nodes[2].cont()
        assert await backend.wait_healthy(10)
        got = await backend.get([key(i) for i in range(BLOCKS)])
        assert all(g is not None for g in got)
    finally:
        await backend.close()


async def test_cluster_unreachable_at_start_then_comes_up(redis_cluster: RedisClusterServers) -> None:
    for node in redis_cluster.nodes:
        node.kill()
    backend = RedisBackend(redis_config(redis_cluster, cluster_nodes=tuple(redis_cluster.addresses[1:])))
    await backend.start()
    try:
        assert await backend.get([key(1)]) == [None]
        assert await backend.put([(key(1), payload(1))]) == [False]
        assert not backend.healthy
        for i in range(len(redis_cluster.nodes)):
            redis_cluster.nodes[i].start()
        redis_cluster.wait_ok()
        assert await backend.wait_healthy(10)
        assert await backend.put([(key(1), payload(1))]) == [True]
    finally:
        await backend.close()
