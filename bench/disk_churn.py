"""Disk churn with and without admission by reuse: a working set bigger than the disk tier, served through the real
tier chain (a real host pool, a real disk directory), once per `tiers.disk_admission`. Run by bench/tiers.py; alone:

    python bench/disk_churn.py [--requests 6000] [--dir DIR]

Each request looks one block up (popularity Zipf(1.0) over the working set, as shared prefixes are); a hit is
loaded (from L1, or promoted from disk), a miss is "recomputed" and saved, as vLLM does. L1 holds 1/16 of the
working set, the disk 1/4. Reported per policy: disk bytes written (per 1,000 requests, and per hour at 100
requests/s, the same rate for both), hit ratios per tier, and what went down or was turned away.
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

from kvd.config import DiskAdmission, DiskTierConfig, HostPoolConfig, TiersConfig
from kvd.memory.host_pool import HostPool
from kvd.tiers.chain import TieredBlockStore
from kvd.tiers.disk import DiskBackend
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
        hits["l1" if tiers[0] is Tier.HOST_MEMORY else "disk"] += 1
        return
    hits["miss"] += 1
    await store.make_room(keys, BLOCK)
    plan = store.prepare_save(keys, BLOCK)
    for _, entry in plan.to_write:
        view = store.pool.slot_view(entry)
        view[:] = payload
        view.release()
    store.complete_save(plan, ok=True)


async def run_policy(workdir: Path, admission: DiskAdmission, requests: int, seed: int = 7) -> dict[str, Any]:
    pool = HostPool(HostPoolConfig(capacity_bytes=L1_BYTES, slab_bytes=1 * MiB, pin=False, populate_threads=1))
    disk = DiskBackend(DiskTierConfig(path=workdir / admission.value, capacity_bytes=DISK_BYTES, reserve_bytes=0))
    config = TiersConfig(recompute_us_per_token=1e6, disk_admission=admission)
    store = TieredBlockStore(HostStore(pool), [disk], config)
    await store.start()
    await disk.wait_indexed()
    rng = random.Random(seed)
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(WORKING_SET)))
    payload = os.urandom(BLOCK)
    hits = dict.fromkeys(("l1", "disk", "miss"), 0)
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
        "requests": requests,
        "elapsed_s": round(elapsed, 2),
        "disk_bytes_written": written,
        "disk_mib_written_per_1000_requests": round(written / MiB / requests * 1000, 1),
        # Normalized to one request rate for both policies (each run's own rate depends on what it wrote).
        "disk_gib_written_per_hour_at_100_requests_per_s": round(written / requests * 100 * 3600 / 2**30, 1),
        "requests_per_s_this_run": round(requests / elapsed),
        "hit_ratio": {tier: round(n / requests, 3) for tier, n in hits.items()},
        "write_downs": counters["tier_write_down_blocks"],
        "not_admitted": counters["tier_disk_not_admitted_blocks"],
        "dropped": counters["tier_write_down_dropped_blocks"],
    }


async def bench_disk_churn(workdir: Path, requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "working_set_mib": WORKING_SET * BLOCK // MiB,
        "l1_mib": L1_BYTES // MiB,
        "disk_mib": DISK_BYTES // MiB,
        "block_kib": BLOCK // KiB,
    }
    for admission in (DiskAdmission.ALWAYS, DiskAdmission.REUSED):
        out[admission.value] = await run_policy(workdir, admission, requests)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvd-churn-", dir=args.dir))
    try:
        json.dump(asyncio.run(bench_disk_churn(tmp, args.requests)), sys.stdout, indent=2)
        print()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
