"""What the transfer benchmarks share (gpu_transfer.py on a GPU, request_path.py on the CPU transport): a workload on
a real KvdClient, the phases both run, and where each operation's time went, from its OperationStages (the client's
and the daemon's stamps on one clock, CLOCK_MONOTONIC).

Every phase returns a dict: GB/s where bytes move, `ok` (every operation succeeded), the per-stage `breakdown`
(p50/p99 in µs of each interval between consecutive stages, plus `total` = call -> notice received and `rpc` = the
Save/Load round trip) and, for requests in flight together, a `timeline` (each operation's stages in ms after the
phase's first call: when each reached the daemon, the engine, the device, the notice).
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvd_client import Completion, KvdClient, OperationStages

Spec = tuple[str, str, int, int]  # (save | load, hash tag, blocks, first block index)


def gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2) if seconds > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def dist_us(values_ns: Sequence[float]) -> dict[str, float]:
    if not values_ns:
        return {"n": 0}
    return {
        "p50": round(percentile(values_ns, 0.5) / 1e3, 1),
        "p99": round(percentile(values_ns, 0.99) / 1e3, 1),
        "n": len(values_ns),
    }


def breakdown(done: Sequence[Completion]) -> dict[str, dict[str, float]]:
    """p50/p99 µs of each stage interval over `done`, in path order."""
    intervals: dict[str, list[int]] = {}
    for c in done:
        if c.stages is not None:
            for name, ns in c.stages.intervals().items():
                intervals.setdefault(name, []).append(ns)
    return {name: dist_us(values) for name, values in intervals.items()}


def timeline(done: Sequence[Completion]) -> list[dict[str, Any]]:
    """Each operation's stages in ms after the first call among them (requests in flight together)."""
    staged = [c for c in sorted(done, key=lambda c: c.op_id) if c.stages is not None]
    if not staged:
        return []
    t0 = min(c.stages.call_ns for c in staged if c.stages is not None)
    out = []
    for c in staged:
        stamps = c.stages.as_dict() if c.stages is not None else {}
        row: dict[str, Any] = {"op": c.op_id, "kind": str(c.kind)}
        for name in OperationStages.ORDER:
            stamp = stamps[f"{name}_ns"]
            row[name] = round((stamp - t0) / 1e6, 3) if stamp else None
        out.append(row)
    return out


def hashes(tag: str, n: int) -> list[bytes]:
    """`n` block keys of the connector's size (32 bytes, kvd_client.hashing): the daemon files a 32-byte key in its
    index as it is, and hashes any other size first, which the connector's saves never pay."""
    return [hashlib.blake2b(f"{tag}:{i}".encode(), digest_size=32).digest() for i in range(n)]


@dataclass
class Workload:
    """Saves and loads of a cache of `cache_blocks` blocks through `client`; the caller's time per call is kept."""

    client: KvdClient
    cache_blocks: int
    block_bytes: int
    call_us: list[float] = field(default_factory=list)

    @staticmethod
    def pairs(spec: Spec) -> list[tuple[int, bytes]]:
        """The (block index, key) pairs `spec` saves or loads."""
        _, tag, n, first = spec
        return [(first + i, h) for i, h in enumerate(hashes(tag, n))]

    def issue(self, kind: str, pairs: list[tuple[int, bytes]]) -> int:
        start = time.perf_counter()
        op = self.client.save(pairs) if kind == "save" else self.client.load(pairs)
        self.call_us.append((time.perf_counter() - start) * 1e6)
        return op

    def wait(self, ops: set[int], timeout: float = 60.0) -> list[Completion]:
        """Block until `ops` finished: a blocking wait, as a model thread between steps would do (a busy loop here
        would hold the GIL against the client's own thread and measure Python, not kvd)."""
        done = self.client.wait(ops, timeout)
        if len(done) != len(ops):
            raise TimeoutError(f"{len(ops) - len(done)} operations did not finish")
        return sorted(done, key=lambda c: c.op_id)

    def run(self, specs: Sequence[Spec]) -> tuple[list[Completion], float]:
        """Issue every spec at once, wait for all; (completions, wall seconds). The keys are computed before the clock
        starts, as a connector has them before it saves or loads (its block hasher keeps them as tokens arrive):
        hashing a 1 GiB request's 512 keys here (0.3-0.5 ms) held back the requests issued after it."""
        keyed = [(spec, self.pairs(spec)) for spec in specs]
        start = time.perf_counter()
        done = self.wait({self.issue(spec[0], pairs) for spec, pairs in keyed})
        return done, time.perf_counter() - start


def concurrent(work: Workload, specs: Sequence[Spec], with_timeline: bool = True) -> dict[str, Any]:
    """Requests in flight together: GB/s over the phase's wall time, each direction's share, the breakdown."""
    done, seconds = work.run(specs)
    moved = {kind: sum(c.nbytes for c in done if c.kind == kind) for kind in ("save", "load")}
    out: dict[str, Any] = {
        "gbps": gbps(sum(moved.values()), seconds),
        "wall_ms": round(seconds * 1e3, 2),
        "ok": all(c.ok for c in done),
        "ops": len(done),
        "bytes": moved,
        "daemon_ms": [round(c.duration_s * 1e3, 2) for c in done],
        "breakdown": breakdown(done),
    }
    if with_timeline:
        out["timeline"] = timeline(done)
    return out


def repeated(work: Workload, make: Callable[[int], Sequence[Spec]], reps: int) -> dict[str, Any]:
    """`reps` rounds of concurrent(make(r)): the median round's GB/s, every round's, one breakdown over all."""
    rounds = []
    done_all: list[Completion] = []
    for r in range(reps):
        done, seconds = work.run(make(r))
        rounds.append((gbps(sum(c.nbytes for c in done), seconds), all(c.ok for c in done)))
        done_all += done
    return {
        "gbps": statistics.median(g for g, _ in rounds),
        "gbps_rounds": [g for g, _ in rounds],
        "ok": all(ok for _, ok in rounds),
        "breakdown": breakdown(done_all),
    }


def one_at_a_time(work: Workload, specs: Sequence[Spec]) -> dict[str, Any]:
    """Each spec alone, in turn: the latency of a request with nothing else in flight, per kind."""
    by_kind: dict[str, list[Completion]] = {}
    for spec in specs:
        by_kind.setdefault(spec[0], []).extend(work.run([spec])[0])
    out: dict[str, Any] = {}
    for kind, done in by_kind.items():
        totals = [c.stages.notice_ns - c.stages.call_ns for c in done if c.stages is not None]
        out[kind] = {
            "call_to_notice_ms_p50": round(percentile(totals, 0.5) / 1e6, 3) if totals else None,
            "call_to_notice_ms_p99": round(percentile(totals, 0.99) / 1e6, 3) if totals else None,
            "ok": all(c.ok for c in done),
            "breakdown": breakdown(done),
        }
    return out


def floors(client: KvdClient, socket: str, hashes_per_lookup: int, count: int = 200) -> dict[str, Any]:
    """The round trips under every request on this socket: a bare grpc.aio unary call on the client's own channel
    and loop (Heartbeat), the same from a plain synchronous stub on a fresh channel; and a lookup through the client,
    from the shared index and over RPC."""
    import grpc
    from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

    # On the client's own loop and channel (its private attributes: the benchmark measures the client's own floor).
    session = client._session  # its id and key: a heartbeat names both
    beats = asyncio.run_coroutine_threadsafe(_heartbeats(client._stub, session, count), client._loop)
    out: dict[str, Any] = {"aio_heartbeat_us": dist_us(beats.result(timeout=60))}
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = kvd_pb2_grpc.KvdStub(channel)
        request = kvd_pb2.HeartbeatRequest(session_id=session.id, session_key=session.key)
        stub.Heartbeat(request, timeout=5)
        took = []
        for _ in range(count):
            start = time.monotonic_ns()
            stub.Heartbeat(request, timeout=5)
            took.append(time.monotonic_ns() - start)
    out["sync_heartbeat_us"] = dist_us(took)
    probe = hashes("floor", hashes_per_lookup)
    # A lookup through the client: answered in this thread from the daemon's shared index (what the connector
    # does), and over RPC (caller thread -> client loop -> daemon -> back) for comparison.
    for name, local in ((f"client_lookup_{hashes_per_lookup}_us", True), (f"rpc_lookup_{hashes_per_lookup}_us", False)):
        client.index.enabled = local
        lookups = []
        for _ in range(count // 2):
            start = time.monotonic_ns()
            client.lookup(probe).result(timeout=10)
            lookups.append(time.monotonic_ns() - start)
        out[name] = dist_us(lookups)
    client.index.enabled = True
    out["client_lookup_in_process"] = client.index.mapped
    return out


async def _heartbeats(stub: Any, session: Any, count: int) -> list[int]:
    from kvd_client.wire.kvd.v1 import kvd_pb2

    request = kvd_pb2.HeartbeatRequest(session_id=session.id, session_key=session.key)
    took = []
    for _ in range(count):
        start = time.monotonic_ns()
        await stub.Heartbeat(request, timeout=5)
        took.append(time.monotonic_ns() - start)
    return took


def model_thread(work: Workload) -> dict[str, float]:
    calls = work.call_us
    return {
        "model_thread_call_us_p50": round(statistics.median(calls), 1),
        "model_thread_call_us_max": round(max(calls), 1),
    }


PhaseHook = Callable[[str, int, int], dict[str, Any] | None]  # (phase, start ns, end ns) -> extra figures


@dataclass(frozen=True)
class Shape:
    big: int = 512  # blocks per large request (1 GiB of 2 MiB blocks)
    small: int = 16  # blocks per small request
    reps: int = 4  # large requests in flight at once
    small_reps: int = 100  # small requests one at a time, per kind
    many: int = 32  # small requests in flight at once
    many_rounds: int = 3


def standard(work: Workload, shape: Shape, hook: PhaseHook | None = None, quick: bool = False) -> dict[str, Any]:
    """The phases of issue #18's table, in an order that keeps every load's source stored (the pool holds
    `reps` large requests; each load touches its blocks, so evictions take older ones). `quick`: the throughput
    phases and a short small-request run only (for configuration variants)."""
    out: dict[str, Any] = {}
    for name, run in _phases(work, shape, quick):
        start = time.monotonic_ns()
        out[name] = run()
        if hook is not None and (extra := hook(name, start, time.monotonic_ns())):
            out[name].update(extra)
    return out


def _phases(work: Workload, shape: Shape, quick: bool) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    big, small, n, many = shape.big, shape.small, work.cache_blocks, shape.many
    last = f"s{shape.reps - 1}"  # the large request the loads read back
    spread = [(r * big) % (n - big) for r in range(shape.reps)]
    dest = n // 2  # small loads write the upper half of the cache, small saves read the lower one

    def small_loads(count: int) -> list[Spec]:
        return [("load", f"src.{r}", small, dest + r * small) for r in range(count)]

    def small_saves(tag: str, count: int) -> list[Spec]:
        return [("save", f"{tag}.{r}", small, r * small) for r in range(count)]

    big_alone = [s for r in range(3) for s in (("save", f"q{r}", big, 0), ("load", last, big, big))]
    small_alone = [
        s
        for r in range(20 if quick else shape.small_reps)
        for s in (("save", f"t{r}", small, 0), ("load", f"t{r}", small, small))
    ]
    rounds = shape.many_rounds
    return [
        ("warm", lambda: one_at_a_time(work, [("save", "warm", big, 0), ("load", "warm", big, big)])),
        ("big_save", lambda: concurrent(work, [("save", f"s{r}", big, first) for r, first in enumerate(spread)])),
        ("big_load", lambda: concurrent(work, [("load", last, big, first) for first in spread])),
        (
            "big_both",
            lambda: concurrent(work, [("load", last, big, big)] * 2 + [("save", f"b{r}", big, 0) for r in range(2)]),
        ),
        *([] if quick else [("big_alone", lambda: one_at_a_time(work, big_alone))]),
        ("small_alone", lambda: one_at_a_time(work, small_alone)),
        ("many_src", lambda: concurrent(work, small_saves("src", many), False)),
        ("many_load", lambda: repeated(work, lambda _: small_loads(many), rounds)),
        (
            "many_mixed",
            lambda: repeated(work, lambda k: small_loads(many // 2) + small_saves(f"x{k}", many // 2), rounds),
        ),
        ("many_save", lambda: repeated(work, lambda k: small_saves(f"m{k}", many), rounds)),
    ]


PATH_PHASES = ("small_alone", "many_src", "many_load", "many_mixed", "many_save")


def both_paths(work: Workload, shape: Shape, rounds: int = 2) -> dict[str, Any]:
    """The small-request phases through the session's submission ring and by Save/Load RPC, alternating (`rounds`
    of each), on one session: the same daemon, cache and machine for both. Per path and round: small call -> notice
    p50, the many-in-flight rates, the model thread's time per call; with one small-request breakdown per path."""
    submissions = work.client.submissions
    if not submissions.has_ring:
        return {"skipped": "the session has no submission ring"}
    phases = [(name, run) for name, run in _phases(work, shape, quick=True) if name in PATH_PHASES]
    out: dict[str, Any] = {"ring": [], "rpc": []}
    try:
        for _ in range(rounds):
            for path in ("rpc", "ring"):
                submissions.enabled = path == "ring"
                out[path].append(_path_round(work, phases))
    finally:
        submissions.enabled = True
    return out


def _path_round(work: Workload, phases: Sequence[tuple[str, Callable[[], dict[str, Any]]]]) -> dict[str, Any]:
    first_call = len(work.call_us)
    row: dict[str, Any] = {}
    for name, run in phases:
        result = run()
        if name == "many_src":
            continue  # stores what many_load reads back (the phases since may have evicted it)
        if name == "small_alone":
            for kind in ("save", "load"):
                row[f"small_{kind}_ms_p50"] = result[kind]["call_to_notice_ms_p50"]
                row[f"small_{kind}_breakdown"] = result[kind]["breakdown"]
        else:
            row[f"{name}_gbps"] = result["gbps"]
        ok = result["ok"] if "ok" in result else all(r["ok"] for r in result.values())
        row["ok"] = row.get("ok", True) and ok
    calls = work.call_us[first_call:]
    row["model_thread_call_us_p50"] = round(statistics.median(calls), 1) if calls else None
    return row
