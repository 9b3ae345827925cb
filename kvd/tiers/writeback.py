"""Write-down from L1 to every backend, by one background writer with a bounded queue (full: dropped and counted).

WRITE_THROUGH queues each committed save (the slot pinned until written, so it is neither copied on the loop nor
evicted under the write); WRITE_ON_EVICT copies an evicted block out in the pool's eviction hook (the slot is reused
right after). A block known to be stored below (promoted, or written through) is not written again on eviction.
Blocks copied out and still queued stay findable through `pending` (the chain's lookups and fetches read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kvd.memory.host_pool import Entry, HostPool
from kvd.memory.index_registry import BlockListener
from kvd.memory.shm_index import Source
from kvd.tiers.base import Buffer, StorageBackend
from kvd.types import BlockKey

log = logging.getLogger(__name__)

MAX_WRITE_BATCH_BLOCKS = 32
MAX_WRITE_BATCH_BYTES = 256 << 20


@dataclass(eq=False, slots=True)
class WriteDown:
    key: BlockKey
    payload: Buffer
    entry: Entry | None  # write-through: the pinned L1 entry (unpinned when written); None: bytes copied out

    @property
    def nbytes(self) -> int:
        return len(self.payload)


class WriteBack:
    def __init__(self, pool: HostPool, backends: Sequence[StorageBackend], queue_limit_bytes: int) -> None:
        self.pool = pool
        self.backends = tuple(backends)
        self.queue_limit_bytes = queue_limit_bytes
        self.backed: set[BlockKey] = set()  # L1 blocks known to be stored below too
        self.pending: dict[BlockKey, WriteDown] = {}  # evicted from L1, copied out, not written down yet
        self.listener: BlockListener | None = None  # the published index (pending blocks stay loadable)
        self.counters = dict.fromkeys(
            ("tier_write_down_blocks", "tier_write_down_dropped_blocks", "tier_write_down_failed_blocks"), 0
        )
        self._queue: deque[WriteDown] = deque()
        self.queue_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.task: asyncio.Task[None] | None = None

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

    def write_through(self, entries: Sequence[Entry]) -> None:
        """Queue committed saves, written straight from their slots."""
        for entry in entries:
            if self.queue_bytes + entry.nbytes > self.queue_limit_bytes:
                # Not lost: the block is not marked as stored below, so its eviction writes it down.
                self.counters["tier_write_down_dropped_blocks"] += 1
                continue
            self.pool.pin(entry)  # written straight from the slot; the pin keeps it from being evicted meanwhile
            self._enqueue(WriteDown(entry.key, self.pool.slot_view(entry), entry))

    def on_evict(self, entry: Entry, view: memoryview) -> None:
        """HostPool eviction hook: runs right before the slot is reused."""
        key = entry.key
        if key in self.backed:
            self.backed.discard(key)
            return
        if not self.backends:
            return
        if self.queue_bytes + entry.nbytes > self.queue_limit_bytes:
            self.counters["tier_write_down_dropped_blocks"] += 1
            return
        item = WriteDown(key, bytes(view), None)
        self.pending[key] = item
        if self.listener is not None:  # before the pool drops it from the index: published throughout
            self.listener.stored(key, Source.QUEUED)
        self._enqueue(item)

    def _enqueue(self, item: WriteDown) -> None:
        self._queue.append(item)
        self.queue_bytes += item.nbytes
        self._idle.clear()
        self._wake.set()

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
                log.exception("tiers: write-down of %d blocks failed", len(batch))
                self.counters["tier_write_down_failed_blocks"] += len(batch)
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

    async def _write_batch(self, batch: list[WriteDown]) -> None:
        items = [(item.key, item.payload) for item in batch]
        results = await asyncio.gather(*(backend.put(items) for backend in self.backends))
        for i, item in enumerate(batch):
            if any(result[i] for result in results):
                self.counters["tier_write_down_blocks"] += 1
                if item.entry is not None and self.pool.get(item.key) is item.entry:
                    self.backed.add(item.key)
            else:
                self.counters["tier_write_down_failed_blocks"] += 1
