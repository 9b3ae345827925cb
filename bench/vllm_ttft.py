"""Time to first token on CPU vLLM (tiny random Llama): what kvd costs when nothing hits, and what a hit saves.

    python bench/vllm_ttft.py [--pairs 60] [--prompt-tokens 1024] [--prefixes 64,128,256,512,1024,1536]

Machine noise on a shared VM swings a TTFT by tens of percent between minutes, so the engines are compared side by
side: two long-lived vLLM processes (`tests/client/vllm_worker.py serve`), one without a connector and one with
KvdConnector against a daemon started here (more with `--engines`), are sent the same prompt one after the other,
the order alternating from pair to pair, max_tokens=1, the local prefix cache reset before each request (so a hit
can only come from kvd). Each figure is then a median of per-pair ratios, with a bootstrap interval.

- no hits: `--pairs` prompts of `--prompt-tokens` fresh tokens each (every lookup misses; kvd saves them all)
- hits: for each prefix length, one request stores the prefix, then `--hit-pairs` prompts share it (the engine
  without a connector recomputes it): the crossover is the shortest prefix from which a kvd hit beats recompute

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.helpers

from tests.helpers.daemon import Daemon  # noqa: E402

WORKER = ROOT / "tests" / "client" / "vllm_worker.py"
VOCAB = 512
BOOTSTRAP_ROUNDS = 2000


class Engine:
    """One `vllm_worker.py serve` process."""

    def __init__(self, name: str, model: Path, work: Path, socket: Path | None, extra: dict[str, Any]) -> None:
        self.name = name
        cmd = [sys.executable, str(WORKER), "serve", "--model", str(model)]
        if socket is not None:
            cmd += ["--socket", str(socket), "--extra", json.dumps(extra)]
        self._log = (work / f"{name}.log").open("w")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1
        )
        self._expect("KVD-READY")

    def _expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise SystemExit(f"engine {self.name} ended; see its log")

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        return json.loads(self._expect("KVD-REPLY "))  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def side_by_side(engines: list[Engine], prompts: list[list[int]]) -> dict[str, list[dict[str, Any]]]:
    """Every prompt to every engine, one after the other; the order rotates from prompt to prompt."""
    replies: dict[str, list[dict[str, Any]]] = {e.name: [] for e in engines}
    for i, prompt in enumerate(prompts):
        order = engines[i % len(engines) :] + engines[: i % len(engines)]
        for engine in order:
            replies[engine.name].append(engine.ask({"prompt": prompt}))
    return replies


def compare(base: list[float], other: list[float], seed: int = 0) -> dict[str, Any]:
    """`other` against `base`, pair by pair: the median ratio minus one, in percent, with a bootstrap 95% interval
    of that median, the interquartile range of the ratios, and both medians."""
    ratios = [o / b for b, o in zip(base, other, strict=True)]
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(BOOTSTRAP_ROUNDS)
    )  # fmt: skip
    q1, _, q3 = statistics.quantiles(ratios, n=4)

    def pct(r: float) -> float:
        return round((r - 1) * 100, 2)

    return {
        "pairs": len(ratios),
        "median_pct": pct(statistics.median(ratios)),
        "ci95_pct": [pct(medians[int(0.025 * BOOTSTRAP_ROUNDS)]), pct(medians[int(0.975 * BOOTSTRAP_ROUNDS) - 1])],
        "iqr_pct": [pct(q1), pct(q3)],
        "median_ms": {"base": ms(statistics.median(base)), "other": ms(statistics.median(other))},
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def ttfts(replies: list[dict[str, Any]]) -> list[float]:
    return [float(r["ttft_s"]) for r in replies]


def hit_phase(engines: list[Engine], prefix_len: int, pairs: int, suffix: int, rng: random.Random) -> dict[str, Any]:
    """Store a prefix through every kvd engine, then time prompts that share it."""
    prefix = [rng.randrange(3, VOCAB) for _ in range(prefix_len)]
    for engine in engines[1:]:
        engine.ask({"prompt": [*prefix, *(rng.randrange(3, VOCAB) for _ in range(suffix))]})
    before = {e.name: e.ask({"stats": True})["external_hits"] for e in engines}
    prompts = [[*prefix, *(rng.randrange(3, VOCAB) for _ in range(suffix))] for _ in range(pairs)]
    replies = side_by_side(engines, prompts)
    base = engines[0].name
    out: dict[str, Any] = {
        "prefix_tokens": prefix_len,
        "recompute_median_ms": ms(statistics.median(ttfts(replies[base]))),
    }
    for engine in engines[1:]:
        hits = engine.ask({"stats": True})["external_hits"] - before[engine.name]
        out[engine.name] = {
            **compare(ttfts(replies[base]), ttfts(replies[engine.name])),
            "hit_tokens_per_request": round(hits / pairs, 1),
            "same_tokens": [r["tokens"] for r in replies[engine.name]] == [r["tokens"] for r in replies[base]],
        }
    return out


def crossover(phases: list[dict[str, Any]], name: str) -> int | None:
    """The shortest prefix from which `name`'s hits are faster than recompute at every longer prefix measured."""
    best = None
    for phase in reversed(phases):
        if phase[name]["median_pct"] >= 0 or phase[name]["hit_tokens_per_request"] <= 0:
            break
        best = phase["prefix_tokens"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60, help="no-hit prompts per engine")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--prefixes", default="64,128,256,512,1024,1536", help="hit prefix lengths (tokens)")
    parser.add_argument("--hit-pairs", type=int, default=12, help="prompts per engine and prefix length")
    parser.add_argument("--suffix", type=int, default=24, help="fresh tokens after a shared prefix")
    parser.add_argument(
        "--engines", default='{"kvd": {}}', help="JSON: engine name -> kv_connector_extra_config beside the socket"
    )
    args = parser.parse_args()
    rng = random.Random(11)
    variants: dict[str, dict[str, Any]] = json.loads(args.engines)

    with Daemon(capacity_bytes=256 << 20, slab_bytes=8 << 20, lease_ms=10_000, log_level="WARNING") as daemon:
        work = daemon.workdir
        subprocess.run(
            [sys.executable, str(WORKER), "make-model", str(work / "model")], check=True, capture_output=True
        )
        engines = [Engine("no_connector", work / "model", work, None, {})]
        try:
            # Each kvd engine in a namespace of its own (model_id): engines never hit what another one saved.
            engines += [
                Engine(name, work / "model", work, daemon.socket, {"model_id": name, **extra})
                for name, extra in variants.items()
            ]
            warm = [[rng.randrange(3, VOCAB) for _ in range(args.prompt_tokens)] for _ in range(4)]
            side_by_side(engines, warm)
            fresh = [[rng.randrange(3, VOCAB) for _ in range(args.prompt_tokens)] for _ in range(args.pairs)]
            misses = side_by_side(engines, fresh)
            hits = [hit_phase(engines, int(n), args.hit_pairs, args.suffix, rng) for n in args.prefixes.split(",") if n]
            stats = {e.name: e.ask({"stats": True}) for e in engines}
        finally:
            for engine in engines:
                engine.close()

    base = ttfts(misses["no_connector"])
    result: dict[str, Any] = {
        "bench": "vllm_ttft",
        "model": "tiny random Llama (2 layers, hidden 128, bf16), CPU, block 32",
        "prompt_tokens": args.prompt_tokens,
        "no_hit": {name: compare(base, ttfts(misses[name])) for name in variants},
        "no_hit_same_tokens": {
            name: [r["tokens"] for r in misses[name]] == [r["tokens"] for r in misses["no_connector"]]
            for name in variants
        },
        "hits": hits,
        "crossover_prefix_tokens": {name: crossover(hits, name) for name in variants},
        "engine_stats": stats,
        "raw_no_hit_ms": {name: [ms(t) for t in ttfts(replies)] for name, replies in misses.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
