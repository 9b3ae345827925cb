"""Time to first token on a kvd hit, on a GPU worker with a model-like loop (issue #16): in-step (layer-wise) loads
against async loads against recomputing the prefix, side by side in one run, with the raw H2D copy rate.

    python bench/gpu_in_step.py [--prefixes 1024,4096,8192] [--reps 30] [--layers 16] [--hidden 2048] > out.json

The worker: a KV cache of `layers` x `[2, blocks, 16, kv_heads, head_dim]` bfloat16 (vLLM's layout) registered
with a daemon started here; a "model" whose layer is an MLP (`hidden` -> 4 x `hidden` -> `hidden`, bf16 matmuls)
over the tokens it computes, then an "attention" read of that layer's KV blocks (softmax(q K^T) V over the prefix).
One request's first token, after its prefix of P tokens was saved once:
- `recompute`: no load; the MLP runs over P + `new` tokens in every layer, then the attention read
- `async`: load the whole prefix, wait for its completion notice (the stream waits on its done event), then the
  MLP over `new` tokens and the attention read in every layer
- `in_step`: start a layer-ordered load, then per layer: the MLP over `new` tokens, a stream wait on that layer's
  progress counter (kvd_client.cuda_progress: no host wait), the attention read

Each figure is the time from the request's start to the end of the last layer's work (torch.cuda.synchronize),
`--reps` per mode and prefix, the three modes alternated within every rep (the order rotating) so drift hits all
alike. One JSON object: per prefix, each mode's median / p10 / p90 ms, the speedups against recompute and of in-step
against async, and the copy-bound floor (the prefix's bytes at the raw H2D rate, measured in the same run from a
pinned buffer the size of the largest prefix). `--cpu-dry-run` runs the same control flow on CPU tensors (CPU
transport, per-layer waits on the page's eventfd), tiny and quick: a check of this script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvd_client import KvdClient
from kvd_client.progress import ProgressPage
from phases import hashes, percentile

from tests.helpers.daemon import Daemon, wait_for

MiB = 1 << 20
BLOCK_TOKENS = 16
MODES = ("recompute", "async", "in_step")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", default="1024,4096,8192", help="prefix lengths in tokens")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--new", type=int, default=16, help="tokens computed on a hit (the prompt past the prefix)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="no new rep starts after this")
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    if args.cpu_dry_run:
        args.prefixes, args.reps, args.layers, args.hidden, args.kv_heads, args.head_dim = "64,128", 3, 2, 64, 2, 32
    return args


class Model:
    """The worker's layers: weights, its KV cache (per layer, vLLM's layout) and the per-layer work."""

    def __init__(self, args: argparse.Namespace, blocks: int, device: str) -> None:
        self.device, self.new = device, args.new
        dtype = torch.bfloat16
        self.w1 = [
            torch.randn(args.hidden, 4 * args.hidden, device=device, dtype=dtype) / 64 for _ in range(args.layers)
        ]
        self.w2 = [
            torch.randn(4 * args.hidden, args.hidden, device=device, dtype=dtype) / 64 for _ in range(args.layers)
        ]
        shape = (2, blocks, BLOCK_TOKENS, args.kv_heads, args.head_dim)
        self.caches = [torch.randn(shape, device=device).to(dtype) for _ in range(args.layers)]
        self.x = torch.randn(max(1, blocks // 2) * BLOCK_TOKENS + args.new, args.hidden, device=device, dtype=dtype)
        self.q = torch.randn(args.new, args.kv_heads * args.head_dim, device=device, dtype=dtype)
        self.block_bytes = args.layers * 2 * BLOCK_TOKENS * args.kv_heads * args.head_dim * 2

    def mlp(self, layer: int, tokens: int) -> torch.Tensor:
        return torch.nn.functional.gelu(self.x[:tokens] @ self.w1[layer]) @ self.w2[layer]

    def attention(self, layer: int, first: int, count: int) -> torch.Tensor:
        """The new tokens' attention over blocks [first, first + count) of `layer` (the prefix's K and V)."""
        kv = self.caches[layer][:, first : first + count]
        k, v = (kv[i].reshape(count * BLOCK_TOKENS, -1) for i in (0, 1))
        return torch.softmax((self.q @ k.T).float(), dim=-1).to(v.dtype) @ v

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


class Worker:
    """One request's first token in each mode, through a real client on the model's cache."""

    def __init__(self, model: Model, client: KvdClient, page: ProgressPage, layer_wait: Callable[..., Any]) -> None:
        self.model, self.client, self.page, self.layer_wait = model, client, page, layer_wait
        self.failures = 0

    def recompute(self, prefix_blocks: int, first: int) -> None:
        m = self.model
        for layer in range(len(m.caches)):
            m.mlp(layer, prefix_blocks * BLOCK_TOKENS + m.new)
            m.attention(layer, first, prefix_blocks)

    def async_load(self, pairs: list[tuple[int, bytes]]) -> None:
        m, first = self.model, pairs[0][0]
        done = self.client.wait([self.client.load(pairs)], 60)
        if not done or not done[0].ok:
            self.failures += 1
        else:
            self.client.wait_loaded(done[0])  # the current stream waits on the load's done event
        for layer in range(len(m.caches)):
            m.mlp(layer, m.new)
            m.attention(layer, first, len(pairs))

    def in_step(self, pairs: list[tuple[int, bytes]]) -> int:
        m, first = self.model, pairs[0][0]
        load = self.page.begin(layers=len(m.caches))
        if load is None:
            raise RuntimeError("no free progress entry")
        op = self.client.load(pairs, in_step=load)
        for layer in range(len(m.caches)):
            m.mlp(layer, m.new)  # this layer's work before its attention overlaps the copy of its KV
            self.layer_wait(load, layer)
            m.attention(layer, first, len(pairs))
        self._pending = (op, load)
        return op

    def end_in_step(self) -> None:
        """After the timing: the load's completion (the page entry is reused only once it arrived)."""
        op, load = self._pending
        done = self.client.wait([op], 60)
        if not done or not done[0].ok:
            self.failures += 1
        self.page.end(load)


def timed(model: Model, run: Callable[[], Any]) -> float:
    model.sync()
    start = time.perf_counter()
    run()
    model.sync()
    return (time.perf_counter() - start) * 1e3


def prefix_rounds(worker: Worker, prefix_blocks: int, load_at: int, reps: int, deadline: float) -> dict[str, Any]:
    """Save the prefix once (blocks [0, n)), then `reps` rounds of the three modes, each loading into
    [load_at, load_at + n)."""
    m, client = worker.model, worker.client
    saved = list(enumerate(hashes(f"prefix{prefix_blocks}", prefix_blocks)))
    m.sync()
    done = client.wait([client.save(saved)], 60)
    if not done or not done[0].ok:
        raise RuntimeError(f"saving the {prefix_blocks}-block prefix failed")
    pairs = [(load_at + i, h) for i, h in saved]
    runs: dict[str, Callable[[], Any]] = {
        "recompute": lambda: worker.recompute(prefix_blocks, load_at),
        "async": lambda: worker.async_load(pairs),
        "in_step": lambda: worker.in_step(pairs),
    }
    for mode in MODES:  # warm-up: kernels, allocator, the daemon's first in-step load on this mapping
        timed(m, runs[mode])
        if mode == "in_step":
            worker.end_in_step()
    ms: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rep in range(reps):
        if rep >= 5 and time.monotonic() > deadline:
            break
        for k in range(len(MODES)):
            mode = MODES[(rep + k) % len(MODES)]
            ms[mode].append(timed(m, runs[mode]))
            if mode == "in_step":
                worker.end_in_step()
    return summarize(ms, prefix_blocks, m.block_bytes)


def summarize(ms: dict[str, list[float]], prefix_blocks: int, block_bytes: int) -> dict[str, Any]:
    out: dict[str, Any] = {"prefix_tokens": prefix_blocks * BLOCK_TOKENS, "prefix_bytes": prefix_blocks * block_bytes}
    for mode, values in ms.items():
        out[f"{mode}_ms"] = {
            "median": round(statistics.median(values), 3),
            "p10": round(percentile(values, 0.1), 3),
            "p90": round(percentile(values, 0.9), 3),
            "n": len(values),
        }
    median = {mode: statistics.median(values) for mode, values in ms.items()}
    out["speedup_in_step_vs_recompute"] = round(median["recompute"] / median["in_step"], 2)
    out["speedup_async_vs_recompute"] = round(median["recompute"] / median["async"], 2)
    out["speedup_in_step_vs_async"] = round(median["async"] / median["in_step"], 2)
    return out


def raw_h2d_gbps(nbytes: int) -> float:
    """Pinned host -> device, one copy of `nbytes`, best of 5 (CUDA events)."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return round(nbytes / best / 1e9, 2)


def layer_waiter(client: KvdClient, page: ProgressPage, cuda: bool) -> Callable[..., Any]:
    if cuda:
        from kvd_client.cuda import current_stream
        from kvd_client.cuda_progress import StreamProgress

        return StreamProgress(page, current_stream).wait  # a stream wait, no host wait

    def host_wait(load: Any, layer: int) -> None:
        if not page.wait(load, layer, 30.0):
            raise RuntimeError(f"layer {layer} of an in-step load did not arrive")

    return host_wait


def main() -> int:
    args = parse_args()
    began = time.monotonic()
    cuda = not args.cpu_dry_run
    device = "cuda" if cuda else "cpu"
    prefixes = [int(p) // BLOCK_TOKENS for p in args.prefixes.split(",")]
    most = max(prefixes)
    model = Model(args, 2 * most, device)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)"}
    out["model"] = {k: getattr(args, k) for k in ("layers", "hidden", "kv_heads", "head_dim", "new")}
    out["block_bytes"] = model.block_bytes
    if cuda:
        out["raw_h2d_gbps"] = raw_h2d_gbps(most * model.block_bytes)
    pool = 2 * sum(prefixes) * model.block_bytes + 64 * MiB
    daemon = Daemon(capacity_bytes=pool, slab_bytes=16 * model.block_bytes, lease_ms=10_000, log_level="WARNING")
    with daemon.start(timeout=120):  # a CUDA daemon pins its pool before it serves
        client = KvdClient(daemon.socket, model_id="bench-in-step")
        caches = {f"model.layers.{i}.self_attn.attn": c for i, c in enumerate(model.caches)}
        client.register_kv_caches(caches, block_dim=1, block_size_tokens=BLOCK_TOKENS)
        client.start()
        try:
            if not client.wait_ready(60):
                raise SystemExit("client did not register:\n" + daemon.log_text())
            page = wait_for(lambda: client.index.page, 10, what="the progress page")
            if page is None:
                raise SystemExit("the daemon granted no progress page")
            worker = Worker(model, client, page, layer_waiter(client, page, cuda))
            deadline = began + args.budget_s
            out["prefixes"] = [prefix_rounds(worker, n, most, args.reps, deadline) for n in prefixes]
            out["failures"] = worker.failures
        finally:
            client.close()
    for row in out["prefixes"]:
        if "raw_h2d_gbps" in out:
            row["copy_floor_ms"] = round(row["prefix_bytes"] / (out["raw_h2d_gbps"] * 1e9) * 1e3, 3)
    out["bench_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(out, indent=1))
    return 0 if out["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
