"""One save or one load, from the store's prepare verb through the session's copy to the store's complete verb, and
what its notice will say: which blocks failed and why (a typed FailureReason, with the text for the notice).

A large operation goes in segments (`Operation.segment_blocks` blocks each), pipelined: the first segment is planned
and handed to its transport at once, inside the request's handler, and each later one on the loop's next turn after
the one before it, so the first copy starts after one segment's planning instead of the whole request's, and the loop
takes in other requests between a request's segments: requests that arrive together start their first copies
together (a save right behind two large loads does not wait for their 32 segments' planning, while the link runs one
way only). Each segment's commit (a save's index publication) or unpin (a load's) runs while later segments are still
copying: only the last one's is left between the last byte and the notice. The notice still waits for every segment
and speaks for the whole request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
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
    done_segment: int = -1  # the segment whose copy done_event follows

    def last_done(self, event: bytes, segment: int) -> None:
        """A segment's done event, kept if that segment was handed over after every other one seen so far (its
        copies queue behind theirs on one stream, so its event follows them all)."""
        if segment > self.done_segment:
            self.done_event, self.done_segment = event, segment

    def fail(self, hashes: Sequence[BlockHash] | set[BlockHash], failure: Failure) -> None:
        self.failed.update(hashes)
        self.failure = failure


NOT_STORED = Failure(FailureReason.NOT_STORED, "not stored")
NO_ROOM = Failure(FailureReason.NO_ROOM, "host pool full")
CONCURRENT_SAVE = Failure(FailureReason.CONCURRENT_SAVE, "a concurrent save of the same block failed")
DRAINED = Failure(FailureReason.CANCELLED, "the daemon stopped before this operation finished")


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
    segment_blocks: int = 0  # more blocks than this go in pipelined segments (0: never; in-step loads never do)
    segment: int = 0  # this part's place among its operation's segments, in the order they are handed over
    # A save's segments commit in block order (so a request's blocks age in the LRU in that order, segmented or not):
    # each waits for the one before it (`commit_after`) and releases the one after it (`committed`).
    commit_after: asyncio.Future[None] | None = None
    committed: asyncio.Future[None] | None = None

    def memory(self) -> Attachment:
        if self.attachment is None:
            raise TransferError("session has no memory")
        return self.attachment

    def segments(self) -> list[Operation]:
        """This operation as its segments (itself when it is small enough), each with stamps of its own."""
        step, n = self.segment_blocks, len(self.keys)
        if step <= 0 or n <= step or self.progress is not None:
            return [self]
        (indices, hashes), received = (self.blocks.indices, self.blocks.hashes), self.stamps.received_ns
        loop = asyncio.get_running_loop()
        turns = [loop.create_future() for _ in range(0, n, step)]
        return [
            dataclasses.replace(
                self,
                blocks=BlockBatch(indices[start : start + step], hashes[start : start + step]),
                keys=self.keys[start : start + step],
                stamps=DaemonStages(received_ns=received),
                segment=number,
                commit_after=turns[number - 1] if number else None,
                committed=turns[number],
            )
            for number, start in enumerate(range(0, n, step))
        ]


async def run_save(op: Operation) -> Outcome:
    """Copy the blocks not stored yet into fresh slots and commit them; wait for other saves of the same blocks."""
    return await _run_segments(op, _save)


async def run_load(op: Operation) -> Outcome:
    """Copy the stored blocks into the worker; the missing ones fail (the worker recomputes them)."""
    return await _run_segments(op, _load)


Step = Callable[[Operation, Outcome], Coroutine[Any, Any, None]]


async def _run_segments(op: Operation, step: Step) -> Outcome:
    outcome = Outcome()
    parts = op.segments()
    if len(parts) == 1:
        await step(op, outcome)
        return outcome
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    begun = loop.create_future()  # done once the last segment has begun (or cancelled: begin no more)

    def begin(number: int) -> None:
        """Segment `number` planned and handed over now; the next one on the loop's next turn, after whatever else
        became ready meanwhile (another request's arrival, a completion): one segment per request per turn."""
        if begun.done():
            return
        if number + 1 < len(parts):
            loop.call_soon(begin, number + 1)
        else:
            begun.set_result(None)
        tasks.append(start_task(loop, step(parts[number], outcome), eager=True))

    begin(0)
    try:
        await begun
        results = await asyncio.gather(*tasks, return_exceptions=True)  # every segment ends before the notice
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each begun segment gives back its slots first
        raise
    merge_stamps(op.stamps, [part.stamps for part in parts])
    for result in results:
        if isinstance(result, BaseException):  # planning raised (as a whole request's would): the others are done
            raise result
    return outcome


def merge_stamps(whole: DaemonStages, parts: Sequence[DaemonStages]) -> None:
    """A segmented operation's stages: up to its first copy's start, the first segment's; from then on, the last."""
    first = parts[0]
    whole.planned_ns, whole.submitted_ns, whole.enqueue_start_ns = (
        first.planned_ns,
        first.submitted_ns,
        first.enqueue_start_ns,
    )
    whole.enqueue_end_ns = max(p.enqueue_end_ns for p in parts)
    whole.copy_done_ns = max(p.copy_done_ns for p in parts)
    whole.resumed_ns = max(p.resumed_ns for p in parts)


async def _save(op: Operation, outcome: Outcome) -> None:
    try:
        await _save_blocks(op, outcome)
    finally:
        _pass_turn(op)  # whatever became of this segment, the next one may commit


def _pass_turn(op: Operation) -> None:
    if op.committed is not None and not op.committed.done():
        op.committed.set_result(None)


async def _save_blocks(op: Operation, outcome: Outcome) -> None:
    store, (indices, hashes), layout, stamps = op.store, (op.blocks.indices, op.blocks.hashes), op.layout, op.stamps
    await store.make_room(op.keys, layout.block_bytes)
    plan = store.prepare_save(op.keys, layout.block_bytes)
    stamps.planned_ns = time.monotonic_ns()
    if plan.no_room:
        outcome.fail([hashes[i] for i in plan.no_room], NO_ROOM)
    entries = plan.entries
    try:
        if entries:
            memory, addresses = op.memory(), [e.address for e in entries]  # one int per block, no object
            stamps.submitted_ns = time.monotonic_ns()
            targets = [indices[i] for i in plan.positions]
            await memory.save(targets, addresses, op.ready_event, stamps, plan.while_copying)
            stamps.resumed_ns = time.monotonic_ns()
            outcome.moved += len(entries) * layout.block_bytes
        if op.commit_after is not None:
            await asyncio.shield(op.commit_after)  # (the GPU finishes a stream's segments in order anyway)
        store.complete_save(plan, ok=True)
    except (Exception, asyncio.CancelledError) as exc:
        store.complete_save(plan, ok=False)
        outcome.fail([hashes[i] for i in plan.positions], failure_of(exc, op.what))
    _pass_turn(op)  # before waiting for other saves: the next segment's commit does not depend on them
    for i, waiter in plan.in_flight:
        if not await waiter:
            outcome.fail([hashes[i]], outcome.failure or CONCURRENT_SAVE)


async def _load(op: Operation, outcome: Outcome) -> None:
    store, (indices, hashes), stamps = op.store, (op.blocks.indices, op.blocks.hashes), op.stamps
    entries = await store.prepare_load(op.keys)
    stamps.planned_ns = time.monotonic_ns()
    present = [i for i, e in enumerate(entries) if e is not None]
    if len(present) < len(entries):
        outcome.fail({h for h, e in zip(hashes, entries, strict=True) if e is None}, NOT_STORED)
    try:
        if present:
            memory, addresses = op.memory(), [e.address for e in entries if e is not None]
            stamps.submitted_ns = time.monotonic_ns()
            targets, progress = [indices[i] for i in present], op.progress
            if progress is None:
                # Segments queue on one stream in order: the last one's event comes after every earlier copy.
                done_event = await memory.load(targets, addresses, op.ready_event, stamps)
            else:
                done_event = await memory.load_layers(targets, addresses, op.ready_event, progress, stamps)
            outcome.last_done(done_event, op.segment)
            stamps.resumed_ns = time.monotonic_ns()
            outcome.moved += len(present) * op.layout.block_bytes
    except (Exception, asyncio.CancelledError) as exc:
        outcome.fail([hashes[i] for i in present], failure_of(exc, op.what))
    finally:
        store.complete_load(entries)
        if op.progress is not None:  # status, then the final counter: no wait on it outlives this load
            op.progress.finish(not outcome.failed)


def drained(hashes: Sequence[BlockHash]) -> Outcome:
    """The outcome of an operation that draining gave up on (cancelled): every block failed."""
    outcome = Outcome()
    outcome.fail(hashes, DRAINED)
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
