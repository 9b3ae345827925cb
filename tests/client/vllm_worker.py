"""Run one vLLM instance (CPU, tiny model) in its own process and print what it generated as JSON.

Used by tests/client/test_vllm_connector.py and bench/vllm_ttft.py; each run is a fresh process, so a run that
hits kvd proves the keys survive a process boundary (and a different PYTHONHASHSEED).

    python tests/client/vllm_worker.py make-model DIR
    python tests/client/vllm_worker.py run --model DIR --prompts FILE [--socket PATH] ...
    python tests/client/vllm_worker.py serve --model DIR [--socket PATH] ...

`serve` keeps one engine and answers requests one at a time, so a benchmark can alternate between two engines
request by request: each stdin line is a JSON object {"prompt": [token ids]} (the local prefix cache is reset first,
so a hit can only come from kvd), or {"stats": true}; each answer is one stdout line `KVD-REPLY {json}` with the
request's time to first token (max_tokens=1), its tokens and the external-hit counter. `KVD-READY` comes first.

`--prompts` is a JSON file: a list of phases, each a list of prompts (lists of token ids). Between phases the
worker can hand control to the caller: with `--pause-file F` it creates `F.<i>` after phase i and waits for
`F.<i>.go` before phase i+1 (the caller kills or restarts the daemon meanwhile). With `--repeat-until-hit` a
phase is re-run (local prefix cache reset each time) until it records external hits, at most N times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Small and fast on a 2-core CI machine; the KV cache holds 256 blocks of 32 tokens.
KV_CACHE_BYTES = 64 << 20
MAX_MODEL_LEN = 2048
BLOCK_SIZE = 32


def make_model(out: Path) -> None:
    """A random tiny Llama, saved once per test session (the seed makes it the same every time)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=MAX_MODEL_LEN,
        torch_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)


def _counter(metrics: list[Any], name: str) -> float:
    total = 0.0
    for metric in metrics:
        if metric.name == name and hasattr(metric, "value"):
            total += float(metric.value)
    return total


def make_llm(args: argparse.Namespace) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if args.socket:
        extra: dict[str, Any] = {"socket": args.socket}
        if args.extra:
            extra.update(json.loads(args.extra))
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvdConnector",
            "kv_connector_module_path": "kvd_client.vllm.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        }
    return LLM(
        model=args.model,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        block_size=BLOCK_SIZE,
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
        max_num_batched_tokens=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )


def serve(args: argparse.Namespace) -> None:
    """One engine, one request per stdin line, one `KVD-REPLY` line per request (see the module docstring)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = make_llm(args)
    params = SamplingParams(temperature=0, max_tokens=1, detokenize=False, ignore_eos=True)
    print("KVD-READY", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        reply: dict[str, Any] = {}
        if "prompt" in request:
            llm.reset_prefix_cache()
            t = time.perf_counter()
            (out,) = llm.generate([TokensPrompt(prompt_token_ids=request["prompt"])], params, use_tqdm=False)
            reply = {"ttft_s": time.perf_counter() - t, "tokens": list(out.outputs[0].token_ids)}
        metrics = llm.get_metrics()
        reply["external_hits"] = _counter(metrics, "vllm:external_prefix_cache_hits")
        if request.get("stats"):  # the connector's own counters (vllm:kvd_*), summed over engines
            reply["connector"] = {
                m.name.removeprefix("vllm:kvd_"): _counter(metrics, m.name)
                for m in metrics
                if m.name.startswith("vllm:kvd_")
            }
        print("KVD-REPLY " + json.dumps(reply), flush=True)
    llm.llm_engine.engine_core.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    phases: list[list[list[int]]] = json.loads(Path(args.prompts).read_text())
    t0 = time.monotonic()
    llm = make_llm(args)
    startup_s = time.monotonic() - t0
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, detokenize=False, ignore_eos=True)
    outputs: list[list[list[int]]] = []
    hits_after_phase: list[float] = []
    phase_times: list[list[float]] = []
    for i, phase in enumerate(phases):
        if i and args.pause_file:
            Path(f"{args.pause_file}.{i}").touch()
            go = Path(f"{args.pause_file}.{i}.go")
            deadline = time.monotonic() + 120
            while not go.exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"nobody created {go}")
                time.sleep(0.05)
        attempts = args.repeat_until_hit if (args.repeat_until_hit and i == len(phases) - 1) else 1
        before = _counter(llm.get_metrics(), "vllm:external_prefix_cache_hits")
        for _ in range(attempts):
            llm.reset_prefix_cache()
            results, times = [], []
            if args.one_by_one:
                for p in phase:
                    if args.reset_each:
                        llm.reset_prefix_cache()
                    t = time.perf_counter()
                    (out,) = llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
                    times.append(time.perf_counter() - t)
                    results.append(out)
            else:
                results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in phase], params, use_tqdm=False)
            if _counter(llm.get_metrics(), "vllm:external_prefix_cache_hits") > before:
                break
            time.sleep(0.5)  # the client re-registers by itself; give it a moment
        outputs.append([list(r.outputs[0].token_ids) for r in results])
        phase_times.append(times)
        hits_after_phase.append(_counter(llm.get_metrics(), "vllm:external_prefix_cache_hits"))
    metrics = llm.get_metrics()
    report = {
        "outputs": outputs,
        "external_hits": _counter(metrics, "vllm:external_prefix_cache_hits"),
        "external_queries": _counter(metrics, "vllm:external_prefix_cache_queries"),
        "hits_after_phase": hits_after_phase,
        "phase_times_s": phase_times,
        "startup_s": startup_s,
        "pid": os.getpid(),
    }
    # Shut the engine down here, while the process is whole: the connector lets in-flight saves finish first.
    llm.llm_engine.engine_core.shutdown()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model")
    mk.add_argument("dir", type=Path)
    rn = sub.add_parser("run")
    rn.add_argument("--prompts", required=True)
    sv = sub.add_parser("serve")
    for p in (rn, sv):
        p.add_argument("--model", required=True)
        p.add_argument("--socket", default="")
        p.add_argument("--extra", default="", help="JSON merged into kv_connector_extra_config")
    rn.add_argument("--max-tokens", type=int, default=8)
    rn.add_argument("--pause-file", default="")
    rn.add_argument("--repeat-until-hit", type=int, default=0)
    rn.add_argument("--one-by-one", action="store_true", help="one request at a time, timing each")
    rn.add_argument("--reset-each", action="store_true", help="reset the local prefix cache before each request")
    rn.add_argument("--out", default="", help="write the JSON report here (stdout otherwise)")
    args = parser.parse_args()
    if args.cmd == "make-model":
        make_model(args.dir)
        return
    if args.cmd == "serve":
        serve(args)
        return
    report = run(args)
    text = json.dumps(report)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write("KVD-REPORT " + text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
