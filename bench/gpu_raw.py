"""The limits kvd's GPU figures are read against, measured in the same run: raw pinned copies (one direction, both
at once, one small request's bytes), the same into host memory page-locked the way kvd's pool is (anonymous mmap,
first touch, cudaHostRegister; whole, in one DMA per block, and both directions at once in kvd's chunk size), an
in-process connector (own stream, index_select + one D2H), and where the GPU and the daemon's pool sit (NUMA)."""

from __future__ import annotations

import ctypes
import functools
import mmap
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GiB = 1 << 30
D2H, H2D = 2, 1  # cudaMemcpyKind


def gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def timed_cuda(fn: Callable[[], None], reps: int) -> float:
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


def both_ways(d2h: Callable[[torch.cuda.Stream], None], h2d: Callable[[torch.cuda.Stream], None]) -> Callable[[], None]:
    """Both directions at once, each on its own stream (this benchmark's process, not a worker), joined after."""
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def run() -> None:
        s1.wait_stream(torch.cuda.current_stream())
        s2.wait_stream(torch.cuda.current_stream())
        d2h(s1)
        h2d(s2)
        torch.cuda.current_stream().wait_stream(s1)
        torch.cuda.current_stream().wait_stream(s2)

    return run


def raw_copies(nbytes: int, small_bytes: int) -> dict[str, float]:
    dev, dev2 = (torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2))
    host, host2 = (torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    out = {
        "raw_d2h_gbps": gbps(nbytes, timed_cuda(lambda: host.copy_(dev, non_blocking=True), 5)),
        "raw_h2d_gbps": gbps(nbytes, timed_cuda(lambda: dev.copy_(host, non_blocking=True), 5)),
    }

    def d2h(stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            host.copy_(dev, non_blocking=True)

    def h2d(stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            dev2.copy_(host2, non_blocking=True)

    out["raw_both_gbps"] = gbps(2 * nbytes, timed_cuda(both_ways(d2h, h2d), 5))
    small_d2h = timed_cuda(lambda: host[:small_bytes].copy_(dev[:small_bytes], non_blocking=True), 20)
    small_h2d = timed_cuda(lambda: dev[:small_bytes].copy_(host[:small_bytes], non_blocking=True), 20)
    out["raw_small_d2h_ms"] = round(small_d2h * 1e3, 3)
    out["raw_small_h2d_ms"] = round(small_h2d * 1e3, 3)
    return out


def registered_copies(nbytes: int, block_bytes: int, chunk_bytes: int) -> dict[str, Any]:
    """Copies into memory page-locked like kvd's pool, with and without transparent huge pages: whole, in one DMA
    per block, and (huge pages) both directions at once whole and in kvd's chunk-size DMAs. Tells the pool's
    memory and per-DMA costs apart from kvd's own."""
    from cupy.cuda import runtime

    res: dict[str, Any] = {}
    dev = torch.empty(2 * nbytes, dtype=torch.uint8, device="cuda")
    for huge in (True, False):
        size = 2 * nbytes if huge else nbytes  # the second half: the H2D source of both directions at once
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge:
            area.madvise(mmap.MADV_HUGEPAGE)
        anchor = ctypes.c_char.from_buffer(area)
        host = ctypes.addressof(anchor)
        ctypes.memset(host, 1, size)
        t = time.perf_counter()
        runtime.hostRegister(host, size, 1)
        registered = time.perf_counter() - t
        tag = "thp" if huge else "4k"
        res[f"reg_{tag}_register_s_per_gib"] = round(registered / (size / GiB), 3)
        res.update(_registered(runtime, dev.data_ptr(), host, nbytes, block_bytes, chunk_bytes if huge else 0, tag))
        torch.cuda.synchronize()
        runtime.hostUnregister(host)
        del anchor
        area.close()
    return res


def _registered(
    runtime: Any, dev: int, host: int, nbytes: int, block_bytes: int, chunk_bytes: int, tag: str
) -> dict[str, float]:
    current = torch.cuda.current_stream()

    def copies(kind: int, piece: int, stream: torch.cuda.Stream, offset: int = 0) -> None:
        for off in range(offset, offset + nbytes, piece):
            dst, src = (host + off, dev + off) if kind == D2H else (dev + off, host + off)
            runtime.memcpyAsync(dst, src, piece, kind, stream.cuda_stream)

    res: dict[str, float] = {}
    for kind, name in ((D2H, "d2h"), (H2D, "h2d")):
        res[f"reg_{tag}_{name}_gbps"] = gbps(nbytes, timed_cuda(functools.partial(copies, kind, nbytes, current), 5))
        pieces = timed_cuda(functools.partial(copies, kind, block_bytes, current), 5)
        res[f"reg_{tag}_{name}_pieces_gbps"] = gbps(nbytes, pieces)
    for piece, name in ((nbytes, "whole"), (chunk_bytes, "chunks")) if chunk_bytes else ():
        run = both_ways(functools.partial(copies, D2H, piece), lambda s, p=piece: copies(H2D, p, s, nbytes))
        res[f"reg_{tag}_both_{name}_gbps"] = gbps(2 * nbytes, timed_cuda(run, 5))
    return res


def in_process_baseline(caches: list[torch.Tensor], blocks: int) -> dict[str, float]:
    """What in-worker connectors do: a thread with its own stream, index_select per layer + one D2H."""
    block_bytes = sum(c[:, 0].numel() * c.element_size() for c in caches)
    staging = torch.empty(blocks * block_bytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(blocks * block_bytes, dtype=torch.uint8, pin_memory=True)
    idx = torch.randperm(caches[0].shape[1], device="cuda")[:blocks]
    result: dict[str, float] = {}

    def save() -> None:
        offset = 0
        for c in caches:
            part = c.index_select(1, idx)
            n = part.numel() * part.element_size()
            staging[offset : offset + n].copy_(part.view(-1).view(torch.uint8))
            offset += n
        host.copy_(staging, non_blocking=True)

    def run() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            result["inproc_save_gbps"] = gbps(blocks * block_bytes, timed_cuda(save, 5))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result


def numa(daemon_pid: int | None) -> dict[str, Any]:
    """The GPU's NUMA node, the host's nodes, transparent huge pages, and where the daemon's pool pages are (the
    largest anonymous mapping in its numa_maps, MiB per node)."""
    out: dict[str, Any] = {}
    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))
    out["numa_nodes"] = len(nodes)
    try:
        uuid = str(torch.cuda.get_device_properties(0).uuid)
        query = ["nvidia-smi", "-i", uuid if uuid.startswith("GPU-") else f"GPU-{uuid}", "--query-gpu=pci.bus_id"]
        bus = subprocess.run([*query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
        bus = bus.strip().lower()[-12:]
        out["gpu_pci"] = bus
        out["gpu_numa_node"] = int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text())
        out["thp"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    if daemon_pid is not None:
        out["pool_mib_by_node"] = _pool_nodes(daemon_pid)
    return out


def _pool_nodes(pid: int) -> dict[str, float]:
    best: dict[str, float] = {}
    try:
        lines = Path(f"/proc/{pid}/numa_maps").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        page_kib = int(fields.get("kernelpagesize_kB", "4"))
        nodes = {k: int(v) * page_kib / 1024 for k, v in fields.items() if k[:1] == "N" and k[1:].isdigit()}
        if sum(nodes.values()) > sum(best.values()):
            best = {k: round(v, 1) for k, v in nodes.items()}
    return best
