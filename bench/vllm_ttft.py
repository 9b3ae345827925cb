"""Time to first token with kvd on CPU vLLM (tiny random Llama), and the overhead kvd adds when nothing hits.

    python bench/vllm_ttft.py [--requests 10] [--prefix 1000]

Two vLLM processes run the same phases, one request at a time with max_tokens=1 and the local prefix cache reset
before every request (so a hit can only come from kvd):
  warm-up, populate (one request: kvd saves the shared prefix), repeated (prompts sharing a --prefix-token prefix),
  unique (prompts sharing nothing: every lookup misses).
One process runs without a connector (recompute), the other with KvdConnector against a daemon started here.
Prints JSON: median TTFT per phase for both, the speed-up on hits, and the no-hit overhead in percent.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "client" / "vllm_worker.py"


def _worker(model: Path, work: Path, phases: list[list[list[int]]], name: str, socket: Path | None) -> dict[str, Any]:
    prompts = work / f"{name}.prompts.json"
    prompts.write_text(json.dumps(phases))
    out = work / f"{name}.json"
    cmd = [sys.executable, str(WORKER), "run", "--model", str(model), "--prompts", str(prompts), "--out", str(out)]
    cmd += ["--max-tokens", "1", "--one-by-one", "--reset-each"]
    if socket is not None:
        cmd += ["--socket", str(socket)]
    with (work / f"{name}.log").open("wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed:\n{(work / f'{name}.log').read_text()[-3000:]}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10, help="requests per measured phase")
    parser.add_argument("--prefix", type=int, default=1000, help="shared prefix length in tokens")
    parser.add_argument("--suffix", type=int, default=24, help="distinct tokens after the prefix")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kvd-bench-"))
    rng = random.Random(11)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, 512) for _ in range(n)]

    prefix = toks(args.prefix)
    warm = [toks(args.prefix + args.suffix) for _ in range(3)]
    populate = [prefix + toks(args.suffix)]
    repeated = [prefix + toks(args.suffix) for _ in range(args.requests)]
    unique = [toks(args.prefix + args.suffix) for _ in range(args.requests)]
    phases = [warm, populate, repeated, unique]

    subprocess.run([sys.executable, str(WORKER), "make-model", str(work / "model")], check=True, capture_output=True)
    socket = work / "kvd.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "kvd", "serve", "--socket", str(socket), "--capacity", "256MiB"],
        stdout=(work / "kvd.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [sys.executable, "-m", "kvd", "health", "--socket", str(socket)], capture_output=True
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("kvd did not start")
            time.sleep(0.2)
        base = _worker(work / "model", work, phases, "recompute", None)
        kvd = _worker(work / "model", work, phases, "kvd", socket)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)

    base_rep, kvd_rep = _median_ms(base["phase_times_s"][2]), _median_ms(kvd["phase_times_s"][2])
    base_uni, kvd_uni = _median_ms(base["phase_times_s"][3]), _median_ms(kvd["phase_times_s"][3])
    same = base["outputs"] == kvd["outputs"]
    result = {
        "model": "tiny random Llama (2 layers, hidden 128, bf16), CPU, block 32",
        "prefix_tokens": args.prefix,
        "prompt_tokens": args.prefix + args.suffix,
        "requests_per_phase": args.requests,
        "ttft_ms_recompute_median": base_rep,
        "ttft_ms_kvd_hit_median": kvd_rep,
        "hit_speedup": round(base_rep / kvd_rep, 2) if kvd_rep else None,
        "ttft_ms_no_connector_unique_median": base_uni,
        "ttft_ms_kvd_miss_unique_median": kvd_uni,
        "miss_overhead_pct": round((kvd_uni - base_uni) / base_uni * 100, 2) if base_uni else None,
        "kvd_external_hit_tokens": kvd["external_hits"],
        "outputs_identical": same,
        "raw_ms": {
            "recompute": [round(t * 1000, 2) for t in base["phase_times_s"][2]],
            "kvd_hit": [round(t * 1000, 2) for t in kvd["phase_times_s"][2]],
            "no_connector_unique": [round(t * 1000, 2) for t in base["phase_times_s"][3]],
            "kvd_unique": [round(t * 1000, 2) for t in kvd["phase_times_s"][3]],
        },
    }
    print(json.dumps(result, indent=2))
    if args.keep:
        print(f"work directory: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
