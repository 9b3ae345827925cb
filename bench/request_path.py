"""Where a request's time goes on the path every transport shares (client -> wake pipe -> client loop -> gRPC ->
servicer -> service and block store -> transport -> notice -> Watch stream -> client), measured on the CPU transport.

    python bench/request_path.py [--layers 2] [--big 512] [--small 16] > result.json

The phases of gpu_transfer.py (bench/phases.py), with blocks small enough that copying them is cheap, so what is
left is the fixed cost per request and per block: `layers` x `[2, 4*big, 16, 1, 64]` bf16 (4 KiB per block per
layer) in this process, which the daemon (its own process, `python -m kvd serve`) reads and writes with
process_vm_readv/writev. The pool has the GPU benchmark's shape: room for 4 large requests, 32 blocks per slab (64
slabs). Each phase's `breakdown` gives p50/p99 µs per stage; `paths` the small-request phases through the
submission ring and by Save/Load RPC, alternating on the same session; `floors` the bare round trips on the same
socket; `raw_memmove_gbps` an in-process copy of one large request's bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvd_client import KvdClient
from phases import Shape, Workload, both_paths, floors, gbps, model_thread, standard

from tests.helpers.daemon import Daemon


def raw_memmove(nbytes: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)  # first touch outside the timing
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
        runs.append(time.perf_counter() - start)
    return gbps(nbytes, min(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--big", type=int, default=512)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--small-reps", type=int, default=100)
    parser.add_argument("--path-rounds", type=int, default=2, help="ring vs RPC rounds, alternating")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="KVD_X=V")
    args = parser.parse_args()
    shape = Shape(big=args.big, small=args.small, small_reps=args.small_reps)
    blocks = 4 * args.big
    caches = {f"layer{i}": torch.randn(2, blocks, 16, 1, 64).to(torch.bfloat16) for i in range(args.layers)}
    block_bytes = args.layers * 2 * 16 * 64 * 2
    out: dict[str, Any] = {"bench": "request_path", "cpus": os.cpu_count(), "layers": args.layers}
    out.update(block_bytes=block_bytes, big_bytes=args.big * block_bytes, small_bytes=args.small * block_bytes)
    out["raw_memmove_gbps"] = raw_memmove(args.big * block_bytes)
    env = dict(kv.split("=", 1) for kv in args.daemon_env)
    out["daemon_env"] = env
    with Daemon(
        capacity_bytes=4 * args.big * block_bytes,
        slab_bytes=32 * block_bytes,
        lease_ms=10_000,
        log_level="WARNING",
        env=env,
    ) as daemon:
        client = KvdClient(daemon.socket, model_id="bench-cpu")
        client.register_kv_caches(caches, block_dim=1, block_size_tokens=16)
        client.start()
        if not client.wait_ready(60):
            raise SystemExit("client did not register:\n" + daemon.log_text())
        try:
            work = Workload(client, blocks, block_bytes)
            out["phases"] = standard(work, shape)
            out.update(model_thread(work))
            out["paths"] = both_paths(work, shape, args.path_rounds)
            out["floors"] = floors(client, str(daemon.socket), args.small)
        finally:
            client.close()
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
