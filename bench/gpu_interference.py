"""The model's slowdown while kvd saves (issue #18's matmul target), for several daemon configurations or source
trees in one run, interleaved round by round so that clock and thermal drift fall on every one of them alike.

    python bench/gpu_interference.py [--config NAME:KEY=V,...] [--rounds 3] > result.json

The model: a bf16 matmul loop (8192 x 8192, 300 of them: about half a second of an H100) on the model's stream,
timed by CUDA events, first alone, then while a thread of its own keeps two 1 GiB saves in flight until the GPU has
run the last matmul (saves issued from the loop itself would cover only its first tens of milliseconds: the loop
queues its matmuls in a few). Each configuration gets a fresh daemon every round; its KEY=V are the daemon's
environment (`KVD_X=V` settings), and `tree=DIR` runs that daemon from another checkout of kvd (a kernel or
transport change measured against this one; the client side stays this checkout's).

Per configuration: the slowdown of every round and their median, the matmul's TFLOP/s alone and while saving, and
the GB/s the saves moved meanwhile, next to `raw_d2h_gbps` (a bare pinned 1 GiB copy, same run): a small slowdown
means little if the saves stalled. `--cpu-dry-run`: the same control flow on CPU tensors against the CPU transport
(the matmul timed by the wall clock): a check of this script where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvd_client import KvdClient
from phases import hashes

from tests.helpers.daemon import Daemon

DEFAULT_CONFIGS = ("default:", "ctas_32:KVD_TRANSPORTS__CUDA_KERNEL_CTAS=32")
SAVES_IN_FLIGHT = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", metavar="NAME:KEY=V,...", help="replaces the default pair")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=2048)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--big", type=int, default=512, help="blocks per save (512: 1 GiB)")
    parser.add_argument("--cpu-dry-run", action="store_true")
    return parser.parse_args()


class MatmulLoop:
    """The model's work: `iters` square bf16 matmuls on the current (model) stream."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        size, self.iters = (8192, 300) if cuda else (384, 40)
        device = "cuda" if cuda else "cpu"
        self.a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        self.b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        self.tflop = 2 * size**3 * self.iters / 1e12

    def seconds(self) -> float:
        """The loop's time on the GPU (on a CPU, by the wall clock)."""
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(self.iters):
                torch.mm(self.a, self.b)
            return time.perf_counter() - start
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record()
        for _ in range(self.iters):
            torch.mm(self.a, self.b)
        ended.record()
        ended.synchronize()
        return float(began.elapsed_time(ended)) / 1000


class Saver:
    """A thread keeping SAVES_IN_FLIGHT saves of `big` fresh blocks in flight until stopped; counts those done."""

    def __init__(self, client: KvdClient, big: int, tag: str) -> None:
        self.client, self.big, self.tag = client, big, tag
        self.done = 0
        self._issued = 0
        self._stop, self._started = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="saver", daemon=True)

    def __enter__(self) -> Saver:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the saver thread did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        in_flight: set[int] = set()
        while not self._stop.is_set():
            while len(in_flight) < SAVES_IN_FLIGHT:
                keys = hashes(f"{self.tag}-{self._issued}", self.big)
                in_flight.add(self.client.save(list(enumerate(keys))))
                self._issued += 1
                self._started.set()
            for completion in self.client.wait(in_flight, 0.002):
                in_flight.discard(completion.op_id)
                self.done += 1
        if in_flight:
            self.client.wait(in_flight, 60)


def interference(client: KvdClient, big: int, cuda: bool = True, loops: int = 3, tag: str = "mm") -> dict[str, Any]:
    """The matmul loop alone, then while saves run throughout, `loops` times each (medians)."""
    loop = MatmulLoop(cuda)
    loop.seconds()  # warm-up: cuBLAS's choice of kernel, clocks
    alone = [loop.seconds() for _ in range(loops)]
    busy: list[float] = []
    saved_gbps: list[float] = []
    for n in range(loops):
        with Saver(client, big, f"{tag}{n}") as saver:
            seconds = loop.seconds()
            saves = saver.done  # those done while the matmuls ran (the ones in flight finish after)
        busy.append(seconds)
        saved_gbps.append(saves * big * client.block_bytes / seconds / 1e9)
    alone_s, busy_s = statistics.median(alone), statistics.median(busy)
    return {
        "matmul_tflops_alone": round(loop.tflop / alone_s, 1),
        "matmul_tflops_while_saving": round(loop.tflop / busy_s, 1),
        "model_stream_slowdown_pct": round(100 * (busy_s / alone_s - 1), 2),
        "slowdown_pct_each": [round(100 * (b / alone_s - 1), 2) for b in busy],
        "saved_gbps_during_matmul": round(statistics.median(saved_gbps), 1),
    }


def daemon_env(spec: str) -> tuple[str, dict[str, str]]:
    """NAME:KEY=V,... -> (NAME, the daemon's environment); `tree=DIR` becomes a PYTHONPATH that starts at DIR."""
    name, _, changes = spec.partition(":")
    env = dict(kv.split("=", 1) for kv in changes.split(",") if kv)
    tree = env.pop("tree", None)
    if tree is not None:
        root = Path(tree).resolve()
        if not (root / "kvd" / "__main__.py").is_file():
            raise SystemExit(f"{spec}: {root} holds no kvd checkout")
        rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "client"), *rest])
    return name, env


def one_pass(
    args: argparse.Namespace, caches: list[torch.Tensor], block_bytes: int, env: dict[str, str], tag: str
) -> dict[str, Any]:
    """A fresh daemon configured by `env` (its pool holds four saves), the cache registered, `interference`."""
    pool = 4 * args.big * block_bytes
    with Daemon(capacity_bytes=pool, slab_bytes=32 * block_bytes, lease_ms=10_000, log_level="WARNING", env=env) as d:
        client = KvdClient(d.socket, model_id="bench")
        client.register_kv_caches({f"layer{i}": c for i, c in enumerate(caches)}, block_dim=1, block_size_tokens=16)
        client.start()
        try:
            if not client.wait_ready(60):
                raise SystemExit("client did not register:\n" + d.log_text())
            return interference(client, args.big, cuda=caches[0].is_cuda, tag=tag)
        finally:
            client.close()


def main() -> int:
    args = parse_args()
    began = time.monotonic()
    device = "cpu" if args.cpu_dry_run else "cuda"
    layer = (2, args.blocks, 16, args.kv_heads, 128)
    caches = [torch.randn(layer, device=device).to(torch.bfloat16) for _ in range(args.layers)]
    block_bytes = args.layers * 2 * 16 * args.kv_heads * 128 * 2
    configs = [daemon_env(spec) for spec in (args.config or DEFAULT_CONFIGS)]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"}
    if device == "cuda":
        from gpu_raw import raw_copies

        out["raw_d2h_gbps"] = raw_copies(args.big * block_bytes, block_bytes)["raw_d2h_gbps"]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in configs}
    for n in range(args.rounds):
        for name, env in configs:  # interleaved: every configuration once per round
            rounds[name].append(one_pass(args, caches, block_bytes, env, tag=f"{name}-{n}-"))
    out["configs"] = {name: {"env": env, **aggregate(rounds[name])} for name, env in configs}
    out["bench_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(out, indent=1))
    for name, figures in out["configs"].items():
        print(f"{name:16} slowdown {figures['slowdown_pct_median']} % {figures['slowdown_pct_rounds']}  saved "
              f"{figures['saved_gbps_median']} GB/s (raw D2H {out.get('raw_d2h_gbps')})", file=sys.stderr)  # fmt: skip
    return 0


def aggregate(passes: list[dict[str, Any]]) -> dict[str, Any]:
    slowdowns = [p["model_stream_slowdown_pct"] for p in passes]
    return {
        "slowdown_pct_median": round(statistics.median(slowdowns), 2),
        "slowdown_pct_rounds": slowdowns,
        "saved_gbps_median": round(statistics.median(p["saved_gbps_during_matmul"] for p in passes), 1),
        "matmul_tflops_alone_median": round(statistics.median(p["matmul_tflops_alone"] for p in passes), 1),
        "passes": passes,
    }


if __name__ == "__main__":
    sys.exit(main())
