"""What a small save costs its caller: the save() call itself, and call → completion when the caller busy-polls
`poll_finished()` versus blocks in `KvdClient.wait()`. CPU transport, a real daemon.

    python bench/completion_latency.py [--blocks 16] [--reps 30]

A busy loop holds the GIL, so the client's background thread (which reads the Watch stream) only runs at the
interpreter's switch interval (5 ms): the measured latency is then Python's, not kvd's. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvd_client import KvdClient

from tests.helpers.daemon import Daemon

MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    caches = {f"layer{i}": torch.zeros(2, 256, 16, 8, 128, dtype=torch.bfloat16) for i in range(4)}
    out: dict[str, object] = {"blocks": args.blocks, "block_bytes": 4 * 2 * 16 * 8 * 128 * 2}
    with Daemon(capacity_bytes=256 * MiB, slab_bytes=4 * MiB, lease_ms=10_000, log_level="WARNING") as daemon:
        client = KvdClient(daemon.socket, model_id="completion-latency")
        client.register_kv_caches(caches, block_dim=1)
        client.start()
        if not client.wait_ready(30):
            raise SystemExit("client did not register")
        try:
            for mode in ("busy_poll", "blocking_wait"):
                latencies, calls = [], []
                for rep in range(args.reps):
                    pairs = [
                        (i, hashlib.blake2b(f"{mode}/{rep}/{i}".encode(), digest_size=16).digest())
                        for i in range(args.blocks)
                    ]
                    start = time.perf_counter()
                    op = client.save(pairs)
                    calls.append((time.perf_counter() - start) * 1e6)
                    if mode == "busy_poll":
                        while not any(c.op_id == op for c in client.poll_finished()):
                            pass
                    elif not client.wait([op], 10):
                        raise SystemExit("save did not finish")
                    latencies.append((time.perf_counter() - start) * 1e3)
                out[mode] = {
                    "p50_ms": round(statistics.median(latencies), 3),
                    "max_ms": round(max(latencies), 3),
                    "save_call_us_p50": round(statistics.median(calls), 1),
                    "save_call_us_max": round(max(calls), 1),
                }
        finally:
            client.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
