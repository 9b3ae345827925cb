"""The scheduler side (EngineCore process): one kvd lookup per request, admission, and each step's plan.

A lookup is answered from the daemon's shared index in this thread when it is mapped (microseconds, local tiers), so
`get_num_new_matched_tokens` answers at once; only without an index, or for what a remote tier may add
(`remote_lookups`), is it a future, answered "ask again" (None) until done, never waited for. Hits are loaded
asynchronously and block-aligned; every block a step's forward makes full is saved, unless kvd already holds it.
Every decision travels to the workers in `KvdConnectorMetadata`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvd_client.hashing import BlockHasher, root_hash
from kvd_client.vllm import compat
from kvd_client.vllm.clients import ClientLike
from kvd_client.vllm.config import ConnectorConfig, RemoteLookups
from kvd_client.vllm.metadata import BlockOp, KvdConnectorMetadata
from kvd_client.vllm.stats import StatsOwner

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvd_client import LookupResult

log = logging.getLogger(__name__)

_HOST = 1  # kvd.v1.Tier HOST_MEMORY
_TIER_SOURCE = {1: CacheHitSource.HOST, 2: CacheHitSource.DISK}  # kvd.v1.Tier -> vLLM's label; remote is unlabelled
_MAX_ROOTS = 4096  # distinct (LoRA, cache salt) roots remembered
_HIT_RATE_DECAY = 0.9  # weight of the past in the running share of lookups that hit (may_load_async)


@dataclass
class _ReqState:
    request: Request
    hasher: BlockHasher
    lookup: Future[LookupResult] | None = None
    lookup_blocks: int = 0  # how many hashes the lookup asked about
    # The answer (hit blocks, tier of each), kept until admission consumes it; (0, ()) after a failed lookup.
    result: tuple[int, tuple[int, ...]] | None = None
    hit_blocks: int = 0  # blocks granted by the last get_num_new_matched_tokens
    in_step: bool = False  # ... to be loaded inside the step that schedules the request
    hit_sources: dict[CacheHitSource, int] = field(default_factory=dict)
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0  # blocks [0, saved_blocks) are in kvd or have a save planned
    has_saves: bool = False  # a save was planned since admission: finishing waits for finished_sending

    def forget_blocks(self) -> None:
        """Preempted: its blocks are gone; on resumption it is looked up and saved afresh."""
        self.block_ids, self.saved_blocks, self.has_saves = [], 0, False
        self.lookup, self.result = None, None


class KvdScheduler:
    """Scheduler-side state and decisions of `KvdConnector`."""

    def __init__(self, config: ConnectorConfig, fingerprint: str, block_size: int, client: ClientLike) -> None:
        self._config = config
        self._fingerprint = fingerprint
        self._block_size = block_size
        self.client: ClientLike | None = client
        self.stats = StatsOwner()
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: list[BlockOp] = []
        self._roots: dict[tuple[str, str], bytes] = {}
        self._hit_rate = 0.0

    # -- keys ----------------------------------------------------------------------------------------------------

    def _root(self, request: Request) -> bytes:
        lora = request.lora_request
        lora_key = f"{lora.lora_name}|{lora.lora_path}" if lora is not None else ""
        salt = request.cache_salt or ""
        root = self._roots.get((lora_key, salt))
        if root is None:
            root = root_hash(self._fingerprint, lora_name=lora_key, cache_salt=salt)
            if len(self._roots) < _MAX_ROOTS:
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

    def _loadable(self, request: Request) -> bool:
        return self._config.loads and getattr(request, "prompt_embeds", None) is None

    # -- lookups -------------------------------------------------------------------------------------------------

    def _start_lookup(self, st: _ReqState, client: ClientLike) -> bool:
        """Look up every loadable block of the request: from the shared index at once when it is mapped, else (and
        for what a remote tier may add, per `remote_lookups`) by RPC; False when kvd is not there right now."""
        if not client.ready:
            return False
        blocks = self._max_blocks(st.request)
        self._hashes(st, blocks * self._block_size)
        hashes = st.hasher.run(blocks)  # one buffer: the index probes it without joining the hashes
        st.lookup_blocks = len(hashes)
        self.stats.stats.add("lookups")
        index: Any = getattr(client, "index", None)  # kvd_client.lookups.LocalIndex (absent in fakes)
        local = index.probe(hashes) if index is not None else None
        if local is None:
            st.lookup = client.lookup(hashes)  # no index mapped: the RPC answers for every tier
            return True
        self.stats.stats.add("lookups_local")
        mode = self._config.remote_lookups
        if local.hit_blocks < len(hashes) and mode is not RemoteLookups.OFF and index.remote_tier:
            self.stats.stats.add("lookups_remote")
            remote = client.lookup(hashes)  # past the local hit: the RPC (KvdClient sends it for a partial hit)
            if mode is RemoteLookups.WAIT:
                st.lookup = remote
                return True
        self._settle(st, (local.hit_blocks, tuple(int(t) for t in local.tiers)))
        return True

    def _settle(self, st: _ReqState, result: tuple[int, tuple[int, ...]]) -> None:
        st.result, st.lookup = result, None
        hit = 1.0 if result[0] > 0 else 0.0
        self._hit_rate = _HIT_RATE_DECAY * self._hit_rate + (1 - _HIT_RATE_DECAY) * hit

    def on_new_request(self, request: Request) -> None:
        # Start the lookup when the request arrives, so its answer is usually there by the time the scheduler asks
        # (saves a scheduler step per request). The answer is read in get_num_new_matched_tokens.
        client = self.client
        if client is None or not self._loadable(request) or self._max_blocks(request) <= 0:
            return
        st = self._state(request)
        if st.lookup is None and st.result is None:
            self._start_lookup(st, client)

    def _take_answer(self, st: _ReqState, request: Request) -> None:
        lookup = st.lookup
        if lookup is None:
            return
        try:
            answer = lookup.result()
            result = (int(answer.hit_blocks), tuple(int(t) for t in answer.tiers))
        except Exception as e:  # any failure is a miss; vLLM computes the prefix itself
            log.debug("kvd lookup for %s failed: %s", request.request_id, e)
            self.stats.stats.add("lookup_errors")
            result = (0, ())
        self._settle(st, result)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        client = self.client
        if client is None:
            return 0, False
        # State for every request, hit or not: its newly computed blocks get saved through it.
        st = self._state(request)
        max_blocks = self._max_blocks(request)
        if not self._loadable(request) or max_blocks <= num_computed_tokens // self._block_size:
            return 0, False
        if st.result is None:
            # Usually on_new_request sent the lookup already. No daemon right now: a miss, at once; nothing is
            # remembered, so the next request asks again.
            if st.lookup is None and not self._start_lookup(st, client):
                return 0, False
            if st.lookup is not None and not st.lookup.done():
                self.stats.stats.add("lookup_not_ready")
                waits_for = "remote" if getattr(getattr(client, "index", None), "mapped", False) else "local"
                self.stats.stats.add(f"lookup_not_ready_{waits_for}")
                return None, False
            self._take_answer(st, request)
            if st.result is None:
                return 0, False
        st.hit_blocks = min(st.result[0], st.lookup_blocks, max_blocks)
        external = st.hit_blocks * self._block_size - num_computed_tokens
        if external <= 0:
            return 0, False
        # Hits all in host memory: loaded inside this step, layer by layer (the request is scheduled now). Else an
        # asynchronous load, which the request waits for in WAITING_FOR_REMOTE_KVS.
        st.in_step = self._in_step(st.result[1][num_computed_tokens // self._block_size : st.hit_blocks])
        return external, not st.in_step

    def _in_step(self, tiers: Sequence[int]) -> bool:
        """Load inside the step: every block in the daemon's host memory (and in-step loads on)."""
        return self._config.in_step_loads and all(t == _HOST for t in tiers)

    def may_load_async(self, request: Request) -> bool:
        """vLLM 0.34+: may this request's KV arrive by an async load (it then waits in a queue that can start
        loads while the batch is full)? Called right after on_new_request, when the lookup is usually still in
        flight: a known answer decides; an unknown one counts as a hit while most recent lookups hit. A wrong
        "yes" only holds back other async loads until a batch slot frees."""
        st = self._reqs.get(request.request_id)
        if self.client is None or st is None or not self._loadable(request):
            return False
        if st.result is None and st.lookup is not None and st.lookup.done():
            self._take_answer(st, request)
        if st.result is not None:  # a hit, and not one loaded inside the step (those are not async loads)
            hit = min(st.result[0], st.lookup_blocks, self._max_blocks(request))
            return hit > 0 and not self._in_step(st.result[1][:hit])
        return st.lookup is not None and self._hit_rate >= 0.5

    # -- admission -----------------------------------------------------------------------------------------------

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
        block_ids = blocks.get_block_ids()[0]
        end = min(st.hit_blocks, len(block_ids))
        start = max(0, (st.hit_blocks * bs - num_external_tokens) // bs)
        hashes = self._hashes(st, end * bs)
        # Always one op per async load, even an empty one: the request waits for its finished_recving.
        op = BlockOp(request.request_id, tuple(block_ids[start:end]), tuple(hashes[start:end]), st.in_step)
        self._pending_loads.append(op)
        self.stats.stats.add("query_tokens", request.num_tokens)
        self.stats.stats.add("hit_tokens", num_external_tokens)
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

    # -- each step -----------------------------------------------------------------------------------------------

    def _plan_save(self, st: _ReqState, req_id: str, computed_after: int, saves: list[BlockOp]) -> None:
        """Save the blocks that this step's forward makes full (KV written for every token of the block)."""
        request = st.request
        known = min(computed_after, len(request.all_token_ids))
        if not self._config.save_generated_tokens:
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

    def _track_new(self, scheduler_output: SchedulerOutput, plan: bool, saves: list[BlockOp]) -> None:
        """Newly scheduled requests (from 0.34 also resumed ones) bring their whole block table."""
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            if plan:
                self._plan_save(st, new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0), saves)

    def _track_cached(self, scheduler_output: SchedulerOutput, plan: bool, saves: list[BlockOp]) -> None:
        scheduled = scheduler_output.num_scheduled_tokens
        cached = scheduler_output.scheduled_cached_reqs
        resumed = compat.resumed_req_ids(cached)
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            if plan:
                self._plan_save(st, req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), saves)

    def _preempted(self, scheduler_output: SchedulerOutput) -> frozenset[str]:
        flush: set[str] = set()
        for req_id in scheduler_output.preempted_req_ids or ():
            st = self._reqs.get(req_id)
            if st is None:
                continue
            if st.has_saves:
                flush.add(req_id)
            st.forget_blocks()  # the worker forgets it too
        return frozenset(flush)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvdConnectorMetadata:
        saves: list[BlockOp] = []
        # While the daemon is away a save would only fail; keep the blocks unplanned and save them once it is back.
        plan = self._config.saves and self.client is not None and self.client.ready
        self._track_new(scheduler_output, plan, saves)
        self._track_cached(scheduler_output, plan, saves)
        flush = self._preempted(scheduler_output)
        meta = KvdConnectorMetadata(loads=tuple(self._pending_loads), saves=tuple(saves), flush_req_ids=flush)
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
