"""Disk churn with and without admission by reuse: a working set bigger than the disk tier, served through the real
tier chain (a real host pool, a real disk directory, and a real redis-server when given). Run by bench/tiers.py;
alone:

    python bench/disk_churn.py [--requests 20000] [--redis-url redis://127.0.0.1:6379/0] [--dir DIR]

Each request looks one block up (popularity Zipf(1.0) over the working set, as shared prefixes are); a hit is
loaded (from L1, or promoted from below), a miss is "recomputed" and saved, as vLLM does. L1 holds 1/16 of the
working set, the disk 1/4. Runs: the disk alone, `disk_admission = "always"` against `"reused_only"`; with a
kvstore, `"always"` against the default `"reused"`. Reported per run: disk bytes written (per 1,000 requests, and per
hour at 100 requests/s, one rate for all), hit ratios (L1, below, miss), and what went down or was turned away.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: kvd, bench, tests.helpers

from kvd.config import DiskAdmission, DiskTierConfig, HostPoolConfig, RedisTierConfig, TiersConfig
from kvd.memory.host_pool import HostPool
from kvd.tiers.base import StorageBackend
from kvd.tiers.chain import TieredBlockStore
from kvd.tiers.disk import DiskBackend
from kvd.tiers.kvstore import RedisBackend
from kvd.tiers.store import HostStore
from kvd.types import BlockKey, Tier

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
WORKING_SET = 2048  # blocks: 128 MiB
L1_BYTES = WORKING_SET * BLOCK // 16
DISK_BYTES = WORKING_SET * BLOCK // 4


def key(i: int) -> BlockKey:
    return "churn|fp|tp0/1", i.to_bytes(8, "big")


async def serve(store: TieredBlockStore, i: int, payload: bytes, hits: dict[str, int]) -> None:
    keys = [key(i)]
    hit, tiers = await store.lookup(keys)
    if hit:
        entries = await store.prepare_load(keys)
        store.complete_load(entries)
        hits["l1" if tiers[0] is Tier.HOST_MEMORY else "below"] += 1
        return
    hits["miss"] += 1
    await store.make_room(keys, BLOCK)
    plan = store.prepare_save(keys, BLOCK)
    for _, entry in plan.to_write:
        view = store.pool.slot_view(entry)
        view[:] = payload
        view.release()
    store.complete_save(plan, ok=True)


async def run_policy(
    workdir: Path, admission: DiskAdmission, requests: int, redis_url: str | None = None, seed: int = 7
) -> dict[str, Any]:
    name = f"{admission.value}-{'redis' if redis_url else 'alone'}"
    pool = HostPool(HostPoolConfig(capacity_bytes=L1_BYTES, slab_bytes=1 * MiB, pin=False, populate_threads=1))
    disk = DiskBackend(DiskTierConfig(path=workdir / name, capacity_bytes=DISK_BYTES, reserve_bytes=0))
    backends: list[StorageBackend] = [disk]
    if redis_url:
        backends.append(RedisBackend(RedisTierConfig(url=redis_url, timeout_ms=5000, key_prefix=f"churn-{name}:")))
    config = TiersConfig(recompute_us_per_token=1e6, disk_admission=admission)
    store = TieredBlockStore(HostStore(pool), backends, config)
    await store.start()
    await disk.wait_indexed()
    for backend in backends[1:]:
        await backend.wait_healthy(10)  # type: ignore[attr-defined]
    rng = random.Random(seed)
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(WORKING_SET)))
    payload = os.urandom(BLOCK)
    hits = dict.fromkeys(("l1", "below", "miss"), 0)
    start = time.perf_counter()
    try:
        for i in rng.choices(range(WORKING_SET), cum_weights=weights, k=requests):
            await serve(store, i, payload, hits)
        await store.flush(60)
        elapsed = time.perf_counter() - start
        counters = store.counters()
    finally:
        await store.close()
        with contextlib.suppress(BufferError):
            pool.close()
    written = disk.counters.bytes_written
    return {
        "tiers": [b.name for b in backends],
        "requests": requests,
        "elapsed_s": round(elapsed, 2),
        "disk_bytes_written": written,
        "disk_mib_written_per_1000_requests": round(written / MiB / requests * 1000, 1),
        # Normalized to one request rate for both policies (each run's own rate depends on what it wrote).
        "disk_gib_written_per_hour_at_100_requests_per_s": round(written / requests * 100 * 3600 / 2**30, 1),
        "requests_per_s_this_run": round(requests / elapsed),
        "hit_ratio": {tier: round(n / requests, 3) for tier, n in hits.items()},  # "below": disk or kvstore
        "write_downs": counters["tier_write_down_blocks"],
        "not_admitted": counters["tier_disk_not_admitted_blocks"],
        "dropped": counters["tier_write_down_dropped_blocks"],
    }


async def bench_disk_churn(workdir: Path, requests: int, redis_url: str | None = None) -> dict[str, Any]:
    """With a kvstore (`redis_url`): "always" against the default "reused" (never-reused blocks go to the kvstore
    only). Disk alone: "always" against "reused_only" ("reused" would write every block: each is its only copy)."""
    out: dict[str, Any] = {
        "working_set_mib": WORKING_SET * BLOCK // MiB,
        "l1_mib": L1_BYTES // MiB,
        "disk_mib": DISK_BYTES // MiB,
        "block_kib": BLOCK // KiB,
    }
    runs = [(DiskAdmission.ALWAYS, None), (DiskAdmission.REUSED_ONLY, None)]
    if redis_url:
        runs += [(DiskAdmission.ALWAYS, redis_url), (DiskAdmission.REUSED, redis_url)]
    for admission, url in runs:
        out[f"{admission.value}{'_with_kvstore' if url else '_disk_only'}"] = await run_policy(
            workdir, admission, requests, url
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--redis-url", default=None, help="a kvstore next to the disk (runs always vs reused too)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvd-churn-", dir=args.dir))
    try:
        json.dump(asyncio.run(bench_disk_churn(tmp, args.requests, args.redis_url)), sys.stdout, indent=2)
        print()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
