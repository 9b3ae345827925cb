"""Drive kvd's vLLM connector through the real scheduler of whichever vLLM is importable, with a fake model on
CPU and a real kvd daemon; print a JSON report.

tests/client/test_vllm_releases.py runs it once per supported release (each release's Python sources on
PYTHONPATH, with the CPU torch of the test environment), so every release's own Scheduler calls the connector the
way it does in production: lookups, async loads, saves, finished requests, preemption and resumption.

    python tests/client/vllm_release_driver.py --model DIR --socket SOCK --out REPORT.json

The fake model writes, for every token it computes, a value that depends only on the token and its position into
that token's slot of every layer; it samples the next token from the last one. So a block loaded from kvd is
correct iff its bytes equal what the model would have written, which the driver checks after every load.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

BLOCK = 32
HEADS = 2
HEAD_SIZE = 32
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
MAX_STEPS = 3000


def _kw(fn: Any, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments `fn` accepts (constructors differ a little between releases)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def make_configs(model: str, socket: str, num_blocks: int) -> tuple[Any, Any]:
    import torch
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    model_config = ModelConfig(model=model, dtype="bfloat16", seed=0, skip_tokenizer_init=True, max_model_len=2048)
    scheduler_config = SchedulerConfig(
        **_kw(
            SchedulerConfig,
            max_num_seqs=4,
            max_num_batched_tokens=256,
            max_model_len=2048,
            is_encoder_decoder=False,
            enable_chunked_prefill=True,
            max_num_inflight_kv_loads=2,  # 0.34: loads may start while the batch is full (may_load_async)
        )
    )
    cache_config = CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, enable_prefix_caching=True)
    transfer = KVTransferConfig(
        kv_connector="KvdConnector",
        kv_connector_module_path="kvd_client.vllm.connector",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"socket": socket, "timeout_s": 10},
    )
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config,
        model_config=model_config,
        cache_config=cache_config,
        kv_transfer_config=transfer,
        device_config=DeviceConfig("cpu"),
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)]
    )
    return vllm_config, kv_cache_config


def api_mismatches() -> list[str]:
    """Every method KvdConnector overrides must have the base class's parameters in this release."""
    from kvd_client.vllm.connector import KvdConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    problems = []
    for name in sorted(vars(KvdConnector)):
        base = getattr(KVConnectorBase_V1, name, None)
        if name.startswith("_") or base is None or not callable(base):
            continue
        mine = list(inspect.signature(getattr(KvdConnector, name)).parameters)
        theirs = list(inspect.signature(base).parameters)
        if mine != theirs:
            problems.append(f"{name}: ours {mine}, vLLM's {theirs}")
    abstract = sorted(getattr(KVConnectorBase_V1, "__abstractmethods__", ()))
    problems += [f"{name}: abstract, not implemented" for name in abstract if name not in vars(KvdConnector)]
    return problems


class FakeModel:
    """Writes each computed token's KV slot and samples the next token; checks loaded blocks."""

    def __init__(self, caches: dict[str, Any]) -> None:
        self.caches = caches
        self.checked_blocks = 0
        self.mismatches: list[str] = []

    @staticmethod
    def value(token: int, position: int) -> float:
        return float((token * 7 + position * 3) % 241)  # small integers: exact in bf16

    def write(self, block_ids: list[int], tokens: list[int], start: int, end: int) -> None:
        for pos in range(start, end):
            block, slot = block_ids[pos // BLOCK], pos % BLOCK
            for cache in self.caches.values():
                cache[block, :, slot, :] = self.value(tokens[pos], pos)

    def check(self, req_id: str, block_table: list[int], tokens: list[int], loaded: list[int]) -> None:
        import torch

        for block_id in loaded:
            b = block_table.index(block_id)
            want = torch.tensor([self.value(tokens[b * BLOCK + s], b * BLOCK + s) for s in range(BLOCK)])
            for name, cache in self.caches.items():
                got = cache[block_id].float()  # [heads, slot, 2*head]
                if not torch.equal(got, want.view(1, BLOCK, 1).expand_as(got)):
                    self.mismatches.append(f"{req_id} block {b} ({name})")
            self.checked_blocks += 1


def prompts() -> list[list[int]]:
    """Four prompts with a shared 6-block prefix and distinct tails (about 8-9 blocks each)."""
    prefix = [(i * 37) % 500 + 3 for i in range(6 * BLOCK)]
    return [prefix + [(i * 13 + k * 101) % 500 + 3 for i in range(60 + 17 * k)] for k in range(4)]


def make_request(req_id: str, tokens: list[int], max_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(req_id, tokens, params, None, block_hasher=get_request_block_hasher(BLOCK, sha256))


def runner_output(req_ids: list[str], sampled: list[list[int]], kv_output: Any) -> Any:
    from vllm.v1.outputs import ModelRunnerOutput

    return ModelRunnerOutput(
        **_kw(
            ModelRunnerOutput,
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=[],
            kv_connector_output=kv_output,
        )
    )


class Engine:
    """The real scheduler, the worker-side connector and the fake model, stepped together like vLLM's EngineCore."""

    def __init__(self, model: str, socket: str, num_blocks: int) -> None:
        import torch
        from kvd_client.vllm.connector import KvdConnector
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        self.vllm_config, self.kv_cache_config = make_configs(model, socket, num_blocks)
        caches = {n: torch.zeros(num_blocks, HEADS, BLOCK, 2 * HEAD_SIZE, dtype=torch.bfloat16) for n in LAYERS}
        # vLLM builds the worker (and registers its KV caches) before the scheduler.
        self.worker = KvdConnector(self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config)
        self.worker.register_kv_caches(caches)
        self.model = FakeModel(caches)
        self.scheduler = Scheduler(
            **_kw(
                Scheduler,
                vllm_config=self.vllm_config,
                kv_cache_config=self.kv_cache_config,
                log_stats=True,
                structured_output_manager=StructuredOutputManager(self.vllm_config),
                block_size=BLOCK,
            )
        )
        self.connector = self.scheduler.connector
        self.preempted = 0
        self.steps = 0
        self.loads: dict[str, list[int]] = {}
        self.loaded_blocks = 0

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        client = self.worker._client
        while client is not None and not client.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        return client is not None and client.ready

    def _forward(self, out: Any) -> tuple[list[str], list[list[int]]]:
        req_ids, sampled = [], []
        for req_id, n in out.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            start = request.num_computed_tokens - n  # schedule() has counted this step's tokens already
            tokens = list(request.all_token_ids)
            block_ids = list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])
            self.model.write(block_ids, tokens, start, min(start + n, len(tokens)))
            req_ids.append(req_id)
            done_prefill = start + n >= request.num_tokens
            sampled.append([(tokens[-1] * 31 + 7) % 500 + 3] if done_prefill else [])
        return req_ids, sampled

    def _loads_done(self, recving: set[str] | None, invalid: set[int]) -> None:
        for req_id in recving or ():
            request, blocks = self.scheduler.requests.get(req_id), self.loads.pop(req_id, [])
            if request is not None:
                table = list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])
                good = [b for b in blocks if b not in invalid]
                self.model.check(req_id, table, list(request.all_token_ids), good)

    def step(self) -> None:
        """One engine step in the model runner's order: loads start, the forward writes KV, saves are issued."""
        from vllm.v1.outputs import KVConnectorOutput

        out = self.scheduler.schedule()
        self.steps += 1
        self.preempted += len(getattr(out, "preempted_req_ids", None) or ())
        meta = out.kv_connector_metadata
        self.worker.handle_preemptions(meta)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)  # type: ignore[arg-type]
        for layer_name in self.model.caches:  # each attention layer waits for its in-step loads' layer first
            self.worker.wait_for_layer_load(layer_name)
        req_ids, sampled = self._forward(out)
        self.worker.wait_for_save()
        sending, recving = self.worker.get_finished(set(out.finished_req_ids))
        invalid = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        for op in getattr(meta, "loads", ()):
            self.loaded_blocks += len(op.block_ids)
            if getattr(op, "in_step", False):  # loaded inside this step: in place now, unless reported failed
                self.loads[op.req_id] = list(op.block_ids)
                self._loads_done({op.req_id}, invalid)
            else:
                self.loads[op.req_id] = list(op.block_ids)
        self._loads_done(recving, invalid)
        kv_output = KVConnectorOutput(finished_sending=sending, finished_recving=recving, invalid_block_ids=invalid)
        self.scheduler.update_from_output(out, runner_output(req_ids, sampled, kv_output))
        if not req_ids:
            time.sleep(0.002)  # only transfers in flight: let the daemon work

    def run(self, requests: list[Any]) -> None:
        for request in requests:
            self.scheduler.add_request(request)
        while self.scheduler.has_unfinished_requests() or self.scheduler.has_finished_requests():
            self.step()
            if self.steps > MAX_STEPS:
                raise RuntimeError(f"not finished after {MAX_STEPS} steps")

    def close(self) -> None:
        if self.connector is not None:
            self.connector.shutdown()
        self.worker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-blocks", type=int, default=24, help="small enough that decoding preempts")
    args = parser.parse_args()

    import vllm

    report: dict[str, Any] = {"version": vllm.__version__, "api_mismatches": api_mismatches()}
    engine = Engine(args.model, args.socket, args.num_blocks)
    report["fingerprint"] = engine.worker.fingerprint
    report["daemon_ready"] = engine.wait_ready(30)
    loaded = []
    try:
        for run in range(2):
            # Long enough generations that the small cache runs out: requests are preempted, then resumed. The
            # second run starts from an empty local prefix cache, so its prefixes come from kvd.
            engine.scheduler.reset_prefix_cache()
            before = engine.loaded_blocks
            engine.run([make_request(f"run{run}-{i}", p, max_tokens=40) for i, p in enumerate(prompts())])
            loaded.append(engine.loaded_blocks - before)
    finally:
        engine.close()
    report.update(
        steps=engine.steps,
        preempted=engine.preempted,
        loaded_blocks=loaded,
        checked_blocks=engine.model.checked_blocks,
        mismatches=engine.model.mismatches,
        spec_fields=[f.name for f in dataclasses.fields(engine.kv_cache_config.kv_cache_groups[0].kv_cache_spec)],
    )
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
