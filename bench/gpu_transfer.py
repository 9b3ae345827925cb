"""GPU path benchmark: kvd save/load through the daemon next to the raw PCIe limit and an in-process connector.

    python bench/gpu_transfer.py [--layers 32] [--blocks 2048] [--pool-gib 4] > result.json

Workload (the GPU issue's): a vLLM-like cache of `layers` x `[2, blocks, 16, 8, 128]` bfloat16, i.e. 64 KiB per block
per layer, 2 MiB per block over 32 layers; requests of 512 blocks (1 GiB) and of 16 blocks (32 MiB). Prints one JSON
object. Needs a CUDA GPU; the daemon runs as a separate process on a temporary socket, as in production.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvd_client import Completion, KvdClient

from tests.helpers.daemon import Daemon

GiB = 1 << 30
MiB = 1 << 20


def gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def timed_cuda(fn: Any, reps: int) -> float:
    """Median seconds of fn() on the GPU (events on the current stream)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def raw_copies(nbytes: int) -> dict[str, float]:
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d2h = timed_cuda(lambda: host.copy_(dev, non_blocking=True), 5)
    h2d = timed_cuda(lambda: dev.copy_(host, non_blocking=True), 5)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()  # the benchmark's own process, not a worker

    def both() -> None:
        with torch.cuda.stream(s1):
            host.copy_(dev, non_blocking=True)
        with torch.cuda.stream(s2):
            dev2.copy_(host2, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s1)
        torch.cuda.current_stream().wait_stream(s2)

    bidir = timed_cuda(both, 5)
    return {
        "raw_d2h_gbps": gbps(nbytes, d2h),
        "raw_h2d_gbps": gbps(nbytes, h2d),
        "raw_both_gbps": gbps(2 * nbytes, bidir),
    }


def registered_copies(nbytes: int, block_bytes: int) -> dict[str, Any]:
    """The same copies into host memory page-locked the way kvd's pool is (anonymous mmap, first touch,
    cudaHostRegister), whole and in block-sized pieces (one DMA per 2 MiB host slot), with and without transparent
    huge pages: tells the pool's memory and per-copy costs apart from kvd's own."""
    import ctypes
    import mmap

    from cupy.cuda import runtime

    res: dict[str, Any] = {}
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev_ptr = dev.data_ptr()
    stream = torch.cuda.current_stream().cuda_stream
    for huge in (True, False):
        tag = "thp" if huge else "4k"
        area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge:
            area.madvise(mmap.MADV_HUGEPAGE)
        anchor = ctypes.c_char.from_buffer(area)
        host = ctypes.addressof(anchor)
        ctypes.memset(host, 1, nbytes)
        t = time.perf_counter()
        runtime.hostRegister(host, nbytes, 1)
        res[f"reg_{tag}_register_s_per_gib"] = round((time.perf_counter() - t) / (nbytes / GiB), 3)

        def whole(kind: int, host: int = host) -> None:
            if kind == 2:
                runtime.memcpyAsync(host, dev_ptr, nbytes, 2, stream)
            else:
                runtime.memcpyAsync(dev_ptr, host, nbytes, 1, stream)

        def pieces(kind: int, host: int = host) -> None:
            for off in range(0, nbytes, block_bytes):
                if kind == 2:
                    runtime.memcpyAsync(host + off, dev_ptr + off, block_bytes, 2, stream)
                else:
                    runtime.memcpyAsync(dev_ptr + off, host + off, block_bytes, 1, stream)

        res[f"reg_{tag}_d2h_gbps"] = gbps(nbytes, timed_cuda(lambda: whole(2), 5))
        res[f"reg_{tag}_h2d_gbps"] = gbps(nbytes, timed_cuda(lambda: whole(1), 5))
        res[f"reg_{tag}_d2h_pieces_gbps"] = gbps(nbytes, timed_cuda(lambda: pieces(2), 5))
        res[f"reg_{tag}_h2d_pieces_gbps"] = gbps(nbytes, timed_cuda(lambda: pieces(1), 5))
        torch.cuda.synchronize()
        runtime.hostUnregister(host)
        del anchor
        area.close()
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text()
        res["thp_mode"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        res["anon_huge_kib_now"] = next(int(x.split()[1]) for x in rollup.splitlines() if x.startswith("AnonHuge"))
    except (OSError, StopIteration, ValueError):
        pass
    return res


def in_process_baseline(caches: list[torch.Tensor], blocks: int) -> dict[str, float]:
    """What in-worker connectors do: a thread with its own stream, index_select per layer + one D2H."""
    block_bytes = sum(c[:, 0].numel() * c.element_size() for c in caches)
    staging = torch.empty(blocks * block_bytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(blocks * block_bytes, dtype=torch.uint8, pin_memory=True)
    idx = torch.randperm(caches[0].shape[1], device="cuda")[:blocks]
    stream = torch.cuda.Stream()
    result: dict[str, float] = {}

    def run() -> None:
        with torch.cuda.stream(stream):

            def save() -> None:
                offset = 0
                for c in caches:
                    part = c.index_select(1, idx)
                    n = part.numel() * part.element_size()
                    staging[offset : offset + n].copy_(part.view(-1).view(torch.uint8))
                    offset += n
                host.copy_(staging, non_blocking=True)

            seconds = timed_cuda(save, 5)
            result["inproc_save_gbps"] = gbps(blocks * block_bytes, seconds)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result


def wait_all(client: KvdClient, ops: set[int], timeout: float = 60.0) -> list[Completion]:
    """Block until `ops` finished. A blocking wait, as a model thread between steps would do: a busy loop here would
    hold the GIL and starve the client's background thread (5 ms switch interval), measuring Python, not kvd."""
    done = client.wait(ops, timeout)
    if len(done) != len(ops):
        raise TimeoutError(f"{len(ops) - len(done)} operations did not finish")
    return done


def daemon_ms(done: list[Completion]) -> list[float]:
    """Each operation's time inside the daemon (request in to notice out), in call order."""
    return [round(c.duration_s * 1e3, 2) for c in sorted(done, key=lambda c: c.op_id)]


def hashes(tag: str, n: int) -> list[bytes]:
    return [hashlib.blake2b(f"{tag}:{i}".encode(), digest_size=16).digest() for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=2048)
    parser.add_argument("--pool-gib", type=float, default=4.0)
    parser.add_argument("--big", type=int, default=512)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument(
        "--socket",
        type=Path,
        help="use this running daemon (e.g. one bench process per GPU, CUDA_VISIBLE_DEVICES=N, against one kvd)",
    )
    parser.add_argument("--tp-rank", type=int, default=0, help="with --socket: this process's rank")
    parser.add_argument("--tp-world-size", type=int, default=1)
    parser.add_argument(
        "--daemon-env", action="append", default=[], metavar="KVD_X=V", help="configure the daemon started here"
    )
    args = parser.parse_args()
    torch.cuda.init()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    shape = (2, args.blocks, 16, 8, 128)
    caches = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(args.layers)]
    block_bytes = args.layers * 2 * 16 * 8 * 128 * 2
    big_bytes = args.big * block_bytes
    out["block_bytes"] = block_bytes
    out["request_bytes"] = {"big": big_bytes, "small": args.small * block_bytes}
    out.update(raw_copies(big_bytes))
    out.update(in_process_baseline(caches, args.big))
    out.update(registered_copies(big_bytes, block_bytes))

    daemon: Daemon | None = None
    socket_path = args.socket
    if socket_path is None:
        pool = int(args.pool_gib * GiB)
        daemon = Daemon(
            capacity_bytes=pool,
            slab_bytes=max(64 * MiB, block_bytes),
            lease_ms=10_000,
            log_level="WARNING",
            env=dict(kv.split("=", 1) for kv in args.daemon_env),
        )
        out["daemon_env"] = args.daemon_env
        t0 = time.monotonic()
        daemon.start(timeout=300)
        out["daemon_start_s"] = round(time.monotonic() - t0, 2)
        socket_path = daemon.socket
    client = KvdClient(socket_path, model_id="bench", tp_rank=args.tp_rank, tp_world_size=args.tp_world_size)
    client.register_kv_caches({f"layer{i}": c for i, c in enumerate(caches)}, block_dim=1, block_size_tokens=16)
    client.start()
    if not client.wait_ready(60):
        raise SystemExit("client did not register:\n" + (daemon.log_text() if daemon else ""))
    try:
        out.update(run_kvd(client, args, block_bytes))
    finally:
        client.close()
        if daemon is not None:
            daemon.close()
    print(json.dumps(out, indent=1))
    return 0


def run_kvd(client: KvdClient, args: argparse.Namespace, block_bytes: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    n_blocks = args.blocks
    big = args.big
    call_us: list[float] = []

    def save(tag: str, n: int, first: int = 0) -> int:
        pairs = [(first + i, h) for i, h in enumerate(hashes(tag, n))]
        t = time.perf_counter()
        op = client.save(pairs)
        call_us.append((time.perf_counter() - t) * 1e6)
        return op

    def load(tag: str, n: int, first: int) -> int:
        pairs = [(first + i, h) for i, h in enumerate(hashes(tag, n))]
        t = time.perf_counter()
        op = client.load(pairs)
        call_us.append((time.perf_counter() - t) * 1e6)
        return op

    # Warm-up: the first operations compile nothing but do open events and warm the pool.
    wait_all(client, {save("warm", big)})
    wait_all(client, {load("warm", big, big)})

    # Save throughput: `reps` 1 GiB saves in flight at once.
    t = time.perf_counter()
    done = wait_all(client, {save(f"s{r}", big, (r * big) % (n_blocks - big)) for r in range(args.reps)})
    res["kvd_save_gbps"] = gbps(args.reps * big * block_bytes, time.perf_counter() - t)
    res["kvd_save_ok"] = all(c.ok for c in done)
    res["kvd_save_daemon_ms"] = daemon_ms(done)

    # Load throughput: load the last saved request `reps` times.
    tag = f"s{args.reps - 1}"
    t = time.perf_counter()
    done = wait_all(client, {load(tag, big, (r * big) % (n_blocks - big)) for r in range(args.reps)})
    res["kvd_load_gbps"] = gbps(args.reps * big * block_bytes, time.perf_counter() - t)
    res["kvd_load_ok"] = all(c.ok for c in done)
    res["kvd_load_daemon_ms"] = daemon_ms(done)

    # Both directions at once, equal bytes each way. Loads go first so their blocks are pinned before the saves
    # need room; two new 1 GiB saves evict only the two oldest requests, never the one being loaded.
    t = time.perf_counter()
    ops = {load(tag, big, big) for _ in range(2)} | {save(f"b{r}", big, 0) for r in range(2)}
    done = wait_all(client, ops)
    res["kvd_both_gbps"] = gbps(4 * big * block_bytes, time.perf_counter() - t)
    res["kvd_both_ok"] = all(c.ok for c in done)
    res["kvd_both_daemon_ms"] = daemon_ms(done)

    # The floor under a small request's latency: one round trip through the client's thread and the daemon.
    lookups = []
    for r in range(100):
        t = time.perf_counter()
        client.lookup(hashes(f"small{r % 8}", args.small)).result(timeout=10)
        lookups.append((time.perf_counter() - t) * 1e3)
    res["lookup_ms_p50"] = round(statistics.median(lookups), 3)

    # Small requests: latency from the call to the completion notice, one at a time.
    small = args.small
    lat_save, lat_load, inside_save, inside_load = [], [], [], []
    for r in range(40):
        t = time.perf_counter()
        (saved,) = wait_all(client, {save(f"small{r}", small, 0)})
        lat_save.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        (loaded,) = wait_all(client, {load(f"small{r}", small, small)})
        lat_load.append((time.perf_counter() - t) * 1e3)
        inside_save.append(saved.duration_s * 1e3)
        inside_load.append(loaded.duration_s * 1e3)
    res["small_save_ms_p50"] = round(statistics.median(lat_save), 3)
    res["small_save_ms_p99"] = round(sorted(lat_save)[int(0.99 * len(lat_save))], 3)
    res["small_load_ms_p50"] = round(statistics.median(lat_load), 3)
    res["small_load_ms_p99"] = round(sorted(lat_load)[int(0.99 * len(lat_load))], 3)
    # The daemon's own share: from the request's arrival to the notice being queued.
    res["small_save_daemon_ms_p50"] = round(statistics.median(inside_save), 3)
    res["small_load_daemon_ms_p50"] = round(statistics.median(inside_load), 3)
    # Many small requests in flight at once.
    t = time.perf_counter()
    done = wait_all(client, {save(f"many{r}", small, (r * small) % (n_blocks - small)) for r in range(64)})
    res["small_save_concurrent_gbps"] = gbps(64 * small * block_bytes, time.perf_counter() - t)

    res["model_thread_call_us_p50"] = round(statistics.median(call_us), 1)
    res["model_thread_call_us_max"] = round(max(call_us), 1)
    res.update(interference(client, big))
    return res


def interference(client: KvdClient, big: int) -> dict[str, Any]:
    """bf16 matmul throughput on the model stream alone, then while saving at full rate."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    iters = 300

    def loop(saving: bool) -> float:
        in_flight: set[int] = set()
        counter = [0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b)
            if saving and len(in_flight) < 2:
                in_flight |= {client.save([(j, h) for j, h in enumerate(hashes(f"mm{counter[0]}", big))])}
                counter[0] += 1
            for c in client.wait(in_flight, 0):
                in_flight.discard(c.op_id)
        end.record()
        end.synchronize()
        if in_flight:
            wait_all(client, in_flight)
        return start.elapsed_time(end) / 1000

    loop(False)
    alone = min(loop(False) for _ in range(3))
    busy = min(loop(True) for _ in range(3))
    tflops = 2 * 8192**3 * iters / 1e12
    return {
        "matmul_tflops_alone": round(tflops / alone, 1),
        "matmul_tflops_while_saving": round(tflops / busy, 1),
        "model_stream_slowdown_pct": round(100 * (busy / alone - 1), 2),
    }


if __name__ == "__main__":
    sys.exit(main())
