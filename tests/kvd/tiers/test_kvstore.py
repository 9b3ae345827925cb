"""L3 against a real redis-server: round trip, corruption, and the server killed, restarted and paused."""

from __future__ import annotations

import asyncio
import time

import redis

from kvd.tiers.kvstore import RedisBackend
from tests.kvd.tiers.conftest import RedisServer, redis_config

NS = "model|fp|tp0/1"


def key(i: int) -> tuple[str, bytes]:
    return NS, i.to_bytes(8, "big")


def payload(i: int, n: int = 64 * 1024) -> bytes:
    return bytes([i % 251]) * n


async def started(server: RedisServer, **kwargs: object) -> RedisBackend:
    backend = RedisBackend(redis_config(server, **kwargs))
    await backend.start()
    assert await backend.wait_healthy(5)
    return backend


async def test_round_trip(redis_server: RedisServer) -> None:
    backend = await started(redis_server)
    try:
        assert await backend.put([(key(i), payload(i)) for i in range(3)]) == [True] * 3
        got = await backend.get([key(2), key(7), key(0)])
        assert [bytes(g) if g is not None else None for g in got] == [payload(2), None, payload(0)]
        sizes = await backend.sizes([key(0), key(7)])
        assert sizes[0] is not None and sizes[0] > 64 * 1024 and sizes[1] is None
        await backend.delete([key(0)])
        assert await backend.contains([key(0), key(1)]) == [False, True]
        assert backend.snapshot(0, 0).healthy
    finally:
        await backend.close()


async def test_flipped_byte_is_a_miss_counted_and_removed(redis_server: RedisServer) -> None:
    backend = await started(redis_server, key_prefix="corrupt:")
    try:
        await backend.put([(key(1), payload(1))])
        raw = redis_server.client()
        (name,) = raw.keys("corrupt:*")
        value = bytearray(raw.get(name))  # type: ignore[arg-type]
        value[-10] ^= 0x80
        raw.set(name, bytes(value))
        assert await backend.get([key(1)]) == [None]
        assert backend.counters.corrupt == 1
        assert raw.exists(name) == 0
        raw.close()
    finally:
        await backend.close()


async def test_server_killed_then_restarted(redis_server: RedisServer) -> None:
    backend = await started(redis_server)
    try:
        await backend.put([(key(1), payload(1))])
        redis_server.kill()
        start = time.monotonic()
        assert await backend.get([key(1)]) == [None]  # a miss, not an exception
        assert not backend.healthy
        # While down, calls answer at once instead of each waiting for a timeout.
        assert await backend.put([(key(2), payload(2))]) == [False]
        assert await backend.sizes([key(1)]) == [None]
        assert time.monotonic() - start < 1.0
        assert backend.counters.dropped_writes == 1

        redis_server.start()  # empty: nothing was persisted
        assert await backend.wait_healthy(5)
        # The store came back empty: the blocks this daemon had written are checked at once, not a minute later.
        for _ in range(100):
            if backend.used() == (0, 0):
                break
            await asyncio.sleep(0.02)
        assert backend.used() == (0, 0)
        assert await backend.put([(key(3), payload(3))]) == [True]
        (got,) = await backend.get([key(3)])
        assert got is not None and bytes(got) == payload(3)
        assert backend.disconnects == 1
    finally:
        await backend.close()


async def test_slow_server_times_out_bounded(redis_server: RedisServer) -> None:
    backend = await started(redis_server, timeout_ms=200)
    raw = redis_server.client()
    try:
        await backend.put([(key(1), payload(1))])
        raw.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        start = time.monotonic()
        assert await backend.sizes([key(1)]) == [None]
        elapsed = time.monotonic() - start
        assert elapsed < 0.9, elapsed  # one socket timeout (200 ms), not the pause
        assert not backend.healthy
        raw.execute_command("CLIENT", "UNPAUSE")
        assert await backend.wait_healthy(5)
        assert await backend.contains([key(1)]) == [True]
    finally:
        raw.execute_command("CLIENT", "UNPAUSE")
        raw.close()
        await backend.close()


async def test_unreachable_at_start_then_comes_up(redis_server: RedisServer) -> None:
    redis_server.kill()
    backend = RedisBackend(redis_config(redis_server))
    await backend.start()
    try:
        await asyncio.sleep(0)
        assert await backend.get([key(1)]) == [None]
        assert not backend.healthy
        redis_server.start()
        assert await backend.wait_healthy(5)
    finally:
        await backend.close()


def store_bytes(raw: redis.Redis, pattern: str) -> tuple[int, int]:
    """(bytes, keys) under `pattern`, as the store says (STRLEN of each)."""
    names = list(raw.scan_iter(match=pattern))
    return sum(int(raw.strlen(n)) for n in names), len(names)  # type: ignore[arg-type]


async def test_accounting_matches_the_store(redis_server: RedisServer) -> None:
    a = await started(redis_server, key_prefix="acct:")
    b = await started(redis_server, key_prefix="acct:")
    raw = redis_server.client()
    try:
        for _ in range(3):  # rewrites of the same blocks are not new bytes
            assert await a.put([(key(i), payload(i)) for i in range(10)]) == [True] * 10
        assert a.used() == store_bytes(raw, "acct:*") and a.used()[1] == 10
        assert a.counters.bytes_written == 3 * a.used()[0]  # what it sent is another figure, exported apart

        # A second node writes the same blocks and five more: it owns only what it created.
        assert await b.put([(key(i), payload(i)) for i in range(15)]) == [True] * 15
        assert b.used()[1] == 5 and a.used()[1] + b.used()[1] == store_bytes(raw, "acct:*")[1] == 15

        # Someone else removes three of a's blocks: a read that misses forgets one at once, the sweep the rest.
        gone = [a._key(key(i)) for i in range(3)]
        raw.delete(*gone)
        assert await a.get([key(0)]) == [None]
        assert a.used()[1] == 9
        await a.sweep()
        assert a.used()[1] == 7
        assert a.used()[0] + b.used()[0] == store_bytes(raw, "acct:*")[0]
        assert a.extra_counters()["store_keys"] == 12 and a.extra_counters()["store_used_bytes"] > 0
    finally:
        raw.close()
        await a.close()
        await b.close()
