"""One save or one load, from the store's prepare verb through the session's copy to the store's complete verb, and
what its notice will say: which blocks failed and why (a typed FailureReason, with the text for the notice)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvd_client.layout import KvLayout

from kvd.errors import FailureReason, TransferError
from kvd.tiers.store import BlockStore
from kvd.transports.base import Attachment, SlotRef
from kvd.types import BlockHash, BlockKey, BlockTransfer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Failure:
    reason: FailureReason  # for metrics
    message: str  # for the notice and the log


@dataclass(slots=True)
class Outcome:
    failed: set[BlockHash] = field(default_factory=set)
    failure: Failure | None = None  # set whenever `failed` is not empty
    moved: int = 0  # bytes copied
    done_event: bytes = b""  # a CUDA load's event for the worker to wait on

    def fail(self, hashes: Sequence[BlockHash] | set[BlockHash], failure: Failure) -> None:
        self.failed.update(hashes)
        self.failure = failure


NOT_STORED = Failure(FailureReason.NOT_STORED, "not stored")
NO_ROOM = Failure(FailureReason.NO_ROOM, "host pool full")
CONCURRENT_SAVE = Failure(FailureReason.CONCURRENT_SAVE, "a concurrent save of the same block failed")


@dataclass(frozen=True, slots=True)
class Operation:
    """One accepted save or load: what to copy, between which memory and which store."""

    store: BlockStore
    attachment: Attachment | None
    layout: KvLayout
    blocks: Sequence[BlockTransfer]
    keys: Sequence[BlockKey]  # one per block: (namespace key, block hash)
    ready_event: bytes
    what: str  # "save 3 of session 1a2b...", for the log

    def memory(self) -> Attachment:
        if self.attachment is None:
            raise TransferError("session has no memory")
        return self.attachment


async def run_save(op: Operation) -> Outcome:
    """Copy the blocks not stored yet into fresh slots and commit them; wait for other saves of the same blocks."""
    store, blocks, layout = op.store, op.blocks, op.layout
    plan = store.prepare_save(op.keys, layout.block_bytes)
    outcome = Outcome()
    if plan.no_room:
        outcome.fail([blocks[i].block_hash for i in plan.no_room], NO_ROOM)
    entries = plan.entries
    try:
        if entries:
            await op.memory().save(
                [blocks[i].block_index for i, _ in plan.to_write],
                [SlotRef(e.address, e.nbytes) for e in entries],
                op.ready_event,
            )
            outcome.moved = len(entries) * layout.block_bytes
        store.complete_save(plan, ok=True)
    except (Exception, asyncio.CancelledError) as exc:
        store.complete_save(plan, ok=False)
        outcome.fail([blocks[i].block_hash for i, _ in plan.to_write], failure_of(exc, op.what))
    for i, waiter in plan.in_flight:
        if not await waiter:
            outcome.fail([blocks[i].block_hash], outcome.failure or CONCURRENT_SAVE)
    return outcome


async def run_load(op: Operation) -> Outcome:
    """Copy the stored blocks into the worker; the missing ones fail (the worker recomputes them)."""
    store, blocks = op.store, op.blocks
    entries = await store.prepare_load(op.keys)
    present = [(b, e) for b, e in zip(blocks, entries, strict=True) if e is not None]
    outcome = Outcome()
    missing = {b.block_hash for b, e in zip(blocks, entries, strict=True) if e is None}
    if missing:
        outcome.fail(missing, NOT_STORED)
    try:
        if present:
            outcome.done_event = await op.memory().load(
                [b.block_index for b, _ in present],
                [SlotRef(e.address, e.nbytes) for _, e in present],
                op.ready_event,
            )
            outcome.moved = len(present) * op.layout.block_bytes
    except (Exception, asyncio.CancelledError) as exc:
        outcome.fail([b.block_hash for b, _ in present], failure_of(exc, op.what))
    finally:
        store.complete_load(entries)
    return outcome


def failure_of(exc: BaseException, what: str) -> Failure:
    """A failed copy's reason and text. A transfer error (the worker's memory gone, a CUDA error) or a cancelled
    drain is expected; anything else is a bug, logged with its traceback, that fails this operation and never the
    daemon."""
    if isinstance(exc, TransferError):
        return Failure(exc.reason, str(exc) or type(exc).__name__)
    if isinstance(exc, asyncio.CancelledError):
        return Failure(FailureReason.CANCELLED, str(exc) or type(exc).__name__)
    log.error("%s failed", what, exc_info=exc)
    return Failure(FailureReason.INTERNAL, f"internal error: {exc}")
