"""Tier throughput and latency on this machine; prints one JSON object.

    python bench/tiers.py [--request-mib 32] [--blocks-per-request 8] [--iterations 20] [--dir DIR]

Per tier, put and get of `request-mib` MiB requests (`blocks-per-request` blocks each) through the tier's real
backend: L1 (copy into / out of host-pool slots, what the transports do), disk (a directory under --dir, default the
system temp dir), Redis (a redis-server started here on loopback) and a Redis Cluster (3 redis-servers in cluster
mode, joined by redis-cli; skipped if either is absent), each kvstore next to its limit in the same run: the same
values through a bare redis-py pipeline (`raw_client`). Then a lookup whose prefix crosses L1 -> disk -> Redis,
through TieredBlockStore, and disk churn with and without admission by reuse (bench/disk_churn.py). Reported: MiB/s
and GB/s over the run and p50/p99 per request; disk bytes written per hour before/after admission by reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: kvd, bench, tests.helpers

from bench.disk_churn import bench_disk_churn
from kvd.config import DiskTierConfig, HostPoolConfig, RedisTierConfig, TiersConfig
from kvd.memory.host_pool import HostPool
from kvd.tiers.base import StorageBackend
from kvd.tiers.chain import TieredBlockStore
from kvd.tiers.disk import DiskBackend
from kvd.tiers.kvstore import RedisBackend
from kvd.tiers.store import HostStore
from kvd.types import BlockKey
from tests.helpers.redis_servers import REDIS_CLI, REDIS_SERVER, RedisClusterServers, RedisServer

MiB = 1 << 20
NS = "bench|fp|tp0/1"


def key(i: int) -> BlockKey:
    return NS, i.to_bytes(8, "big")


def summary(latencies: list[float], nbytes: int) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "mib_per_s": round(nbytes * len(latencies) / MiB / sum(latencies), 1),
        "gb_per_s": round(nbytes * len(latencies) / 1e9 / sum(latencies), 3),
        "p50_ms": round(statistics.median(latencies) * 1e3, 2),
        "p99_ms": round(p99 * 1e3, 2),
    }


async def timed(n: int, op: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        await op(i)
        out.append(time.perf_counter() - start)
    return out


async def bench_backend(backend: StorageBackend, payloads: list[bytes], per_request: int, n: int) -> dict[str, Any]:
    request_bytes = per_request * len(payloads[0])

    async def put(r: int) -> None:
        items = [(key(r * per_request + j), payloads[j]) for j in range(per_request)]
        if not all(await backend.put(items)):
            raise RuntimeError(f"{backend.name}: a put was dropped")

    async def get(r: int) -> None:
        got = await backend.get([key(r * per_request + j) for j in range(per_request)])
        if any(g is None for g in got):
            raise RuntimeError(f"{backend.name}: a get missed")

    puts = await timed(n, put)
    gets = await timed(n, get)
    return {"put": summary(puts, request_bytes), "get": summary(gets, request_bytes)}


async def bench_host(pool: HostPool, payloads: list[bytes], per_request: int, n: int) -> dict[str, Any]:
    """L1 as the transports see it: reserve + copy in + commit, and pin + copy out (one CPU thread each way)."""
    store = TieredBlockStore(HostStore(pool), [], TiersConfig())
    await store.start()
    block = len(payloads[0])
    loop = asyncio.get_running_loop()
    sink = bytearray(block)

    async def put(r: int) -> None:
        plan = store.prepare_save([key(10_000 + r * per_request + j) for j in range(per_request)], block)
        views = [pool.slot_view(e) for _, e in plan.to_write]

        def copy() -> None:
            for j, view in enumerate(views):
                view[:] = payloads[j]
                view.release()

        await loop.run_in_executor(None, copy)
        store.complete_save(plan, ok=True)

    async def get(r: int) -> None:
        entries = await store.prepare_load([key(10_000 + r * per_request + j) for j in range(per_request)])
        views = [pool.slot_view(e) for e in entries if e is not None]

        def copy() -> None:
            for view in views:
                sink[:] = view
                view.release()

        await loop.run_in_executor(None, copy)
        store.complete_load(entries)

    n = min(n, pool.capacity_bytes // (block * per_request))
    return {
        "put": summary(await timed(n, put), block * per_request),
        "get": summary(await timed(n, get), block * per_request),
    }


async def bench_lookup(pool: HostPool, disk: DiskBackend, remote: RedisBackend | None, n: int) -> dict[str, Any]:
    """A 48-block lookup: 16 in L1, 16 only on disk, 16 only in Redis (no promotion, so every run is the same)."""
    backends: list[StorageBackend] = [disk] if remote is None else [disk, remote]
    store = TieredBlockStore(HostStore(pool), backends, TiersConfig(promote_on_hit=False, recompute_us_per_token=1e6))
    await store.start()
    small = os.urandom(64 * 1024)
    keys = [key(1_000_000 + i) for i in range(48)]
    plan = store.prepare_save(keys[:16], len(small))
    for _, e in plan.to_write:
        pool.slot_view(e)[:] = small
    store.complete_save(plan, ok=True)
    await disk.put([(k, small) for k in keys[16:32]])
    if remote is not None:
        await remote.put([(k, small) for k in keys[32:]])
    expected = 48 if remote is not None else 32
    lookups: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        hit, _tiers = await store.lookup(keys)
        lookups.append(time.perf_counter() - start)
        if hit != expected:
            raise RuntimeError(f"lookup hit {hit} of {expected}")
    ordered = sorted(lookups)
    return {
        "blocks": 48,
        "hit": expected,
        "p50_us": round(statistics.median(lookups) * 1e6, 1),
        "p99_us": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1e6, 1),
        "cost_model": store.cost.describe(),
    }


async def bench_raw_store(client: Any, payloads: list[bytes], per_request: int, n: int) -> dict[str, Any]:
    """The limit for a kvstore backend in this run: the same values through a bare redis-py pipeline (no blob
    header, no checksum, no verification, no accounting), SET then GET per request."""
    request_bytes = per_request * len(payloads[0])

    async def put(r: int) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for j in range(per_request):
                pipe.set(b"raw:%d" % (r * per_request + j), payloads[j])
            await pipe.execute()

    async def get(r: int) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for j in range(per_request):
                pipe.get(b"raw:%d" % (r * per_request + j))
            await pipe.execute()

    puts = await timed(n, put)
    gets = await timed(n, get)
    await client.flushall()
    return {"put": summary(puts, request_bytes), "get": summary(gets, request_bytes)}


async def bench_kvstore(
    name: str, config: RedisTierConfig, payloads: list[bytes], per_request: int, n: int
) -> tuple[dict[str, Any], RedisBackend]:
    """One kvstore (single node or cluster): kvd's backend and the bare-client limit, on the same store."""
    remote = RedisBackend(config)
    await remote.start()
    if not await remote.wait_healthy(10):
        raise RuntimeError(f"{name}: the store did not come up")
    out = await bench_backend(remote, payloads, per_request, n)
    out["raw_client"] = await bench_raw_store(remote.topology.client, payloads, per_request, n)
    out["shards"] = len(remote.topology.shards())
    return out, remote


@contextlib.contextmanager
def single_node(workdir: Path) -> Iterator[RedisServer | None]:
    if REDIS_SERVER is None:
        yield None
        return
    server = RedisServer(workdir / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def bench_cluster(workdir: Path, payloads: list[bytes], per_request: int, n: int) -> dict[str, Any] | str:
    """A 3-shard Redis Cluster on this machine (redis-servers in cluster mode, joined by redis-cli)."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        return "skipped: redis-server / redis-cli not installed"
    cluster = RedisClusterServers(workdir / "cluster", shards=3)
    cluster.start()
    try:
        config = RedisTierConfig(url=cluster.url, cluster=True, timeout_ms=5000, key_prefix="bench:")
        out, remote = await bench_kvstore("redis_cluster", config, payloads, per_request, n)
        await remote.close()
        return out
    finally:
        cluster.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    block = args.request_mib * MiB // args.blocks_per_request
    per_request, n = args.blocks_per_request, args.iterations
    payloads = [os.urandom(block) for _ in range(args.blocks_per_request)]
    result: dict[str, Any] = {
        "request_mib": args.request_mib,
        "blocks_per_request": args.blocks_per_request,
        "iterations": args.iterations,
        "cpus": os.cpu_count(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="kvd-bench-", dir=args.dir))
    pool = HostPool(
        HostPoolConfig(capacity_bytes=max(512 * MiB, 4 * args.request_mib * MiB), slab_bytes=max(block, 4 * MiB))
    )
    pool.populate()
    try:
        result["host"] = await bench_host(pool, payloads, args.blocks_per_request, args.iterations)
        disk = DiskBackend(DiskTierConfig(path=workdir / "disk", capacity_bytes=64 << 30, io_threads=4))
        await disk.start()
        await disk.wait_indexed()
        result["disk"] = await bench_backend(disk, payloads, args.blocks_per_request, args.iterations)
        result["disk"]["note"] = "reads likely served from the page cache (files just written)"
        with single_node(workdir) as server:
            remote = None
            if server is not None:
                config = RedisTierConfig(url=server.url, timeout_ms=5000, key_prefix="bench:")
                result["redis"], remote = await bench_kvstore("redis", config, payloads, per_request, n)
                await remote.topology.client.flushall()
            else:
                result["redis"] = "skipped: redis-server not installed"
            result["redis_cluster"] = await bench_cluster(workdir, payloads, per_request, n)
            result["lookup_across_tiers"] = await bench_lookup(pool, disk, remote, 200)
            if remote is not None:
                await remote.close()
            url = server.url if server is not None else None
            result["disk_churn"] = await bench_disk_churn(workdir / "churn", args.churn_requests, url)
        await disk.close()
    finally:
        with contextlib.suppress(BufferError):
            pool.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--request-mib", type=int, default=32)
    parser.add_argument("--blocks-per-request", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--churn-requests", type=int, default=20000, help="requests per policy in disk_churn")
    parser.add_argument("--dir", default=None, help="where the disk tier's directory goes (default: temp dir)")
    json.dump(asyncio.run(main(parser.parse_args())), sys.stdout, indent=2)
    print()
