"""`KvdConnector`, the class vLLM loads: a thin facade over the scheduler side and the worker side.

    kv_transfer_config={
        "kv_connector": "KvdConnector",
        "kv_connector_module_path": "kvd_client.vllm.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket": "/run/kvd/kvd.sock"},
    }

Supported: vLLM 0.32 to 0.34 (`compat`), checked when vLLM first asks the class anything. Whatever goes wrong with
kvd becomes a miss or a load error, which vLLM recomputes (with kv_load_failure_policy="recompute").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvd_client.errors import FailedPrecondition, InvalidArgument
from kvd_client.vllm import clients, compat
from kvd_client.vllm.clients import ClientSpec
from kvd_client.vllm.config import ConnectorConfig, MemoryAccess, extra_config
from kvd_client.vllm.fingerprint import fingerprint
from kvd_client.vllm.scheduler import KvdScheduler
from kvd_client.vllm.stats import KvdConnectorStats, KvdPromMetrics
from kvd_client.vllm.worker import KvdWorker

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def _check_model(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, memory: MemoryAccess) -> None:
    if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
        # Block ids are per group; the load-error path (invalid_block_ids) and the key scheme assume one.
        groups = len(kv_cache_config.kv_cache_groups)
        raise InvalidArgument(f"KvdConnector supports models with one KV cache group, got {groups}")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise InvalidArgument("KvdConnector does not support pipeline parallelism")
    if getattr(vllm_config.model_config, "enable_sleep_mode", False) and not compat.has_sleep_hooks():
        # Newer releases ask supports_sleep_mode() themselves; this one would sleep without telling us.
        raise FailedPrecondition(f"KvdConnector cannot follow sleep mode: {compat.sleep_mode_refusal(memory)}")


class KvdConnector(KVConnectorBase_V1):
    """Per-node KV cache through kvd. See the package docstring and docs/vllm.md."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        compat.check_supported()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[arg-type]
        self._config = ConnectorConfig.from_vllm(vllm_config)
        _check_model(vllm_config, kv_cache_config, self._config.memory_access)
        self._block_size = int(vllm_config.cache_config.block_size)
        if kv_cache_config is not None:
            self._block_size = int(kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size)
        self._fingerprint = self._config.layout_fingerprint or fingerprint(vllm_config, kv_cache_config)
        self._tp_world = int(vllm_config.parallel_config.tensor_parallel_size)
        self._scheduler: KvdScheduler | None = None
        self._worker: KvdWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            client = clients.lookup_client(self._spec(0, "vllm-scheduler"))
            self._scheduler = KvdScheduler(self._config, self._fingerprint, self._block_size, client)
        else:
            num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else None
            self._worker = KvdWorker(lambda rank: self._spec(rank, f"vllm-tp{rank}"), self._block_size, num_blocks)

    def _spec(self, tp_rank: int, worker_name: str) -> ClientSpec:
        config = self._config
        return ClientSpec(
            socket=config.socket,
            model_id=config.model_id,
            layout_fingerprint=self._fingerprint,
            tp_rank=tp_rank,
            tp_world_size=self._tp_world,
            worker_name=worker_name,
            timeout_s=config.timeout_s,
        )

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a save that never happens is only a later miss

    @property
    def _client(self) -> clients.ClientLike | None:
        side = self._scheduler or self._worker
        return side.client if side is not None else None

    def _sched(self) -> KvdScheduler:
        if self._scheduler is None:
            raise FailedPrecondition("a scheduler-side method was called on a worker-side KvdConnector")
        return self._scheduler

    def _work(self) -> KvdWorker:
        if self._worker is None:
            raise FailedPrecondition("a worker-side method was called on a scheduler-side KvdConnector")
        return self._worker

    # -- class-level questions vLLM asks before it builds anything -------------------------------------------------

    @classmethod
    def kv_cache_access(cls, kv_transfer_config: Any) -> Any:
        """vLLM 0.34+: how kvd reaches the device KV cache (see `MemoryAccess` and docs/vllm.md)."""
        compat.check_supported()
        return compat.kv_cache_access_flag(MemoryAccess.parse(extra_config(kv_transfer_config).get("kv_cache_access")))

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """vLLM 0.33+ asks this only with sleep mode on; a refusal names its reason in the log, then vLLM stops."""
        compat.check_supported()
        choice = MemoryAccess.parse(extra_config(kv_transfer_config).get("kv_cache_access"))
        reason = compat.sleep_mode_refusal(choice)
        if reason is not None:
            log.error("KvdConnector does not support sleep mode here: %s", reason)
        return reason is None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvdConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config: Any, metric_types: Any, labelnames: list[str], per_engine_labelvalues: dict[int, Any]
    ) -> KvdPromMetrics:
        return KvdPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- scheduler side ------------------------------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        self._sched().on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def may_load_async(self, request: Request) -> bool:
        return self._sched().may_load_async(request)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        return self._sched().get_external_cache_hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched().update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, block_ids)

    def reset_cache(self) -> bool | None:
        return None  # kvd is shared by the node; one engine's cache reset must not drop other engines' blocks

    # -- worker side ---------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._work().register_kv_caches(kv_caches)

    def unregister_kv_caches(self) -> None:
        self._work().unregister_kv_caches()

    def restore_kv_caches(self) -> None:
        self._work().restore_kv_caches()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self._work().handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._work().start_load_kv(self._connector_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # In-step loads only (hits in the daemon's host memory, kvd_client.vllm.in_step): this layer's bytes. The
        # others are asynchronous: vLLM waits for them through finished_recving.
        self._work().wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # whole blocks are saved in wait_for_save, once the forward has written every layer

    def wait_for_save(self) -> None:
        self._work().wait_for_save(self._connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._work().get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().get_block_ids_with_load_errors()

    # -- both ----------------------------------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self._scheduler or self._worker
        return side.stats.take() if side is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None and self._scheduler.client is not None:
            client, self._scheduler.client = self._scheduler.client, None
            clients.release(self._spec(0, "vllm-scheduler"), client)
