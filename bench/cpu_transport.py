"""CPU-transport throughput: save and load 256 MiB of blocks through a real daemon from a worker process, next to
a plain in-process memcpy of the same bytes.

Cache: 32 layers x [2, N, 16, 8, 128] bf16 (64 KiB per block per layer, 2 MiB per block; N = 128 blocks = 256 MiB),
in a worker process (tests/helpers/worker.py, a real KvdClient). The daemon (`python -m kvd serve`) has a 512 MiB
pool of 8 MiB slabs. Each save round stores the whole cache under fresh hashes (a save of stored blocks copies
nothing); each load round writes every block back. Then the loaded bytes are checked against what was saved.

Baselines, in this process: torch `copy_` of one contiguous 256 MiB tensor, one ctypes.memmove of it, and the
same bytes as the transport's 32 KiB K/V segments, one memmove per segment (the gather the daemon's iovecs do).

Prints one JSON object; GB/s are 10^9 bytes per second.

    python bench/cpu_transport.py [--rounds 4] [--copy-threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers (the daemon fixture utilities)

import torch

from tests.helpers.daemon import Daemon, MiB
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.worker import WorkerProcess

SPEC = CacheSpec(num_layers=32, num_blocks=128, block_size=16, kv_heads=8, head_dim=128)


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def stats(nbytes: int, seconds: list[float]) -> dict[str, Any]:
    return {
        "best_gbps": gbps(nbytes, min(seconds)),
        "median_gbps": gbps(nbytes, statistics.median(seconds)),
        "median_ms": round(statistics.median(seconds) * 1000, 2),
        "runs": len(seconds),
    }


def memcpy_baselines(nbytes: int, rounds: int) -> dict[str, Any]:
    src = torch.randint(-(1 << 15), 1 << 15, (nbytes // 2,), dtype=torch.int16)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst outside the timing, as the daemon's pool is populated at start
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}

    def timed(fn: Any) -> list[float]:
        runs = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return runs[1:]  # the first is a warm-up

    out["torch_copy"] = stats(nbytes, timed(lambda: dst.copy_(src)))
    s, d = src.data_ptr(), dst.data_ptr()
    out["memmove"] = stats(nbytes, timed(lambda: ctypes.memmove(d, s, nbytes)))

    # The transport's access pattern: per block, per layer, a K and a V segment of 32 KiB each.
    segment = SPEC.block_size * SPEC.kv_heads * SPEC.head_dim * 2
    count = nbytes // segment
    pairs = [(s + i * segment, d + ((i * 7919) % count) * segment) for i in range(count)]  # scattered targets
    memmove = ctypes.memmove

    def segments() -> None:
        for a, b in pairs:
            memmove(b, a, segment)

    out["memmove_32KiB_segments"] = stats(nbytes, timed(segments))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--copy-threads", type=int, help="KVD_TRANSPORTS__CPU_COPY_THREADS (default: the daemon's)")
    args = parser.parse_args()

    nbytes = SPEC.num_blocks * SPEC.block_bytes
    assert SPEC.block_bytes_per_layer == 64 * 1024 and nbytes == 256 * MiB
    out: dict[str, Any] = {
        "bench": "cpu_transport",
        "layers": SPEC.num_layers,
        "layer_shape": list(SPEC.layer_shape),
        "dtype": "bfloat16",
        "block_bytes": SPEC.block_bytes,
        "blocks": SPEC.num_blocks,
        "bytes": nbytes,
        "cpus": os.cpu_count(),
    }
    env = {}
    if args.copy_threads:
        env["KVD_TRANSPORTS__CPU_COPY_THREADS"] = str(args.copy_threads)
    with Daemon(capacity_bytes=512 * MiB, slab_bytes=8 * MiB, lease_ms=10_000, log_level="WARNING", env=env) as d:
        out["pool_bytes"] = d.host_tier().capacity_bytes
        with tempfile.TemporaryDirectory(prefix="kvd-bench-") as tmp:
            worker = WorkerProcess(d.socket, SPEC, "bench-cpu", name="bench", log_path=Path(tmp) / "worker.log")
            with worker:
                worker.wait_ready(120)
                indices = range(SPEC.num_blocks)
                original = [(i, block_hash(i, "bench-cpu-0")) for i in indices]
                worker.request("fill", timeout=300, blocks=[[i, h.hex()] for i, h in original])

                saves: list[dict[str, Any]] = []
                for r in range(args.rounds):
                    # Fresh hashes each round (same bytes): a save of blocks already stored copies nothing.
                    result = worker.save([(i, block_hash(i, f"bench-cpu-{r}")) for i in indices], timeout=120)
                    if not result.get("ok"):
                        raise SystemExit(f"save failed: {result}")
                    saves.append(result)
                last = [(i, block_hash(i, f"bench-cpu-{args.rounds - 1}")) for i in indices]

                junk = [(i, block_hash(i, "bench-cpu-junk")) for i in indices]  # overwrite before loading back
                worker.request("fill", timeout=300, blocks=[[i, h.hex()] for i, h in junk])
                loads: list[dict[str, Any]] = []
                for _ in range(args.rounds):
                    result = worker.load(last, timeout=120)
                    if not result.get("ok"):
                        raise SystemExit(f"load failed: {result}")
                    loads.append(result)
                bad = worker.request("verify", timeout=300, blocks=[[i, h.hex()] for i, h in original])["mismatched"]
                out["loaded_bytes_identical"] = not bad

                for name, results in (("save", saves), ("load", loads)):
                    out[f"daemon_{name}"] = {
                        # daemon side: accepted -> every byte copied (the notice's duration)
                        "daemon": stats(nbytes, [r["duration_s"] for r in results]),
                        # worker side: client.save()/load() -> completion seen by poll_finished
                        "worker_wall": stats(nbytes, [r["wall_s"] for r in results]),
                    }
        counters = d.stats()
        out["evictions"] = d.host_tier().evictions
        out["daemon_bytes_saved"] = counters.bytes_saved
        out["daemon_bytes_loaded"] = counters.bytes_loaded

    out["in_process_memcpy"] = memcpy_baselines(nbytes, args.rounds)
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
