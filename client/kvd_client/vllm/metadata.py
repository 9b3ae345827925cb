"""What the scheduler sends to every worker each step (pickled by vLLM)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True, slots=True)
class BlockOp:
    """Blocks of one request to load into or save from the worker's cache, with the kvd key of each."""

    req_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]
    in_step: bool = False  # a load inside this step (vllm.in_step), not one vLLM waits a step for

    def pairs(self) -> list[tuple[int, bytes]]:
        return list(zip(self.block_ids, self.block_hashes, strict=True))


@dataclass(frozen=True)
class KvdConnectorMetadata(KVConnectorMetadata):
    """One step's decisions, taken once by the scheduler so that every TP rank acts on the same answer."""

    loads: tuple[BlockOp, ...] = ()
    saves: tuple[BlockOp, ...] = ()
    # Requests preempted this step whose earlier saves may still be reading their (now freed) blocks.
    flush_req_ids: frozenset[str] = frozenset()
