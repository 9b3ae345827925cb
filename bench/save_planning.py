"""The block store's share of a save, in process: prepare_save (received->planned's store part) and complete_save
(resumed->queued's: commit and index publication), in request_path.py's pool shape (room for 4 large requests, 32
blocks a slab, published index, the default reuse grace), steady state (every save evicts), plus the runs of
consecutive slots each save got (one DMA each on the GPU).

    python bench/save_planning.py > result.json
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvd_client.layout import Namespace

from kvd.config import HostPoolConfig, IndexConfig
from kvd.memory.host_pool import HostPool
from kvd.memory.index_registry import IndexRegistry
from kvd.tiers.store import HostStore
from kvd.types import namespace_key

BLOCK = 8192
BIG = 512


async def main() -> dict[str, object]:
    pool = HostPool(HostPoolConfig(capacity_bytes=4 * BIG * BLOCK, slab_bytes=32 * BLOCK, populate_threads=1))
    index = IndexRegistry(IndexConfig(), boot_id="b", local_bytes=pool.capacity_bytes, remote_tier=False,
                          max_lookup_blocks=4096)  # fmt: skip
    namespace = Namespace("bench", "fp", 0, 1)
    index.attach("t", namespace, BLOCK)
    store = HostStore(pool)
    store.publish_to(index)
    ns_key = namespace_key("t", namespace)
    out: dict[str, object] = {"bench": "save_planning", "block_bytes": BLOCK}
    for blocks, reps in ((BIG, 30), (16, 300)):
        prepare, commit, runs = [], [], []
        for _ in range(reps):
            keys = [(ns_key, os.urandom(32)) for _ in range(blocks)]  # the connector's key size
            start = time.perf_counter_ns()
            plan = store.prepare_save(keys, BLOCK)
            planned = time.perf_counter_ns()
            addresses = [entry.address for entry in plan.entries]
            runs.append(1 + sum(1 for a, b in itertools.pairwise(addresses) if b != a + BLOCK))
            resumed = time.perf_counter_ns()
            store.complete_save(plan, ok=True)
            commit.append((time.perf_counter_ns() - resumed) / 1e3)
            prepare.append((planned - start) / 1e3)
        out[f"save_{blocks}"] = {
            "prepare_us_p50": round(statistics.median(prepare), 1),
            "commit_us_p50": round(statistics.median(commit), 1),
            "runs_max": max(runs),
        }
    index.close()
    pool.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=1))
