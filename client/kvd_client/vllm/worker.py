"""The worker side (one per model worker process): hands each step's plan to the kvd client, never waits on it,
and reports completions through `get_finished` / `get_block_ids_with_load_errors`.

For a CUDA cache the client records the ready event on the current stream and makes the stream wait on a load's
done event; nothing here creates, enters or sets a stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from kvd_client.errors import InvalidArgument
from kvd_client.vllm import clients
from kvd_client.vllm.clients import ClientLike, ClientSpec
from kvd_client.vllm.in_step import InStepLoads
from kvd_client.vllm.metadata import BlockOp, KvdConnectorMetadata
from kvd_client.vllm.stats import StatsOwner

if TYPE_CHECKING:
    import torch

    from kvd_client import Completion

log = logging.getLogger(__name__)

# How long `handle_preemptions` may hold the model thread for in-flight saves of preempted requests (their blocks
# are about to be reused, and the daemon must have finished reading them first). Preemption is rare and already a
# slow path; a save still running after this is abandoned and logged.
PREEMPT_FLUSH_S = 2.0


class KvdWorker:
    """Worker-side state of `KvdConnector`. `make_spec(tp_rank)` names the client this worker registers with."""

    def __init__(self, make_spec: Callable[[int], ClientSpec], block_size: int, num_blocks: int | None) -> None:
        self._make_spec = make_spec
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._timeout_s = make_spec(0).timeout_s
        self.stats = StatsOwner()
        self.client: ClientLike | None = None
        self._spec: ClientSpec | None = None
        self._views: dict[str, Any] = {}
        self._block_dim = 0
        self._asleep = False
        self._ops: dict[int, tuple[str, bool, dict[bytes, int]]] = {}  # op id -> (req id, is_load, hash -> block)
        self._inflight_saves: dict[str, int] = {}
        self._inflight_loads: dict[str, int] = {}
        self._save_reqs: set[str] = set()  # requests with saves since admission (mirrors the scheduler's has_saves)
        self._finishing: set[str] = set()  # finished requests waiting for their saves to complete
        self._done_recving: set[str] = set()
        self._load_errors: set[int] = set()
        self._in_step: InStepLoads | None = None

    # -- registration and sleep ----------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        if not kv_caches:
            return
        self._views, self._block_dim = physical_views(kv_caches, self._num_blocks)
        cuda = any(getattr(t, "is_cuda", False) for t in kv_caches.values())
        self._in_step = InStepLoads(list(self._views), self._timeout_s, cuda)  # layers in the layout's order
        spec = self._make_spec(_tp_rank())
        client = clients.client_factory(spec)
        client.register_kv_caches(self._views, block_dim=self._block_dim, block_size_tokens=self._block_size)
        client.start()
        clients.publish(spec, client)
        self.client, self._spec = client, spec

    def unregister_kv_caches(self) -> None:
        """Before sleep: finish what is in flight (bounded), then have the daemon drop its mappings of the KV memory
        (the client stays registered, lookup-only, so a scheduler sharing it keeps working). Idempotent."""
        client = self.client
        if client is None or self._asleep:
            return
        self._flush(lambda: bool(self._ops), self._timeout_s, "sleeping")
        client.release_memory()
        self._asleep = True

    def restore_kv_caches(self) -> None:
        """After wake-up: register the (remapped) KV memory again. Idempotent."""
        client = self.client
        if client is None or not self._asleep:
            return
        client.register_kv_caches(self._views, block_dim=self._block_dim, block_size_tokens=self._block_size)
        self._asleep = False

    def shutdown(self) -> None:
        # Let saves in flight finish (bounded) so a clean shutdown leaves its blocks behind for the next process.
        self._flush(lambda: any(not is_load for _, is_load, _ in self._ops.values()), self._timeout_s, "shutting down")
        client, spec = self.client, self._spec
        self.client = None
        if client is not None and spec is not None:
            clients.release(spec, client)

    def _flush(self, busy: Callable[[], bool], timeout_s: float, why: str) -> None:
        deadline = time.monotonic() + timeout_s
        while busy():
            if time.monotonic() > deadline:
                log.warning("kvd connector %s with %d operations in flight", why, len(self._ops))
                return
            self._drain()
            time.sleep(0.001)

    # -- each step -----------------------------------------------------------------------------------------------

    def handle_preemptions(self, meta: Any) -> None:
        if not isinstance(meta, KvdConnectorMetadata) or not meta.flush_req_ids:
            return
        flush = meta.flush_req_ids
        self._flush(lambda: any(self._inflight_saves.get(r, 0) for r in flush), PREEMPT_FLUSH_S, "preempting")
        for req_id in flush:
            self._save_reqs.discard(req_id)
            self._finishing.discard(req_id)

    def start_load_kv(self, meta: Any) -> None:
        if not isinstance(meta, KvdConnectorMetadata):
            return
        for op in meta.loads:
            self.stats.stats.add("loads")
            self.stats.stats.add("load_blocks", len(op.block_ids))
            if op.in_step:
                self._start_in_step(op)
                continue
            self._inflight_loads[op.req_id] = self._inflight_loads.get(op.req_id, 0) + 1
            if self.client is None or self._asleep or not op.block_ids:
                self._finish_load(op.req_id, set(op.block_ids))
                continue
            op_id = self.client.load(op.pairs())
            self._ops[op_id] = (op.req_id, True, dict(zip(op.block_hashes, op.block_ids, strict=True)))

    def _start_in_step(self, op: BlockOp) -> None:
        self.stats.stats.add("in_step_loads")
        if self.client is None or self._asleep or self._in_step is None:
            self._load_errors.update(op.block_ids)  # this step's forward must not read them: vLLM recomputes them
            return
        self._in_step.start(self.client, op)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._in_step is not None and self.client is not None:
            self._in_step.wait_layer(self.client, layer_name)

    def wait_for_save(self, meta: Any) -> None:
        if not isinstance(meta, KvdConnectorMetadata) or not meta.saves:
            return
        client = None if self._asleep else self.client
        for op in meta.saves:
            self._save_reqs.add(op.req_id)
            if client is None:
                continue
            op_id = client.save(op.pairs())
            self._inflight_saves[op.req_id] = self._inflight_saves.get(op.req_id, 0) + 1
            self._ops[op_id] = (op.req_id, False, dict(zip(op.block_hashes, op.block_ids, strict=True)))
            self.stats.stats.add("saves")
            self.stats.stats.add("save_blocks", len(op.block_ids))

    def _finish_load(self, req_id: str, failed_blocks: Iterable[int]) -> None:
        self._load_errors.update(failed_blocks)
        left = self._inflight_loads.get(req_id, 1) - 1
        if left > 0:
            self._inflight_loads[req_id] = left
        else:
            self._inflight_loads.pop(req_id, None)
            self._done_recving.add(req_id)

    def _finish_save(self, req_id: str) -> None:
        left = self._inflight_saves.get(req_id, 1) - 1
        if left > 0:
            self._inflight_saves[req_id] = left
        else:
            self._inflight_saves.pop(req_id, None)

    def _completed(self, done: Completion, client: ClientLike) -> None:
        entry = self._ops.pop(done.op_id, None)
        if entry is None:
            return
        req_id, is_load, block_of = entry
        failed = set(block_of) if (not done.ok and not done.failed_hashes) else set(done.failed_hashes)
        failed_blocks = [block_of[h] for h in failed if h in block_of]
        kind = "load" if is_load else "save"
        if not done.ok:
            log.debug("kvd %s for %s failed for %d blocks: %s", kind, req_id, len(failed_blocks), done.error)
        self.stats.stats.add(f"{kind}_bytes", done.nbytes)
        self.stats.stats.add(f"{kind}_time_s", done.duration_s)
        self.stats.stats.add(f"{kind}_failed_blocks", len(failed_blocks))
        if not is_load:
            self._finish_save(req_id)
            return
        if done.done_event:
            # CUDA: order the current stream after the daemon's writes, also when some blocks failed (vLLM still
            # uses the ones before the first failure). The request runs in a later step, so its attention is
            # queued after this wait.
            client.wait_loaded(done)
        self._finish_load(req_id, failed_blocks)

    def _drain(self) -> None:
        client = self.client
        if client is None:
            return
        for done in client.poll_finished():
            self._completed(done, client)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self.stats.stats.add("worker_steps")
        if self._finishing:
            self.stats.stats.add("steps_with_saves_pending")
        self._drain()
        # Only requests the scheduler kept (request_finished returned True) may be reported as sent.
        self._finishing.update(r for r in finished_req_ids if r in self._save_reqs)
        sending = {r for r in self._finishing if not self._inflight_saves.get(r, 0)}
        self._finishing -= sending
        self._save_reqs -= sending
        recving, self._done_recving = self._done_recving, set()
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        # Called right after get_transfer_results in the same step, so errors arrive no later than finished_recving;
        # in-step loads end here, so theirs come in the step whose forward read the blocks.
        if self._in_step is not None and self.client is not None:
            failed, _ = self._in_step.settle(self.client)
            self._load_errors |= failed
            self.stats.stats.add("load_failed_blocks", len(failed))
        errors, self._load_errors = self._load_errors, set()
        return errors


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no distributed state (single process): rank 0
        return 0


def physical_views(kv_caches: Mapping[str, Any], num_blocks: int | None) -> tuple[dict[str, Any], int]:
    """Contiguous views of the layer tensors, in memory order, and the dimension that indexes blocks.

    vLLM may hand out permuted views (a backend's logical order over another physical order); kvd copies whole
    blocks of contiguous memory, so undo the permutation. Every layer must agree on the block dimension.
    """
    views: dict[str, Any] = {}
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
