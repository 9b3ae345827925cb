"""A soak of the daemon as an operator runs it, with every tier in use; prints one JSON object.

    python bench/soak.py [--minutes 10] [--workers 4] [--cluster] [--faults kill-daemon,stop-redis,kill-redis,fill-disk]

A real daemon (`python -m kvd serve`, small L1, a disk tier, a Redis or a 3-shard Redis Cluster started here on
loopback) and `--workers` real worker processes (tests/helpers/worker.py: a KvdClient over CPU KV caches) that save
and load blocks from one shared, skewed hash space for `--minutes`:

* save: write each block's contents (derived from its hash alone) into the cache, save, then look the blocks up
  at once: read-your-writes must hold (a trial that overlaps a fault is not counted);
* load: poison the target blocks, load hashes any worker may have saved, and verify every block the daemon said
  it loaded against the contents derived from its hash: `wrong_blocks` must stay 0.

Faults (`--faults`, one every `--fault-every` s, in turn): kill -9 the daemon and start it again; SIGSTOP Redis (or
one shard) for a few seconds; kill -9 Redis (or one shard) and start it again, empty; fill the disk tier's
filesystem (a tmpfs mounted here when run as root, else the fault is skipped) and free it again.

Reported: operations, blocks, errors by kind, wrong blocks, read-your-writes trials, faults, the daemon's RSS, open
fds and threads sampled every `--sample-every` s, and the tiers' own figures at the end next to what the stores and
the filesystem say.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.soak_faults import Faults, Stores, tier_figures
from tests.helpers.daemon import Daemon
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.worker import WorkerError, WorkerProcess

MiB = 1 << 20
MODEL = "soak-model"
SPEC = CacheSpec(num_layers=4, num_blocks=64, block_size=16, kv_heads=8, head_dim=64)  # 128 KiB blocks
BATCH = 16
SAVE_SLOTS = range(0, 32)
LOAD_SLOTS = range(32, 64)
POISON = block_hash(0, "soak-poison")


class Tally:
    """Every worker thread's counts, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.blocks: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong: list[str] = []

    def add(self, ops: str | None = None, error: str | None = None, **blocks: int) -> None:
        with self.lock:
            if ops:
                self.ops[ops] += 1
            if error:
                self.errors[error] += 1
            self.blocks.update(blocks)


def error_kind(result: dict[str, Any]) -> str:
    if result.get("timeout"):
        return "timeout"
    text = str(result.get("error") or "")
    return text.split(":", 1)[0].strip() or "failed_blocks"


def pick(rng: random.Random, hashes: list[bytes], n: int) -> list[bytes]:
    """A skewed draw: four in five from the hottest fifth, so blocks are reused and the tiers matter."""
    hot = len(hashes) // 5
    out: dict[bytes, None] = {}
    while len(out) < n:
        pool = hashes[:hot] if rng.random() < 0.8 else hashes[hot:]
        out[rng.choice(pool)] = None
    return list(out)


def save_once(worker: WorkerProcess, rng: random.Random, hashes: list[bytes], tally: Tally, faults: Faults) -> None:
    pairs = list(zip(rng.sample(SAVE_SLOTS, BATCH), pick(rng, hashes, BATCH), strict=True))
    worker.fill(pairs)
    epoch = faults.epoch
    result = worker.save(pairs, timeout=30)
    if not result.get("ok"):
        tally.add("save", error_kind(result))
        return
    tally.add("save", saved=BATCH)
    hit = worker.lookup([h for _, h in pairs]).get("hit_blocks", 0)
    if faults.epoch != epoch or faults.active:
        return  # a fault overlapped the trial: the daemon may have restarted
    tally.add(ryw_trials=1, ryw_violations=int(hit != BATCH))


def load_once(worker: WorkerProcess, rng: random.Random, hashes: list[bytes], tally: Tally) -> None:
    pairs = list(zip(rng.sample(LOAD_SLOTS, BATCH), pick(rng, hashes, BATCH), strict=True))
    worker.fill([(i, POISON) for i, _ in pairs])  # a block the daemon claims but did not write shows as wrong
    result = worker.load(pairs, timeout=30)
    failed = set(result.get("failed", []))
    loaded = [(i, h) for i, h in pairs if h.hex() not in failed] if not result.get("timeout") else []
    wrong = worker.verify(loaded) if loaded else []
    with tally.lock:
        tally.ops["load"] += 1
        tally.blocks.update(loaded=len(loaded), missed=len(pairs) - len(loaded), verified=len(loaded))
        tally.blocks["wrong"] += len(wrong)
        tally.wrong.extend(h.hex() for h in wrong[:10])
        if result.get("error") and not result.get("failed"):
            tally.errors[error_kind(result)] += 1


def drive(worker: WorkerProcess, seed: int, hashes: list[bytes], deadline: float, tally: Tally, faults: Faults):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        try:
            if rng.random() < 0.5:
                save_once(worker, rng, hashes, tally, faults)
            else:
                load_once(worker, rng, hashes, tally)
        except WorkerError as exc:
            tally.add(error=f"worker: {str(exc)[:60]}")
            return
        except (KeyError, ValueError) as exc:
            tally.add(error=f"reply: {type(exc).__name__}")


def sample_daemon(daemon: Daemon, start: float) -> dict[str, Any]:
    pid = daemon.proc.pid if daemon.proc is not None else None
    out: dict[str, Any] = {"t_s": round(time.monotonic() - start, 1), "pid": pid}
    if pid is None:
        return out
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out["rss_mib"] = round(int(fields["VmRSS"].split()[0]) / 1024, 1)
        out["threads"] = int(fields["Threads"])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, KeyError, ValueError):
        out["gone"] = True
    return out


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ("rss_mib", "fds", "threads"):
        values = [s[field] for s in samples if field in s]
        if values:
            out[field] = {"first": values[0], "max": max(values), "last": values[-1]}
    return out


def daemon_env(args: argparse.Namespace, stores: Stores) -> dict[str, str]:
    return {
        "KVD_DISK__PATH": str(stores.disk_path),
        "KVD_DISK__CAPACITY_BYTES": str(args.disk_mib * MiB),
        "KVD_DISK__RESERVE_BYTES": str(4 * MiB),
        "KVD_REDIS__URL": stores.redis_url,
        "KVD_REDIS__CLUSTER": "true" if args.cluster else "false",
        "KVD_REDIS__ACCOUNTING_INTERVAL_S": "10",
        "KVD_TIERS__RECOMPUTE_US_PER_TOKEN": "1000",
        "KVD_LOG__LEVEL": "INFO",
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    hashes = [block_hash(i, "soak") for i in range(args.hashes)]
    tally = Tally()
    (workdir / "daemon").mkdir()
    with Stores(workdir, cluster=args.cluster, disk_mib=args.disk_mib) as stores:
        daemon = Daemon(workdir / "daemon", capacity_bytes=args.l1_mib * MiB, slab_bytes=4 * MiB, lease_ms=5000,
                        env=daemon_env(args, stores))  # fmt: skip
        daemon.start()
        faults = Faults(args.faults, args.fault_every, daemon, stores)
        workers = [WorkerProcess(daemon.socket, SPEC, MODEL, name=f"soak-{i}", log_path=workdir / f"w{i}.log")
                   for i in range(args.workers)]  # fmt: skip
        try:
            for worker in workers:
                worker.wait_ready(120)
            start = time.monotonic()
            deadline = start + args.minutes * 60
            threads = [threading.Thread(target=drive, args=(w, 1000 + i, hashes, deadline, tally, faults))
                       for i, w in enumerate(workers)]  # fmt: skip
            for thread in threads:
                thread.start()
            samples = faults.run_until(deadline, args.sample_every, lambda: sample_daemon(daemon, start))
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - start
            tiers = tier_figures(daemon, stores)
        finally:
            for worker in workers:
                worker.ask_exit()
            for worker in workers:
                worker.close()
            daemon.close()
    return report(args, tally, faults, samples, elapsed, tiers)


def report(args: argparse.Namespace, tally: Tally, faults: Faults, samples: list[dict[str, Any]], elapsed: float,
           tiers: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    ops = sum(tally.ops.values())
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("dir", "keep", "workdir")},
        "block_bytes": SPEC.block_bytes,
        "elapsed_s": round(elapsed, 1),
        "ops": dict(tally.ops),
        "ops_per_s": round(ops / elapsed, 1),
        "blocks": dict(tally.blocks),
        "wrong_blocks": tally.blocks["wrong"],
        "wrong_examples": tally.wrong[:10],
        "errors": dict(tally.errors),
        "faults": dict(faults.done),
        "daemon": summarize(samples),
        "daemon_samples": samples,
        "tiers": tiers,
        "loadavg_1m": os.getloadavg()[0],
        "workdir": str(args.workdir) if args.keep else None,
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--hashes", type=int, default=4000, help="shared hash space (x 128 KiB blocks)")
    parser.add_argument("--l1-mib", type=int, default=32)
    parser.add_argument("--disk-mib", type=int, default=192)
    parser.add_argument("--cluster", action="store_true", help="a 3-shard Redis Cluster instead of one Redis")
    parser.add_argument("--faults", default="", help="comma-separated: kill-daemon,stop-redis,kill-redis,fill-disk")
    parser.add_argument("--fault-every", type=float, default=60.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--dir", default=None, help="where the temporary directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) afterwards")
    args = parser.parse_args()
    workdir = args.workdir = Path(tempfile.mkdtemp(prefix="kvd-soak-", dir=args.dir))
    try:
        result = run(args, workdir)
    finally:
        subprocess.run(["umount", str(workdir / "disk-fs")], capture_output=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if result["wrong_blocks"] == 0 and result["blocks"].get("ryw_violations", 0) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
