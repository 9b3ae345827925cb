"""Lookup latency over the Unix socket: 1,000 hashes of 32 bytes per call, the first half stored.

Starts a real daemon (`python -m kvd serve`) on a temporary socket, stores 500 blocks from this process through
KvdClient, then times N sequential Lookup calls two ways:

- sync_stub:      a plain synchronous grpc stub from one thread (the wire + the daemon, nothing of ours client-side)
- client_future:  KvdClient.lookup(...).result(): also the hop to the client's background thread and back

Prints one JSON object (latencies in microseconds). Target: p99 <= 300 us.

    python bench/lookup_latency.py [--calls 2000] [--hashes 1000] [--profile-daemon py-spy-output.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers (the daemon fixture utilities)

from kvd_client import KvdClient
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.helpers.clients import Completions
from tests.helpers.daemon import Daemon
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_hash, make_caches
from tests.helpers.rpc import fingerprint, lookup_only_request, scoped

TARGET_P99_US = 300.0


def summary(samples_ns: list[int]) -> dict[str, float]:
    us = sorted(s / 1000 for s in samples_ns)
    n = len(us)

    def pct(p: float) -> float:
        return round(us[min(n - 1, int(p / 100 * n))], 1)

    return {
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "p999": pct(99.9),
        "max": round(us[-1], 1),
        "mean": round(statistics.fmean(us), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--hashes", type=int, default=1000)
    parser.add_argument("--gil-switch-us", type=int, default=None, help="the daemon's runtime.gil_switch_interval_us")
    parser.add_argument("--profile-daemon", type=Path, help="run py-spy record on the daemon during the sync phase")
    args = parser.parse_args()

    spec = CacheSpec(num_blocks=512)
    stored = args.hashes // 2
    hashes = [block_hash(i, "bench-lookup") for i in range(args.hashes)]
    out: dict[str, Any] = {"bench": "lookup_latency", "hashes": args.hashes, "hash_bytes": 32, "stored": stored}

    env = {} if args.gil_switch_us is None else {"KVD_RUNTIME__GIL_SWITCH_INTERVAL_US": str(args.gil_switch_us)}
    with Daemon(lease_ms=10_000, log_level="WARNING", env=env) as daemon:
        caches = make_caches(spec)
        client = KvdClient(daemon.socket, model_id="bench-lookup", worker_name="bench")
        client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
        with client:
            if not client.wait_ready(30):
                raise SystemExit("the client did not register")
            done = Completions(client)
            for start in range(0, stored, spec.num_blocks):
                batch = [(i - start, hashes[i]) for i in range(start, min(stored, start + spec.num_blocks))]
                completion = done.wait(client.save(batch), timeout=60)
                if not completion.ok:
                    raise SystemExit(f"save failed: {completion.error}")

            # -- sync stub from one thread ------------------------------------------------------------------
            stub = daemon.stub()
            reg = stub.RegisterSession(lookup_only_request(daemon.socket, "bench-lookup", fingerprint(spec)), timeout=5)
            request = scoped(kvd_pb2.LookupRequest, reg, block_hashes=hashes)
            out["request_bytes"] = request.ByteSize()
            for _ in range(args.warmup):
                stub.Lookup(request, timeout=5)
            profiler = None
            if args.profile_daemon is not None:
                profiler = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "-p",
                        str(daemon.pid),
                        "-f",
                        "raw",
                        "-o",
                        str(args.profile_daemon),
                        "-r",
                        "500",
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            samples: list[int] = []
            for _ in range(args.calls):
                t0 = time.perf_counter_ns()
                response = stub.Lookup(request, timeout=5)
                samples.append(time.perf_counter_ns() - t0)
                if response.hit_blocks != stored:
                    raise SystemExit(f"expected {stored} hits, got {response.hit_blocks}")
            if profiler is not None:
                profiler.send_signal(2)
                profiler.wait(timeout=30)
            out["sync_stub_us"] = summary(samples)

            # Client-side cost alone: building and serializing the request, parsing a response.
            t0 = time.perf_counter_ns()
            for _ in range(200):
                scoped(kvd_pb2.LookupRequest, reg, block_hashes=hashes).SerializeToString()
            out["client_serialize_us"] = round((time.perf_counter_ns() - t0) / 200 / 1000, 1)

            # Small lookups, for the fixed per-call cost.
            small = scoped(kvd_pb2.LookupRequest, reg, block_hashes=hashes[:1])
            for _ in range(args.warmup):
                stub.Lookup(small, timeout=5)
            samples = []
            for _ in range(args.calls):
                t0 = time.perf_counter_ns()
                stub.Lookup(small, timeout=5)
                samples.append(time.perf_counter_ns() - t0)
            out["sync_stub_1_hash_us"] = summary(samples)

            # The floor: a health Check (no kvd handler work at all) over the same channel.
            from grpc_health.v1 import health_pb2

            health = daemon.health_stub()
            check = health_pb2.HealthCheckRequest(service="")
            for _ in range(args.warmup):
                health.Check(check, timeout=5)
            samples = []
            for _ in range(args.calls):
                t0 = time.perf_counter_ns()
                health.Check(check, timeout=5)
                samples.append(time.perf_counter_ns() - t0)
            out["health_check_floor_us"] = summary(samples)

            # -- KvdClient futures --------------------------------------------------------------------------
            for _ in range(args.warmup):
                client.lookup(hashes).result(timeout=5)
            samples = []
            for _ in range(args.calls):
                t0 = time.perf_counter_ns()
                result = client.lookup(hashes).result(timeout=5)
                samples.append(time.perf_counter_ns() - t0)
                if result.hit_blocks != stored:
                    raise SystemExit(f"expected {stored} hits, got {result.hit_blocks}")
            out["client_future_us"] = summary(samples)

    out["calls"] = args.calls
    out["target_p99_us"] = TARGET_P99_US
    out["meets_target"] = {
        "sync_stub": out["sync_stub_us"]["p99"] <= TARGET_P99_US,
        "client_future": out["client_future_us"]["p99"] <= TARGET_P99_US,
    }
    out["cpus"] = os.cpu_count()
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)  # the latencies are only as quiet as the machine
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
