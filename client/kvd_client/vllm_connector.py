"""vLLM (0.32, KV connector API v1) connector that stores and loads KV blocks through kvd.

    kv_transfer_config={
        "kv_connector": "KvdConnector",
        "kv_connector_module_path": "kvd_client.vllm_connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket": "/run/kvd/kvd.sock"},
    }

This module imports vLLM at the top; `import kvd_client` never imports it, so the client works without vLLM.

Scheduler side: one kvd lookup per request (a future; `get_num_new_matched_tokens` answers "ask again" until it is
done and never waits), block-aligned async loads, and saves of every newly full block. Every decision travels to
the workers in `KvdConnectorMetadata`, so all TP ranks act on the one answer the scheduler got.
Worker side: loads and saves are handed to the kvd client and never awaited on the model thread; completions come
back through `get_finished` / `get_block_ids_with_load_errors`. Whatever goes wrong with kvd becomes a miss or a
load error, which vLLM recomputes (with kv_load_failure_policy="recompute").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvd_client.errors import InvalidArgument
from kvd_client.hashing import BlockHasher, config_fingerprint, root_hash

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvd_client import Completion, LookupResult

log = logging.getLogger(__name__)

CONNECTOR_VERSION = "kvd-vllm-connector-v1"  # part of the fingerprint: bump when the key scheme changes

# How long `handle_preemptions` may hold the model thread for in-flight saves of preempted requests (their blocks
# are about to be reused, and the daemon must have finished reading them first). Preemption is rare and already a
# slow path; a save still running after this is abandoned and logged.
_PREEMPT_FLUSH_S = 2.0


# ----------------------------------------------------------------------------------------------------------------
# The slice of the kvd client the connector uses (a Protocol, so unit tests can hand in a fake).
# ----------------------------------------------------------------------------------------------------------------


class ClientLike(Protocol):
    @property
    def ready(self) -> bool: ...

    def register_kv_caches(
        self, kv_caches: Mapping[str, torch.Tensor], *, block_dim: int, block_size_tokens: int
    ) -> None: ...

    def start(self) -> None: ...

    def lookup(self, block_hashes: Sequence[bytes]) -> Future[LookupResult]: ...

    def save(self, blocks: Sequence[tuple[int, bytes]], *, ready_event: bytes = b"") -> int: ...

    def load(self, blocks: Sequence[tuple[int, bytes]]) -> int: ...

    def poll_finished(self) -> list[Completion]: ...

    def wait_loaded(self, completion: Completion) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """Everything a KvdClient is built from; equal specs in one process share one client (see `_shared_client`)."""

    socket: str
    model_id: str
    layout_fingerprint: str
    tp_rank: int
    tp_world_size: int
    worker_name: str
    timeout_s: float


def _default_client_factory(spec: ClientSpec) -> ClientLike:
    from kvd_client import KvdClient

    return KvdClient(
        spec.socket,
        model_id=spec.model_id,
        layout_fingerprint=spec.layout_fingerprint,
        tp_rank=spec.tp_rank,
        tp_world_size=spec.tp_world_size,
        worker_name=spec.worker_name,
        timeout_s=spec.timeout_s,
    )


# Tests replace this to run the connector against a fake client.
client_factory: Callable[[ClientSpec], ClientLike] = _default_client_factory

# With a single-process executor (CPU, TP=1) the scheduler and the worker live in one process. The daemon allows a
# process one session per namespace, so the scheduler reuses the worker's client for its lookups. The worker's
# client is registered first: vLLM initialises the KV caches before it builds the scheduler.
_shared_lock = threading.Lock()
_shared: dict[tuple[str, str, str, int, int], tuple[ClientLike, int]] = {}


def _share_key(spec: ClientSpec) -> tuple[str, str, str, int, int]:
    return (spec.socket, spec.model_id, spec.layout_fingerprint, spec.tp_rank, spec.tp_world_size)


def _acquire_shared(spec: ClientSpec) -> ClientLike | None:
    with _shared_lock:
        entry = _shared.get(_share_key(spec))
        if entry is None:
            return None
        _shared[_share_key(spec)] = (entry[0], entry[1] + 1)
        return entry[0]


def _publish_shared(spec: ClientSpec, client: ClientLike) -> None:
    with _shared_lock:
        _shared.setdefault(_share_key(spec), (client, 1))


def _release_shared(spec: ClientSpec, client: ClientLike) -> None:
    """Close `client` once its last user lets go of it."""
    with _shared_lock:
        entry = _shared.get(_share_key(spec))
        if entry is not None and entry[0] is client:
            if entry[1] > 1:
                _shared[_share_key(spec)] = (client, entry[1] - 1)
                return
            del _shared[_share_key(spec)]
    client.close()


# ----------------------------------------------------------------------------------------------------------------
# Metadata (scheduler -> every worker; pickled)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockOp:
    """Blocks of one request to load into or save from the worker's cache, with the kvd key of each."""

    req_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]

    def pairs(self) -> list[tuple[int, bytes]]:
        return list(zip(self.block_ids, self.block_hashes, strict=True))


@dataclass(frozen=True)
class KvdConnectorMetadata(KVConnectorMetadata):
    loads: tuple[BlockOp, ...] = ()
    saves: tuple[BlockOp, ...] = ()
    # Requests preempted this step whose earlier saves may still be reading their (now freed) blocks.
    flush_req_ids: frozenset[str] = frozenset()


# ----------------------------------------------------------------------------------------------------------------
# Stats
# ----------------------------------------------------------------------------------------------------------------

_COUNTERS = (
    "lookups",
    "lookup_errors",
    "lookup_not_ready",  # get_num_new_matched_tokens answered "ask again"
    "query_tokens",
    "hit_tokens",
    "loads",
    "load_blocks",
    "load_failed_blocks",
    "load_bytes",
    "load_time_s",
    "saves",
    "save_blocks",
    "save_failed_blocks",
    "save_bytes",
    "save_time_s",
)


@dataclass
class KvdConnectorStats(KVConnectorStats):
    """Counters for one interval, summed over workers and the scheduler. `data` holds plain numbers, so the stats
    cross process boundaries as they are."""

    def __post_init__(self) -> None:
        for name in _COUNTERS:
            self.data.setdefault(name, 0)

    def add(self, name: str, value: float = 1) -> None:
        self.data[name] = self.data.get(name, 0) + value

    def reset(self) -> None:
        self.data = dict.fromkeys(_COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if isinstance(value, int | float):
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {name: d.get(name, 0) for name in _COUNTERS}
        load_s, save_s = d.get("load_time_s", 0), d.get("save_time_s", 0)
        out["load_MBps"] = round(d.get("load_bytes", 0) / load_s / 1e6, 1) if load_s else 0.0
        out["save_MBps"] = round(d.get("save_bytes", 0) / save_s / 1e6, 1) if save_s else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(name, 0) for name in _COUNTERS)


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint: one string computed alike by the scheduler and every worker, from config alone
# ----------------------------------------------------------------------------------------------------------------


def _spec_facts(spec: object) -> dict[str, str]:
    if dataclasses.is_dataclass(spec):
        facts = {f.name: str(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    else:
        facts = {"repr": repr(spec)}
    facts["type"] = type(spec).__name__
    return facts


def layout_facts(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> dict[str, object]:
    """What makes a block's bytes what they are. Anything here that differs between two processes keeps them from
    sharing blocks, so it must be the same on the scheduler and on every worker (config, never tensors)."""
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    hf: dict[str, object] = {}
    try:
        hf = dict(model.hf_config.to_dict())
    except Exception:  # an exotic config object: the model name and dtype still separate models
        hf = {}
    # Where the checkpoint lives and which transformers wrote it do not change the KV.
    for key in ("_name_or_path", "transformers_version", "_commit_hash"):
        hf.pop(key, None)
    groups: list[object] = []
    layout = None
    if kv_cache_config is not None:
        layout = kv_cache_config.kv_cache_layout
        for group in kv_cache_config.kv_cache_groups:
            groups.append({"layers": list(group.layer_names), "spec": _spec_facts(group.kv_cache_spec)})
    parallel = vllm_config.parallel_config
    return {
        "connector": CONNECTOR_VERSION,
        "model": str(model.model),
        "revision": str(model.revision),
        "hf_config": json.dumps(hf, sort_keys=True, default=str),
        "dtype": str(model.dtype),
        "quantization": str(model.quantization),
        "cache_dtype": str(vllm_config.cache_config.cache_dtype),
        "block_size": int(vllm_config.cache_config.block_size),
        "kv_cache_layout": str(layout or os.environ.get("VLLM_KV_CACHE_LAYOUT", "")),
        "device": str(current_platform.device_type),
        "groups": groups,
        "tp": int(parallel.tensor_parallel_size),
        "pp": int(parallel.pipeline_parallel_size),
    }


# ----------------------------------------------------------------------------------------------------------------
# Per-request scheduler state
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _ReqState:
    request: Request
    hasher: BlockHasher
    lookup: Future[LookupResult] | None = None
    lookup_blocks: int = 0  # how many hashes the lookup asked about
    # The answer (hit blocks, tier of each), kept until admission consumes it; (0, ()) after a failed lookup.
    result: tuple[int, tuple[int, ...]] | None = None
    hit_blocks: int = 0  # blocks granted by the last get_num_new_matched_tokens
    hit_sources: dict[CacheHitSource, int] = field(default_factory=dict)
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0  # blocks [0, saved_blocks) are in kvd or have a save planned
    has_saves: bool = False  # a save was planned since admission: finishing waits for finished_sending


_TIER_SOURCE = {1: CacheHitSource.HOST, 2: CacheHitSource.DISK}  # kvd.v1.Tier -> vLLM's label; remote is unlabelled


class KvdConnector(KVConnectorBase_V1):
    """Per-node KV cache through kvd. See the module docstring and docs/vllm.md."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[arg-type]
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        socket = str(extra.get("socket") or os.environ.get("KVD_SOCKET", ""))
        if not socket:
            raise ValueError('KvdConnector needs kv_connector_extra_config["socket"] (or $KVD_SOCKET)')
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
            # Block ids are per group; the load-error path (invalid_block_ids) and the key scheme assume one.
            raise ValueError(
                f"KvdConnector supports models with one KV cache group, got {len(kv_cache_config.kv_cache_groups)}"
            )
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise ValueError("KvdConnector does not support pipeline parallelism")

        self._block_size = int(vllm_config.cache_config.block_size)
        if kv_cache_config is not None:
            self._block_size = int(kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size)
        self._fingerprint = str(extra.get("layout_fingerprint") or "") or config_fingerprint(
            layout_facts(vllm_config, kv_cache_config)
        )
        self._model_id = str(extra.get("model_id") or vllm_config.model_config.model)
        self._timeout_s = float(extra.get("timeout_s", 5.0))
        self._save_generated = bool(extra.get("save_generated_tokens", True))
        # kv_role decides (a producer saves, a consumer loads); "load"/"save" in the extra config can turn either off.
        self._loads_enabled = self._kv_transfer_config.is_kv_consumer and bool(extra.get("load", True))
        self._saves_enabled = self._kv_transfer_config.is_kv_producer and bool(extra.get("save", True))
        self._socket = socket
        self._tp_world = int(parallel.tensor_parallel_size)
        self._stats = KvdConnectorStats()
        self._client: ClientLike | None = None
        self._client_spec: ClientSpec | None = None

        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: list[BlockOp] = []
        self._roots: dict[tuple[str, str], bytes] = {}

        # worker side
        self._ops: dict[int, tuple[str, bool, dict[bytes, int]]] = {}  # op id -> (req id, is_load, hash -> block)
        self._inflight_saves: dict[str, int] = {}
        self._inflight_loads: dict[str, int] = {}
        self._save_reqs: set[str] = set()  # requests with saves since admission (mirrors _ReqState.has_saves)
        self._finishing: set[str] = set()  # finished requests waiting for their saves to complete
        self._done_recving: set[str] = set()
        self._load_errors: set[int] = set()

        if role == KVConnectorRole.SCHEDULER:
            spec = self._spec(tp_rank=0, worker_name="vllm-scheduler")
            client = _acquire_shared(spec)
            if client is None:
                client = client_factory(spec)
                client.start()
                _publish_shared(spec, client)
            self._client, self._client_spec = client, spec

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a save that never happens is only a later miss

    def _spec(self, *, tp_rank: int, worker_name: str) -> ClientSpec:
        return ClientSpec(
            socket=self._socket,
            model_id=self._model_id,
            layout_fingerprint=self._fingerprint,
            tp_rank=tp_rank,
            tp_world_size=self._tp_world,
            worker_name=worker_name,
            timeout_s=self._timeout_s,
        )

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    # ============================================================================================================
    # Scheduler side
    # ============================================================================================================

    def _root(self, request: Request) -> bytes:
        lora = request.lora_request
        lora_key = f"{lora.lora_name}|{lora.lora_path}" if lora is not None else ""
        salt = request.cache_salt or ""
        root = self._roots.get((lora_key, salt))
        if root is None:
            root = root_hash(self._fingerprint, lora_name=lora_key, cache_salt=salt)
            if len(self._roots) < 4096:
                self._roots[(lora_key, salt)] = root
        return root

    @staticmethod
    def _extras(request: Request, num_blocks: int, block_size: int) -> list[bytes]:
        """Per-block extra key material: multimodal inputs, whose placeholder token ids say nothing about them."""
        features = getattr(request, "mm_features", None) or []
        if not features:
            return []
        extras = [b""] * num_blocks
        for feature in features:
            pos = feature.mm_position
            first = pos.offset // block_size
            last = min(num_blocks - 1, (pos.offset + pos.length - 1) // block_size)
            for b in range(first, last + 1):
                extras[b] += f"mm|{feature.identifier}|{pos.offset - b * block_size};".encode()
        return extras

    def _state(self, request: Request) -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _ReqState(request=request, hasher=BlockHasher(self._root(request), self._block_size))
            self._reqs[request.request_id] = st
        return st

    def _hashes(self, st: _ReqState, num_tokens: int) -> Sequence[bytes]:
        """Keys of the first num_tokens // block_size blocks of the request."""
        n = num_tokens // self._block_size
        if len(st.hasher.hashes) < n:
            tokens = list(st.request.all_token_ids[: n * self._block_size])
            st.hasher.extend(tokens, extras=self._extras(st.request, n, self._block_size))
        return st.hasher.hashes[:n]

    def _max_blocks(self, request: Request) -> int:
        # Leave at least one token to compute: vLLM needs a forward to sample the next token.
        return (request.num_tokens - 1) // self._block_size

    def _start_lookup(self, st: _ReqState, client: ClientLike) -> bool:
        """Send the lookup for every loadable block of the request; False when kvd is not there right now."""
        if not client.ready:
            return False
        hashes = self._hashes(st, self._max_blocks(st.request) * self._block_size)
        st.lookup = client.lookup(list(hashes))
        st.lookup_blocks = len(hashes)
        self._stats.add("lookups")
        return True

    def on_new_request(self, request: Request) -> None:
        # Start the lookup when the request arrives, so its answer is usually there by the time the scheduler asks
        # (saves a scheduler step per request). The answer is read in get_num_new_matched_tokens.
        client = self._client
        if client is None or not self._loads_enabled or getattr(request, "prompt_embeds", None) is not None:
            return
        if self._max_blocks(request) <= 0:
            return
        st = self._state(request)
        if st.lookup is None and st.result is None:
            self._start_lookup(st, client)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        client = self._client
        if client is None:
            return 0, False
        # State for every request, hit or not: its newly computed blocks get saved through it.
        st = self._state(request)
        if not self._loads_enabled or getattr(request, "prompt_embeds", None) is not None:
            return 0, False
        bs = self._block_size
        max_blocks = self._max_blocks(request)
        if max_blocks <= num_computed_tokens // bs:
            return 0, False
        if st.result is None:
            # Usually on_new_request sent the lookup already. No daemon right now: a miss, at once; nothing is
            # remembered, so the next request asks again.
            if st.lookup is None and not self._start_lookup(st, client):
                return 0, False
            lookup = st.lookup
            if lookup is None:
                return 0, False
            if not lookup.done():
                self._stats.add("lookup_not_ready")
                return None, False
            try:
                answer = lookup.result()
                st.result = (int(answer.hit_blocks), tuple(int(t) for t in answer.tiers))
            except Exception as e:  # any failure is a miss; vLLM computes the prefix itself
                log.debug("kvd lookup for %s failed: %s", request.request_id, e)
                self._stats.add("lookup_errors")
                st.result = (0, ())
            st.lookup = None
        hit_blocks = min(st.result[0], st.lookup_blocks, max_blocks)
        st.hit_blocks = hit_blocks
        external = hit_blocks * bs - num_computed_tokens
        if external <= 0:
            return 0, False
        return external, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or st.result is None:
            return  # no lookup, or the second call of an async load
        (kvd_blocks, tiers), st.result = st.result, None
        # Blocks kvd already holds need no save.
        st.saved_blocks = min(kvd_blocks, st.lookup_blocks)
        st.hit_sources = {}
        if num_external_tokens <= 0:
            return
        bs = self._block_size
        # vLLM loads [local hit, local hit + external); the local hit is block-aligned, the end is our hit.
        end = st.hit_blocks
        start = max(0, (end * bs - num_external_tokens) // bs)
        block_ids = blocks.get_block_ids()[0]
        end = min(end, len(block_ids))
        hashes = self._hashes(st, end * bs)
        # Always one op per async load, even an empty one: the request waits for its finished_recving.
        self._pending_loads.append(BlockOp(request.request_id, tuple(block_ids[start:end]), tuple(hashes[start:end])))
        self._stats.add("query_tokens", request.num_tokens)
        self._stats.add("hit_tokens", num_external_tokens)
        for tier in tiers[start:end]:
            source = _TIER_SOURCE.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
            st.hit_sources[source] = st.hit_sources.get(source, 0) + bs

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        st = self._reqs.get(request.request_id)
        sources = dict(st.hit_sources) if st is not None else {}
        if sum(sources.values()) != num_external_tokens:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return sources

    def _plan_save(self, st: _ReqState, req_id: str, computed_after: int, saves: list[BlockOp]) -> None:
        """Save the blocks that this step's forward makes full (KV written for every token of the block)."""
        request = st.request
        known = min(computed_after, len(request.all_token_ids))
        if not self._save_generated:
            known = min(known, request.num_prompt_tokens)
        full = min(known // self._block_size, len(st.block_ids))
        if full <= st.saved_blocks:
            return
        hashes = self._hashes(st, full * self._block_size)
        saves.append(
            BlockOp(req_id, tuple(st.block_ids[st.saved_blocks : full]), tuple(hashes[st.saved_blocks : full]))
        )
        st.saved_blocks = full
        st.has_saves = True

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        saves: list[BlockOp] = []
        # While the daemon is away a save would only fail; keep the blocks unplanned and save them once it is back.
        plan_saves = self._saves_enabled and self._client is not None and self._client.ready
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            if plan_saves:
                self._plan_save(st, new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0), saves)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            if plan_saves:
                self._plan_save(st, req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), saves)
        flush: set[str] = set()
        for req_id in scheduler_output.preempted_req_ids or ():
            st = self._reqs.get(req_id)
            if st is None:
                continue
            if st.has_saves:
                flush.add(req_id)
            # Its blocks are gone; on resumption it is looked up and saved afresh (the worker forgets it too).
            st.block_ids, st.saved_blocks, st.has_saves = [], 0, False
            st.lookup, st.result = None, None
        meta = KvdConnectorMetadata(
            loads=tuple(self._pending_loads), saves=tuple(saves), flush_req_ids=frozenset(flush)
        )
        self._pending_loads = []
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # A block that failed to load is recomputed by vLLM; make it eligible for a save again.
        bad = connector_output.invalid_block_ids
        if not bad:
            return
        for st in self._reqs.values():
            for i, block_id in enumerate(st.block_ids[: st.saved_blocks]):
                if block_id in bad:
                    st.saved_blocks = i
                    break

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        # Keep the blocks while kvd may still be reading them; the workers report the id in finished_sending.
        return (st is not None and st.has_saves), None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, KvdConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvdConnectorStats(data=dict(data or {}))

    def reset_cache(self) -> bool | None:
        return None  # kvd is shared by the node; one engine's cache reset must not drop other engines' blocks

    # ============================================================================================================
    # Worker side
    # ============================================================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not kv_caches:
            return
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config is not None else None
        views, block_dim = _physical_views(kv_caches, num_blocks)
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = int(get_tensor_model_parallel_rank())
        except Exception:  # no distributed state (single process): rank 0
            tp_rank = 0
        spec = self._spec(tp_rank=tp_rank, worker_name=f"vllm-tp{tp_rank}")
        client = client_factory(spec)
        client.register_kv_caches(views, block_dim=block_dim, block_size_tokens=self._block_size)
        client.start()
        _publish_shared(spec, client)
        self._client, self._client_spec = client, spec

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if not isinstance(kv_connector_metadata, KvdConnectorMetadata) or not kv_connector_metadata.flush_req_ids:
            return
        flush = kv_connector_metadata.flush_req_ids
        deadline = time.monotonic() + _PREEMPT_FLUSH_S
        while any(self._inflight_saves.get(r, 0) for r in flush) and time.monotonic() < deadline:
            self._drain()
            time.sleep(0.0005)
        late = [r for r in flush if self._inflight_saves.get(r, 0)]
        if late:
            log.warning("saves of preempted requests %s still running after %.1fs", late, _PREEMPT_FLUSH_S)
        for req_id in flush:
            self._save_reqs.discard(req_id)
            self._finishing.discard(req_id)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KvdConnectorMetadata):
            return
        for op in meta.loads:
            self._inflight_loads[op.req_id] = self._inflight_loads.get(op.req_id, 0) + 1
            self._stats.add("loads")
            self._stats.add("load_blocks", len(op.block_ids))
            if self._client is None or not op.block_ids:
                self._finish_load(op.req_id, set(op.block_ids))
                continue
            op_id = self._client.load(op.pairs())
            self._ops[op_id] = (op.req_id, True, dict(zip(op.block_hashes, op.block_ids, strict=True)))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: vLLM waits for them through finished_recving

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # whole blocks are saved in wait_for_save, once the forward has written every layer

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KvdConnectorMetadata) or not meta.saves:
            return
        client = self._client
        for op in meta.saves:
            self._save_reqs.add(op.req_id)
            if client is None:
                continue
            # For a CUDA cache the client records the ready event on the current stream (kvd_client.cuda); the
            # connector never touches streams itself.
            op_id = client.save(op.pairs())
            self._inflight_saves[op.req_id] = self._inflight_saves.get(op.req_id, 0) + 1
            self._ops[op_id] = (op.req_id, False, dict(zip(op.block_hashes, op.block_ids, strict=True)))
            self._stats.add("saves")
            self._stats.add("save_blocks", len(op.block_ids))

    def _finish_load(self, req_id: str, failed_blocks: Iterable[int]) -> None:
        self._load_errors.update(failed_blocks)
        left = self._inflight_loads.get(req_id, 1) - 1
        if left > 0:
            self._inflight_loads[req_id] = left
        else:
            self._inflight_loads.pop(req_id, None)
            self._done_recving.add(req_id)

    def _drain(self) -> None:
        if self._client is None:
            return
        for done in self._client.poll_finished():
            entry = self._ops.pop(done.op_id, None)
            if entry is None:
                continue
            req_id, is_load, block_of = entry
            failed = set(block_of) if (not done.ok and not done.failed_hashes) else set(done.failed_hashes)
            failed_blocks = [block_of[h] for h in failed if h in block_of]
            if not done.ok:
                log.debug(
                    "kvd %s for %s failed for %d blocks: %s",
                    "load" if is_load else "save",
                    req_id,
                    len(failed_blocks),
                    done.error,
                )
            if is_load:
                self._stats.add("load_bytes", done.nbytes)
                self._stats.add("load_time_s", done.duration_s)
                self._stats.add("load_failed_blocks", len(failed_blocks))
                if done.done_event:
                    # CUDA: order the current stream after the daemon's writes, also when some blocks failed (vLLM
                    # still uses the ones before the first failure). The request runs in a later step, so its
                    # attention is queued after this wait.
                    self._client.wait_loaded(done)
                self._finish_load(req_id, failed_blocks)
            else:
                self._stats.add("save_bytes", done.nbytes)
                self._stats.add("save_time_s", done.duration_s)
                self._stats.add("save_failed_blocks", len(failed_blocks))
                left = self._inflight_saves.get(req_id, 1) - 1
                if left > 0:
                    self._inflight_saves[req_id] = left
                else:
                    self._inflight_saves.pop(req_id, None)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._drain()
        # Only requests the scheduler kept (request_finished returned True) may be reported as sent.
        self._finishing.update(r for r in finished_req_ids if r in self._save_reqs)
        sending = {r for r in self._finishing if not self._inflight_saves.get(r, 0)}
        self._finishing -= sending
        self._save_reqs -= sending
        recving, self._done_recving = self._done_recving, set()
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        # Called right after get_transfer_results in the same step, so errors arrive no later than finished_recving.
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        # Let saves in flight finish (bounded) so a clean shutdown leaves its blocks behind for the next process.
        deadline = time.monotonic() + self._timeout_s
        while self._ops and any(not is_load for _, is_load, _ in self._ops.values()):
            if time.monotonic() > deadline:
                log.warning("kvd connector shutting down with %d operations in flight", len(self._ops))
                break
            self._drain()
            time.sleep(0.001)
        client, spec = self._client, self._client_spec
        self._client = None
        if client is not None and spec is not None:
            _release_shared(spec, client)


# ----------------------------------------------------------------------------------------------------------------
# Worker helpers
# ----------------------------------------------------------------------------------------------------------------


def _physical_views(
    kv_caches: Mapping[str, torch.Tensor], num_blocks: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """Contiguous views of the layer tensors, in memory order, and the dimension that indexes blocks.

    vLLM may hand out permuted views (a backend's logical order over another physical order); kvd copies whole
    blocks of contiguous memory, so undo the permutation. Every layer must agree on the block dimension.
    """
    views: dict[str, torch.Tensor] = {}
    dims: set[int] = set()
    for name, tensor in kv_caches.items():
        t = tensor
        if not t.is_contiguous():
            order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
            t = t.permute(*order)
            if not t.is_contiguous():
                raise InvalidArgument(f"layer {name!r}: KV tensor is not a permutation of contiguous memory")
        candidates = [d for d in range(t.dim()) if num_blocks is None or t.shape[d] == num_blocks]
        if not candidates:
            raise InvalidArgument(f"layer {name!r}: no dimension of {tuple(t.shape)} has {num_blocks} blocks")
        # The outermost such dimension: vLLM puts blocks first (CPU, NHD/HND) or behind the K/V pair of 2.
        dims.add(candidates[0])
        views[name] = t
    if len(dims) != 1:
        raise InvalidArgument(f"layers disagree on the block dimension: {sorted(dims)}")
    return views, dims.pop()
