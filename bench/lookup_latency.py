"""Lookup latency: over the Unix socket, and in-process from the shared-memory index. 1,000 hashes of 32 bytes
per call, the first half stored; and 16 hashes, all stored.

Starts a real daemon (`python -m kvd serve`) on a temporary socket, stores 500 blocks from this process through
KvdClient, then times N sequential lookups:

- sync_stub:      a plain synchronous grpc stub from one thread (the wire + the daemon, nothing of ours client-side)
- client_future:  KvdClient.lookup(...).result() over RPC (index dropped for this part): also the hop to the
                  client's background thread and back
- in-process:     the daemon's published index as the client mapped it (a sealed memfd, read-only):
                  KvdClient.lookup (the API, answered in this thread), and the bare IndexReader.probe with numpy and
                  with the plain-Python fallback kvd-client uses without numpy; each for a list of hashes and, as
                  `*_run`, for a HashRun (one buffer of hashes, as the vLLM connector's BlockHasher keeps them)

Prints one JSON object (latencies in microseconds). Targets: RPC p99 <= 300 us; in-process p99 <= 20 us for 1,000
hashes and <= 5 us for 16.

    python bench/lookup_latency.py [--calls 2000] [--hashes 1000] [--profile-daemon py-spy-output.txt]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers (the daemon fixture utilities)

from kvd_client import KvdClient
from kvd_client.fdpass import GRANT_INDEX
from kvd_client.index import HashRun, IndexReader
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.helpers.clients import Completions
from tests.helpers.daemon import Daemon
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_hash, make_caches
from tests.helpers.rpc import fingerprint, lookup_only_request, scoped

TARGET_P99_US = 300.0
TARGET_INDEX_P99_US = {1000: 20.0, 16: 5.0}


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


def timed(call: Callable[[], object], calls: int, warmup: int) -> list[int]:
    for _ in range(warmup):
        call()
    samples: list[int] = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def as_run(hashes: list[bytes]) -> HashRun:
    return HashRun(b"".join(hashes))


def index_probes(client: KvdClient, hashes: list[bytes], stored: int, calls: int, warmup: int) -> dict[str, Any]:
    """The in-process lookups, from the daemon's published index as this client mapped it: through
    KvdClient.lookup (the API), and the bare probe, numpy and plain Python."""
    out: dict[str, Any] = {}
    grant = client.index.fetch()
    fd = grant.take(GRANT_INDEX)
    python_reader = IndexReader(fd, use_numpy=False)
    os.close(fd)
    grant.close()
    reader = client.index.reader
    if reader is None:
        raise SystemExit("the client did not map the daemon's index")
    out["index_slots"] = reader.header.slots
    lookup = lambda b: client.lookup(b).result(timeout=0).hit_blocks  # noqa: E731
    probes = {  # name: (probe, the batch as the caller holds it: a list of hashes, or one buffer as the connector)
        "kvd_client_lookup": (lookup, list),
        "kvd_client_lookup_run": (lookup, as_run),
        "index_numpy": (reader.probe, list),
        "index_numpy_run": (reader.probe, as_run),
        "index_python": (python_reader.probe, list),
    }
    for name, (probe, form) in probes.items():
        for hashes_list, expected in ((hashes, stored), (hashes[:16], 16)):
            batch = form(hashes_list)
            if probe(batch) != expected:
                raise SystemExit(f"{name}: expected {expected} hits, got {probe(batch)}")
            out[f"{name}_{len(batch)}_hashes_us"] = summary(timed(functools.partial(probe, batch), calls, warmup))
    python_reader.close()
    return out


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
            small = scoped(kvd_pb2.LookupRequest, reg, block_hashes=hashes[:16])
            samples = timed(lambda: stub.Lookup(small, timeout=5), args.calls, args.warmup)
            out["sync_stub_16_hashes_us"] = summary(samples)

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

            # -- KvdClient futures over RPC: the index set aside for this part ---------------------------------
            client.index.enabled = False
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
            client.index.enabled = True

            out.update(index_probes(client, hashes, stored, args.calls * 5, args.warmup))

    out["calls"] = args.calls
    out["index_calls"] = args.calls * 5
    out["target_p99_us"] = TARGET_P99_US
    out["target_index_p99_us"] = TARGET_INDEX_P99_US
    out["meets_target"] = {
        "sync_stub": out["sync_stub_us"]["p99"] <= TARGET_P99_US,
        "client_future": out["client_future_us"]["p99"] <= TARGET_P99_US,
        **{
            f"{path}_{n}_hashes": out[f"{path}_{n}_hashes_us"]["p99"] <= limit
            for path in ("kvd_client_lookup", "kvd_client_lookup_run", "index_numpy", "index_numpy_run", "index_python")
            for n, limit in TARGET_INDEX_P99_US.items()
            if f"{path}_{n}_hashes_us" in out
        },
    }
    out["cpus"] = os.cpu_count()
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)  # the latencies are only as quiet as the machine
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
