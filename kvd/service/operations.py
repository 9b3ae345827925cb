"""One save or one load, from the store's prepare verb through the session's copy to the store's complete verb, and
what its notice will say: which blocks failed and why (a typed FailureReason, with the text for the notice)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvd_client.layout import KvLayout

from kvd.errors import FailureReason, TransferError
from kvd.logs import Throttled
from kvd.memory.progress import LayerProgress
from kvd.tiers.store import BlockStore
from kvd.transports.base import Attachment
from kvd.types import BlockBatch, BlockHash, BlockKey, DaemonStages

log = logging.getLogger(__name__)
_throttled = Throttled(log)  # one traceback per kind of failure a minute: a bug that repeats must not flood the log


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
    blocks: BlockBatch
    keys: Sequence[BlockKey]  # one per block: (namespace key, block hash)
    ready_event: bytes
    what: str  # "save 3 of session 1a2b...", for the log
    stamps: DaemonStages  # stamped here: planned, submitted, resumed (the transport stamps its own stages)
    progress: LayerProgress | None = None  # an in-step load: layer by layer, reported in the progress page

    def memory(self) -> Attachment:
        if self.attachment is None:
            raise TransferError("session has no memory")
        return self.attachment


async def run_save(op: Operation) -> Outcome:
    """Copy the blocks not stored yet into fresh slots and commit them; wait for other saves of the same blocks."""
    store, (indices, hashes), layout, stamps = op.store, (op.blocks.indices, op.blocks.hashes), op.layout, op.stamps
    await store.make_room(op.keys, layout.block_bytes)
    plan = store.prepare_save(op.keys, layout.block_bytes)
    stamps.planned_ns = time.monotonic_ns()
    outcome = Outcome()
    if plan.no_room:
        outcome.fail([hashes[i] for i in plan.no_room], NO_ROOM)
    entries = plan.entries
    try:
        if entries:
            memory, addresses = op.memory(), [e.address for e in entries]  # one int per block, no object
            stamps.submitted_ns = time.monotonic_ns()
            await memory.save([indices[i] for i in plan.positions], addresses, op.ready_event, stamps)
            stamps.resumed_ns = time.monotonic_ns()
            outcome.moved = len(entries) * layout.block_bytes
        store.complete_save(plan, ok=True)
    except (Exception, asyncio.CancelledError) as exc:
        store.complete_save(plan, ok=False)
        outcome.fail([hashes[i] for i in plan.positions], failure_of(exc, op.what))
    for i, waiter in plan.in_flight:
        if not await waiter:
            outcome.fail([hashes[i]], outcome.failure or CONCURRENT_SAVE)
    return outcome


async def run_load(op: Operation) -> Outcome:
    """Copy the stored blocks into the worker; the missing ones fail (the worker recomputes them)."""
    store, (indices, hashes), stamps = op.store, (op.blocks.indices, op.blocks.hashes), op.stamps
    entries = await store.prepare_load(op.keys)
    stamps.planned_ns = time.monotonic_ns()
    present = [i for i, e in enumerate(entries) if e is not None]
    outcome = Outcome()
    if len(present) < len(entries):
        outcome.fail({h for h, e in zip(hashes, entries, strict=True) if e is None}, NOT_STORED)
    try:
        if present:
            memory, addresses = op.memory(), [e.address for e in entries if e is not None]
            stamps.submitted_ns = time.monotonic_ns()
            targets, progress = [indices[i] for i in present], op.progress
            if progress is None:
                outcome.done_event = await memory.load(targets, addresses, op.ready_event, stamps)
            else:
                load = memory.load_layers(targets, addresses, op.ready_event, progress, stamps)
                outcome.done_event = await load
            stamps.resumed_ns = time.monotonic_ns()
            outcome.moved = len(present) * op.layout.block_bytes
    except (Exception, asyncio.CancelledError) as exc:
        outcome.fail([hashes[i] for i in present], failure_of(exc, op.what))
    finally:
        store.complete_load(entries)
        if op.progress is not None:  # status, then the final counter: no wait on it outlives this load
            op.progress.finish(not outcome.failed)
    return outcome


def failure_of(exc: BaseException, what: str) -> Failure:
    """A failed copy's reason and text. A transfer error (the worker's memory gone, a CUDA error) or a cancelled
    drain is expected; anything else is a bug, logged with its traceback, that fails this operation and never the
    daemon."""
    if isinstance(exc, TransferError):
        return Failure(exc.reason, str(exc) or type(exc).__name__)
    if isinstance(exc, asyncio.CancelledError):
        return Failure(FailureReason.CANCELLED, str(exc) or type(exc).__name__)
    _throttled.log(logging.ERROR, f"op-{type(exc).__name__}", "%s failed", what, exc_info=exc)
    return Failure(FailureReason.INTERNAL, f"internal error: {exc}")


if sys.version_info >= (3, 12):

    def start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], eager: bool) -> asyncio.Task[None]:
        """A task for `coro`; `eager`: its first step runs now, in the caller (to its first wait)."""
        return asyncio.Task(coro, loop=loop, eager_start=eager)

else:

    def start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], eager: bool) -> asyncio.Task[None]:
        return loop.create_task(coro)  # 3.11 has no eager tasks: the first step runs on the next loop iteration
