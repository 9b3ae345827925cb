"""GPU path benchmark (issue #18): kvd's saves and loads through a daemon in its own process, every figure next to
the raw limit measured in the same run, and where each operation's time goes.

    python bench/gpu_transfer.py [--trace-dir DIR] [--variant NAME:KVD_X=V,KVD_Y=W ...] > result.json

Workload: a vLLM-like cache of `layers` x `[2, blocks, 16, kv_heads, 128]` bfloat16 (2 MiB per block over 32 layers),
requests of 512 blocks (1 GiB) and 16 blocks (32 MiB); the daemon's pool holds 4 large requests. One JSON object:
- `raw`: pinned D2H / H2D / both at once, one small request's copy, the same into memory page-locked like kvd's
  pool (also both directions at once, whole and in kvd's chunk size), an in-process connector, NUMA placement.
- `main`: the phases of bench/phases.py against a daemon in its default configuration (each with its per-stage
  breakdown, concurrent ones with their timeline; saves and loads through the session's submission ring), the
  small-request phases by ring and by Save/Load RPC alternating (`paths`), the round-trip floors on the same
  socket, the model thread's time per call, and a bf16 matmul's slowdown while saving.
- `variants`: the throughput phases again, each against a fresh daemon with the chunk trace on
  (transports.cuda_trace_path) plus one configuration change; each phase carries its trace summary
  (bench/trace_report.py: per-direction busy time, per-chunk DMA rates alone and with the other direction, kernel
  times, gaps by cause). The raw traces are kept in --trace-dir.
- `summary`: issue #18's table, each figure with its raw limit and target.
`--cpu-dry-run` runs the same control flow on CPU tensors (CPU transport; no raw copies, traces or matmul): a check
of this script where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_interference import interference
from kvd_client import KvdClient
from phases import PhaseHook, Shape, Workload, both_paths, floors, model_thread, standard
from trace_report import TraceFile, summarize

from tests.helpers.daemon import Daemon

MiB = 1 << 20
# One configuration change each (besides the trace): the kernels' CTA cap (off, or tighter), the completion
# waiters' wake-up, staging depth and chunk size for both directions at once, and (on a host of several NUMA nodes)
# a pool first-touched by one thread instead of eight, or by the GPU's node's CPUs.
DEFAULT_VARIANTS = (  # in the order they matter: those past --budget-s are skipped
    "trace:",
    "uncapped:KVD_TRANSPORTS__CUDA_KERNEL_CTAS=0",
    "ctas_32:KVD_TRANSPORTS__CUDA_KERNEL_CTAS=32",
    "spin:KVD_TRANSPORTS__CUDA_COMPLETION_WAIT=spin",
    "lazy_start:KVD_RUNTIME__EAGER_OPERATIONS=false",
    "staging_1g:KVD_TRANSPORTS__CUDA_STAGING_BYTES=1073741824",
    "chunk_32m_staging_1g:KVD_TRANSPORTS__CUDA_CHUNK_BYTES=33554432,KVD_TRANSPORTS__CUDA_STAGING_BYTES=1073741824",
    "chunk_128m_staging_1g:KVD_TRANSPORTS__CUDA_CHUNK_BYTES=134217728,KVD_TRANSPORTS__CUDA_STAGING_BYTES=1073741824",
)
NUMA_VARIANT = "populate_1:KVD_HOST_POOL__POPULATE_THREADS=1"
VARIANT_SECONDS = 15  # a variant is skipped when less than this is left of --budget-s


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=2048)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--big", type=int, default=512)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--small-reps", type=int, default=100)
    parser.add_argument("--socket", type=Path, help="use this running daemon (main phases only)")
    parser.add_argument("--tp-rank", type=int, default=0, help="with --socket: this process's rank")
    parser.add_argument("--tp-world-size", type=int, default=1)
    parser.add_argument("--daemon-env", action="append", default=[], metavar="KVD_X=V", help="for every daemon")
    parser.add_argument("--variant", action="append", metavar="NAME:KVD_X=V,...", help="replaces the default set")
    parser.add_argument("--no-variants", action="store_true")
    parser.add_argument("--trace-dir", type=Path, help="keep the variants' chunk traces here")
    parser.add_argument("--budget-s", type=float, default=120.0, help="start no variant after this")
    parser.add_argument("--cpu-dry-run", action="store_true")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    began = time.monotonic()
    device = "cpu" if args.cpu_dry_run else "cuda"
    shape = Shape(big=args.big, small=args.small, small_reps=args.small_reps)
    layer = (2, args.blocks, 16, args.kv_heads, 128)
    caches = [torch.randn(layer, device=device).to(torch.bfloat16) for _ in range(args.layers)]
    block_bytes = args.layers * 2 * 16 * args.kv_heads * 128 * 2
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"}
    out.update(torch=torch.__version__, block_bytes=block_bytes, big_bytes=args.big * block_bytes)
    out["small_bytes"] = args.small * block_bytes
    if device == "cuda":
        from gpu_raw import in_process_baseline, raw_copies, registered_copies

        out["raw"] = raw_copies(args.big * block_bytes, args.small * block_bytes)
        out["raw"].update(in_process_baseline(caches, args.big))
        out["raw"].update(registered_copies(args.big * block_bytes, block_bytes, 64 * MiB))
    base_env = dict(kv.split("=", 1) for kv in args.daemon_env)
    out["main"] = daemon_pass(args, caches, block_bytes, shape, base_env, None, quick=False)
    out["variants"] = {}
    if not (args.no_variants or args.socket):
        trace_dir = args.trace_dir or Path(tempfile.mkdtemp(prefix="kvd-trace-"))
        trace_dir.mkdir(parents=True, exist_ok=True)
        (trace_dir / "partial.json").write_text(json.dumps(out))
        for spec in args.variant or (*DEFAULT_VARIANTS, *numa_variants(caches[0].is_cuda)):
            name, _, changes = spec.partition(":")
            if time.monotonic() - began > args.budget_s - VARIANT_SECONDS:
                out["variants"][name] = {"skipped": "time budget"}
                continue
            env = {**base_env, **dict(kv.split("=", 1) for kv in changes.split(",") if kv)}
            try:
                result = daemon_pass(args, caches, block_bytes, shape, env, trace_dir / f"{name}.jsonl")
            except Exception as exc:  # one variant failing must not cost the others (nor the main figures)
                result = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
            out["variants"][name] = {**result, "env": env}
            (trace_dir / "partial.json").write_text(json.dumps(out))  # what a timeout would otherwise lose
    out["summary"] = summary(out)
    out["bench_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(out, indent=1))
    print_table(out)
    return 0


def numa_variants(cuda: bool) -> list[str]:
    """On a host of several NUMA nodes: the pool first-touched by one thread, and by the GPU's node's CPUs."""
    if len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) < 2:
        return []
    from gpu_raw import numa

    node = numa(None).get("gpu_numa_node", -1) if cuda else -1
    return [NUMA_VARIANT, *([f"numa_gpu:KVD_HOST_POOL__NUMA_NODE={node}"] if node >= 0 else [])]


def print_table(out: dict[str, Any]) -> None:
    """The summary and each variant's figures, short, on stderr (the end of a device run's output)."""
    lines = [f"{out['device']}: {out['bench_s']} s"]
    for name, row in out["summary"].items():
        lines.append(f"{name:28} kvd {row['kvd']!s:>8}  raw {row['raw']!s:>8}  target {row['target']}")
    for name, variant in out["variants"].items():
        phases = variant.get("phases", {})
        rates = " ".join(
            f"{p}={phases[p]['gbps']}" for p in ("big_save", "big_load", "big_both", "many_mixed") if p in phases
        )
        both = phases.get("big_both", {}).get("trace", {})
        busy = " ".join(
            f"{k}:busy={both[k].get('busy_fraction')},{both[k].get('gbps_while_busy')}GB/s,gaps={both[k].get('gap_ms_by_cause')}"
            for k in ("save", "load")
            if both.get(k)
        )
        failed = [line for line in str(variant.get("error", "")).splitlines() if line.strip()][-1:]
        lines.append(f"variant {name}: {variant.get('skipped') or ''.join(failed)[:160] or rates} | both: {busy}")
    print("\n".join(lines), file=sys.stderr)


def daemon_pass(
    args: argparse.Namespace,
    caches: list[torch.Tensor],
    block_bytes: int,
    shape: Shape,
    env: dict[str, str],
    trace_path: Path | None,
    quick: bool = True,
) -> dict[str, Any]:
    """Start a daemon with `env` (and the trace at `trace_path`), register the cache, run the phases."""
    daemon: Daemon | None = None
    socket = args.socket
    out: dict[str, Any] = {}
    if socket is None:
        if trace_path is not None:
            env = {**env, "KVD_TRANSPORTS__CUDA_TRACE_PATH": str(trace_path)}
        pool = 4 * shape.big * block_bytes
        daemon = Daemon(capacity_bytes=pool, slab_bytes=32 * block_bytes, lease_ms=10_000, log_level="WARNING", env=env)
        started = time.monotonic()
        daemon.start(timeout=300)
        out["daemon_start_s"] = round(time.monotonic() - started, 2)
        if caches[0].is_cuda:  # where this daemon's pool landed, against the GPU's NUMA node
            from gpu_raw import numa

            out["numa"] = numa(daemon.pid)
        socket = daemon.socket
    client = KvdClient(socket, model_id="bench", tp_rank=args.tp_rank, tp_world_size=args.tp_world_size)
    client.register_kv_caches({f"layer{i}": c for i, c in enumerate(caches)}, block_dim=1, block_size_tokens=16)
    client.start()
    try:
        if not client.wait_ready(60):
            raise SystemExit("client did not register:\n" + (daemon.log_text() if daemon else ""))
        work = Workload(client, args.blocks, block_bytes)
        hook = trace_hook(TraceFile(trace_path), block_bytes) if trace_path is not None else None
        out["phases"] = standard(work, shape, hook, quick=quick)
        if not quick:
            out.update(model_thread(work))
            out["paths"] = both_paths(work, shape)  # ring vs RPC, alternating, on this session
            out["floors"] = floors(client, str(socket), args.small)
            if caches[0].is_cuda:
                out.update(interference(client, shape.big))
    finally:
        client.close()
        if daemon is not None:
            daemon.close()
    return out


def trace_hook(trace: TraceFile, block_bytes: int) -> PhaseHook:
    def hook(phase: str, start_ns: int, end_ns: int) -> dict[str, Any] | None:
        time.sleep(0.05)  # the waiters write an operation's line just after its notice went out
        records = trace.records(start_ns, end_ns)
        return {"trace": summarize(records, trace.header, block_bytes)} if records else None

    return hook


def summary(out: dict[str, Any]) -> dict[str, Any]:
    """Issue #18's table: each figure, the raw limit from this run, the target."""
    raw, main = out.get("raw", {}), out["main"]
    phases = main["phases"]
    small = phases["small_alone"]

    def row(value: Any, limit: Any, target: str) -> dict[str, Any]:
        return {"kvd": value, "raw": limit, "target": target}

    return {
        "save_1g_gbps": row(phases["big_save"]["gbps"], raw.get("raw_d2h_gbps"), ">= 52"),
        "load_1g_gbps": row(phases["big_load"]["gbps"], raw.get("raw_h2d_gbps"), ">= 52"),
        "both_gbps": row(phases["big_both"]["gbps"], raw.get("raw_both_gbps"), ">= 0.9 x raw"),
        "small_save_ms_p50": row(small["save"]["call_to_notice_ms_p50"], raw.get("raw_small_d2h_ms"), "<= 1.2"),
        "small_load_ms_p50": row(small["load"]["call_to_notice_ms_p50"], raw.get("raw_small_h2d_ms"), "<= 1.2"),
        "many_save_gbps": row(phases["many_save"]["gbps"], raw.get("raw_d2h_gbps"), ">= 48"),
        "many_load_gbps": row(phases["many_load"]["gbps"], raw.get("raw_h2d_gbps"), ">= 48"),
        "many_mixed_gbps": row(phases["many_mixed"]["gbps"], raw.get("raw_both_gbps"), "-"),
        "model_thread_call_us_p50": row(main.get("model_thread_call_us_p50"), None, "<= 50"),
        "matmul_slowdown_pct": row(main.get("model_stream_slowdown_pct"), None, "<= 2"),
        # What the saves beside the matmul moved meanwhile, next to the D2H limit (the matmul's slowdown means little
        # if the saves stalled).
        "saved_gbps_during_matmul": row(main.get("saved_gbps_during_matmul"), raw.get("raw_d2h_gbps"), "-"),
        "floor_aio_heartbeat_us_p50": row(main.get("floors", {}).get("aio_heartbeat_us", {}).get("p50"), None, "-"),
        # The lookup under every request: in-process from the shared index, next to the RPC it replaced.
        "lookup_16_us_p50": row(_floor(main, "client_lookup"), _floor(main, "rpc_lookup"), "in-process"),
        **path_rows(main.get("paths", {}), raw, row),
    }


def path_rows(paths: dict[str, Any], raw: dict[str, Any], row: Any) -> dict[str, Any]:
    """The small-request figures by submission ring and by RPC (bench/phases.both_paths): each round's, in order."""
    out: dict[str, Any] = {}
    for name, limit, target in (
        ("small_save_ms_p50", raw.get("raw_small_d2h_ms"), "<= 1.2"),
        ("small_load_ms_p50", raw.get("raw_small_h2d_ms"), "<= 1.2"),
        ("many_save_gbps", raw.get("raw_d2h_gbps"), ">= 48"),
        ("many_load_gbps", raw.get("raw_h2d_gbps"), ">= 48"),
        ("model_thread_call_us_p50", None, "<= 50"),
    ):
        for path in ("ring", "rpc"):
            if path in paths:
                out[f"{name}_{path}"] = row([r.get(name) for r in paths[path]], limit, target)
    return out


def _floor(main: dict[str, Any], kind: str) -> Any:
    floors = main.get("floors", {})
    name = next((k for k in floors if k.startswith(kind + "_") and k.endswith("_us")), None)
    return floors[name].get("p50") if name is not None else None


if __name__ == "__main__":
    sys.exit(main())
