"""Write-down from L1 to the backends, by one background writer with a bounded queue.

WRITE_THROUGH queues each committed save for every backend (the slot pinned until written, so it is neither copied
on the loop nor evicted under the write); a full queue defers it to eviction (not a loss: the block stays in L1,
unmarked). WRITE_ON_EVICT copies an evicted block out in the pool's eviction hook (the slot is reused right after)
for the backends that admit it (the disk by reuse, kvd.tiers.reuse; the kvstore always). A block known to be stored
below (promoted, or written through) is not written again on eviction. Blocks copied out and still queued stay
findable through `pending` (the chain's lookups and fetches read it).

No silent loss: when a save is about to evict blocks whose only copy is in L1 and the queue is full, the save waits
(`make_room`, at most `tiers.write_down_wait_ms`) for the queue to drain while a lower tier is healthy, instead of
the evicted blocks being dropped. What is still dropped is counted per reason (`tier_write_down_dropped_<reason>_
blocks`, their sum `tier_write_down_dropped_blocks`):

    not_admitted     no backend takes it (disk_admission = "reused_only" turned it away, and there is no kvstore)
    no_healthy_tier  every backend that would take it is down or degraded
    queue_full       the queue is at twice its limit (the save's wait ran out)
    write_failed     every backend it was written to refused it
    shutdown         still queued when the daemon stopped (after a bounded flush)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kvd.config import DiskAdmission
from kvd.logs import Throttled
from kvd.memory.host_pool import Entry, HostPool
from kvd.memory.index_registry import BlockListener
from kvd.memory.shm_index import Source
from kvd.tiers.base import Buffer, StorageBackend
from kvd.tiers.reuse import ReuseFilter
from kvd.types import BlockKey, Tier

log = logging.getLogger(__name__)

MAX_WRITE_BATCH_BLOCKS = 32
MAX_WRITE_BATCH_BYTES = 256 << 20
DROP_REASONS = ("not_admitted", "no_healthy_tier", "queue_full", "write_failed", "shutdown")


@dataclass(eq=False, slots=True)
class WriteDown:
    key: BlockKey
    payload: Buffer
    entry: Entry | None  # write-through: the pinned L1 entry (unpinned when written); None: bytes copied out
    targets: tuple[StorageBackend, ...]

    @property
    def nbytes(self) -> int:
        return len(self.payload)


class WriteBack:
    def __init__(
        self,
        pool: HostPool,
        backends: Sequence[StorageBackend],
        queue_limit_bytes: int,
        *,
        disk_admission: DiskAdmission = DiskAdmission.ALWAYS,
        wait_s: float = 2.0,
    ) -> None:
        self.pool = pool
        self.backends = tuple(backends)
        self.queue_limit_bytes = queue_limit_bytes
        self.disk_admission = disk_admission
        self.wait_s = wait_s
        self.reuse = ReuseFilter()
        self.backed: set[BlockKey] = set()  # L1 blocks known to be stored below too
        self.pending: dict[BlockKey, WriteDown] = {}  # evicted from L1, copied out, not written down yet
        self.listener: BlockListener | None = None  # the published index (pending blocks stay loadable)
        self.counters = dict.fromkeys(
            ("tier_write_down_blocks", "tier_write_through_deferred_blocks", "tier_write_down_waits",
             "tier_write_down_wait_timeouts", "tier_disk_not_admitted_blocks"),
            0,
        )  # fmt: skip
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._queue: deque[WriteDown] = deque()
        self.queue_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drained = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._warn = Throttled(log)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._write_loop(), name="kvd-tiers-writer")

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write-down is done; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._queue or not self._idle.is_set():
                    await self._idle.wait()
                    await asyncio.sleep(0)
        except TimeoutError:
            return False
        return True

    def abandon(self) -> int:
        """At shutdown, after the flush: what is still queued is dropped (counted); how many blocks."""
        left = len(self._queue)
        self.dropped["shutdown"] += left
        return left

    # -- saves ---------------------------------------------------------------------------------------------------

    async def make_room(self, nbytes: int) -> None:
        """Before a save reserves `nbytes` of L1: if that must evict while the queue has no room for what it
        evicts, wait (bounded) for the queue to drain, as long as a lower tier is healthy to drain it."""
        need = min(nbytes, self.queue_limit_bytes)
        if self.pool.used_bytes + nbytes <= self.pool.capacity_bytes or self._room_for(need):
            return
        self.counters["tier_write_down_waits"] += 1
        try:
            async with asyncio.timeout(self.wait_s):
                while not self._room_for(need) and any(b.healthy for b in self.backends):
                    self._drained.clear()
                    await self._drained.wait()
        except TimeoutError:
            self.counters["tier_write_down_wait_timeouts"] += 1

    def _room_for(self, nbytes: int) -> bool:
        return self.queue_bytes + nbytes <= self.queue_limit_bytes

    def write_through(self, entries: Sequence[Entry]) -> None:
        """Queue committed saves for every backend, written straight from their slots."""
        for entry in entries:
            if not self._room_for(entry.nbytes):
                # Not lost: the block is not marked as stored below, so its eviction writes it down.
                self.counters["tier_write_through_deferred_blocks"] += 1
                continue
            self.pool.pin(entry)  # written straight from the slot; the pin keeps it from being evicted meanwhile
            self._enqueue(WriteDown(entry.key, self.pool.slot_view(entry), entry, self.backends))

    def on_evict(self, entry: Entry, view: memoryview) -> None:
        """HostPool eviction hook: runs right before the slot is reused."""
        key = entry.key
        if key in self.backed:
            self.backed.discard(key)
            self.reuse.left(key, written=True)
            return
        if not self.backends:
            return
        targets = self._targets(key)
        if not targets:
            self._drop("not_admitted")
        elif not any(b.healthy for b in targets):
            self._drop("no_healthy_tier")
        elif self.queue_bytes + entry.nbytes > 2 * self.queue_limit_bytes:
            self._drop("queue_full")
        else:
            item = WriteDown(key, bytes(view), None, targets)
            self.pending[key] = item
            if self.listener is not None:  # before the pool drops it from the index: published throughout
                self.listener.stored(key, Source.QUEUED)
            self._enqueue(item)

    def _targets(self, key: BlockKey) -> tuple[StorageBackend, ...]:
        """The backends that take `key` as it leaves L1 (the disk by reuse; the kvstore always)."""
        others = tuple(b for b in self.backends if b.tier is not Tier.DISK)
        take_all = (
            self.disk_admission is DiskAdmission.ALWAYS
            or len(others) == len(self.backends)  # no disk tier: nothing to decide
            or self.reuse.reused(key)
            # The only copy, and no other healthy tier would take it: the disk does rather than lose it.
            or (self.disk_admission is DiskAdmission.REUSED and not any(b.healthy for b in others))
        )
        self.reuse.left(key, written=take_all)
        if take_all:
            return self.backends
        self.counters["tier_disk_not_admitted_blocks"] += 1
        return others

    def _drop(self, reason: str, blocks: int = 1) -> None:
        self.dropped[reason] += blocks

    def _enqueue(self, item: WriteDown) -> None:
        self._queue.append(item)
        self.queue_bytes += item.nbytes
        self._idle.clear()
        self._wake.set()

    # -- the writer ----------------------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[WriteDown] = []
            nbytes = 0
            while self._queue and len(batch) < MAX_WRITE_BATCH_BLOCKS and nbytes < MAX_WRITE_BATCH_BYTES:
                item = self._queue.popleft()
                batch.append(item)
                nbytes += item.nbytes
            try:
                await self._write_batch(batch)
            except Exception:
                self._warn.exception("write-down", "tiers: write-down of %d blocks failed", len(batch))
                self._drop("write_failed", len(batch))
            finally:
                self._done(batch)

    def _done(self, batch: list[WriteDown]) -> None:
        for item in batch:
            self.queue_bytes -= item.nbytes
            if item.entry is not None:
                if isinstance(item.payload, memoryview):
                    with contextlib.suppress(BufferError):  # a view of the pool's mapping, which
                        item.payload.release()  # cannot be unmapped while one exists
                self.pool.unpin(item.entry)
            if self.pending.get(item.key) is item:
                del self.pending[item.key]
                if self.listener is not None:  # after the tier below published it, if it took it
                    self.listener.dropped(item.key, Source.QUEUED)
        self._drained.set()

    async def _write_batch(self, batch: list[WriteDown]) -> None:
        """Each item to each of its targets, one put per backend, all backends at once."""
        groups = [(b, [i for i, item in enumerate(batch) if b in item.targets]) for b in self.backends]
        groups = [(b, positions) for b, positions in groups if positions]
        results = await asyncio.gather(
            *(b.put([(batch[i].key, batch[i].payload) for i in positions]) for b, positions in groups)
        )
        stored = [False] * len(batch)
        for (_, positions), result in zip(groups, results, strict=True):
            for i, ok in zip(positions, result, strict=True):
                stored[i] = stored[i] or ok
        for item, ok in zip(batch, stored, strict=True):
            if not ok:
                self._drop("write_failed")
                continue
            self.counters["tier_write_down_blocks"] += 1
            if item.entry is not None and self.pool.get(item.key) is item.entry:
                self.backed.add(item.key)

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out.update({f"tier_write_down_dropped_{reason}_blocks": n for reason, n in self.dropped.items()})
        out["tier_write_down_dropped_blocks"] = sum(self.dropped.values())
        out["tier_write_queue_bytes"] = self.queue_bytes
        return out
