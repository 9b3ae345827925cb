"""The tier chain: L1 (the host pool) in front of any number of backends (disk, a global kvstore), fastest first.

The engine only ever copies to and from L1 slots, so every lower-tier block reaches a worker through L1:

* lookup: the longest prefix held by any tier, each hit labelled with its tier. A run of lower-tier hits counts
  only if the cost model says loading it beats recomputing it (kvd.tiers.admission). With `promote_on_hit`, the
  hits below L1 start being fetched into L1 at once (not awaited), so the load that follows finds them in memory.
* fetch: read + verify in the backend, reserve L1 slots, copy in (off the loop), commit. A save of the same key
  meanwhile waits for it like for another save. Loads waiting for a fetch get their pin at commit, so nothing can
  evict the block between the fetch and the load.
* acquire (the load path): L1 entries are pinned; blocks being fetched are awaited (never fetched twice); blocks
  only below L1 are fetched now.
* write-down, to every backend, by a background writer with a bounded queue (full: dropped and counted):
  WRITE_THROUGH queues each committed save (the slot pinned until written, so it is neither copied on the loop
  nor evicted under the write); WRITE_ON_EVICT copies an evicted block out in the eviction hook (the slot is reused
  right after). A block known to be stored below (promoted, or written through) is not written again on eviction.
  Blocks copied out and still queued stay findable (lookup reports the tier they are going to).

Read-your-writes: a finished save is in L1 until evicted, and an evicted one is in the write queue until a tier has
it (or the write is dropped for lack of room, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kvd.config import TiersConfig, TierWritePolicy
from kvd.errors import InvalidArgument, ResourceExhausted
from kvd.memory.host_pool import Entry, HostPool
from kvd.tiers.admission import CostModel
from kvd.tiers.base import Buffer, StorageBackend
from kvd.tiers.store import BlockStore
from kvd.types import BlockKey, Tier, TierSnapshot

log = logging.getLogger(__name__)

MAX_WRITE_BATCH_BLOCKS = 32
MAX_WRITE_BATCH_BYTES = 256 << 20
CLOSE_FLUSH_TIMEOUT_S = 10.0


@dataclass(eq=False, slots=True)
class _Fetch:
    tier: Tier
    done: asyncio.Future[Entry | None]
    waiters: int = 0  # loads that want the entry pinned for them the moment it is committed


@dataclass(eq=False, slots=True)
class _WriteDown:
    key: BlockKey
    payload: Buffer
    entry: Entry | None  # write-through: the pinned L1 entry (unpinned when written); None: bytes copied out

    @property
    def nbytes(self) -> int:
        return len(self.payload)


class TieredBlockStore(BlockStore):
    def __init__(
        self,
        pool: HostPool,
        backends: Sequence[StorageBackend],
        config: TiersConfig,
        *,
        write_queue_bytes: int | None = None,
    ) -> None:
        super().__init__(pool)
        self.backends = tuple(backends)
        self.write_policy = config.write_policy
        self.promote_on_hit = config.promote_on_hit
        self.cost = CostModel(config.recompute_us_per_token, config.tokens_per_block)
        # A quarter of L1 by default: enough to absorb a burst of evictions, small next to the pool.
        self.write_queue_limit = write_queue_bytes if write_queue_bytes is not None else pool.capacity_bytes // 4
        self._fetches: dict[BlockKey, _Fetch] = {}
        self._backed: set[BlockKey] = set()  # L1 blocks known to be stored below too
        self._pending: dict[BlockKey, _WriteDown] = {}  # evicted from L1, copied out, not written down yet
        self._queue: deque[_WriteDown] = deque()
        self._queue_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tier_hits = dict.fromkeys((b.tier for b in self.backends), 0)
        self._tier_misses = dict.fromkeys((b.tier for b in self.backends), 0)
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "tier_prefetch_blocks",
                "tier_promoted_blocks",
                "tier_fetch_failed_blocks",
                "tier_admission_rejected_blocks",
                "tier_write_down_blocks",
                "tier_write_down_dropped_blocks",
                "tier_write_down_failed_blocks",
            ),
            0,
        )
        pool.evict_hooks.append(self._on_evict)
        self._started: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # built inside the daemon's loop: start at once
            self._started = asyncio.get_running_loop().create_task(self.start(), name="kvd-tiers-start")

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every backend (quick: slow work such as the disk index rebuild continues in the background)."""
        if self._writer is not None:
            return
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="kvd-tiers-writer")
        for backend in self.backends:
            try:
                await backend.start()
            except Exception:
                log.exception("tier %s failed to start", backend.name)

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

    async def wait_fetches(self) -> None:
        """Wait for every fetch in flight (tests, the bench)."""
        pending = [f.done for f in self._fetches.values()]
        if pending:
            await asyncio.gather(*pending)

    async def close(self) -> None:
        if self._started is not None:
            with contextlib.suppress(Exception):
                await self._started
        if not await self.flush(CLOSE_FLUSH_TIMEOUT_S):
            log.warning("tiers: %d write-downs still queued at shutdown; dropped", len(self._queue))
        for task in (self._writer, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._writer, *self._tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for backend in self.backends:
            try:
                await backend.close()
            except Exception:
                log.exception("closing tier %s", backend.name)
        await super().close()

    # -- lookups -------------------------------------------------------------------------------------------------

    async def lookup(self, keys: Sequence[BlockKey]) -> tuple[int, tuple[Tier, ...]]:
        n_host = self.pool.touch_prefix(keys)
        self.hits += n_host
        self.misses += len(keys) - n_host
        tiers: list[Tier] = [Tier.HOST_MEMORY] * n_host
        rest = keys[n_host:]
        if not rest or not self.backends:
            return n_host, tuple(tiers)

        # Where each remaining block is: (tier, blob bytes), or None.
        found: list[tuple[Tier, int] | None] = [None] * len(rest)
        for i, key in enumerate(rest):
            entry = self.pool.get(key)
            fetch = self._fetches.get(key)
            if entry is not None:  # in L1 after a block that is not (e.g. one promoted earlier)
                self.pool.touch(entry)
                found[i] = (Tier.HOST_MEMORY, entry.nbytes)
            elif fetch is not None:
                found[i] = (fetch.tier, 0)
            elif key in self._pending:
                found[i] = (self.backends[0].tier, self._pending[key].nbytes)
        for backend in self.backends:
            ask = [i for i, where in enumerate(found) if where is None]
            if not ask:
                break
            start = time.monotonic()
            sizes = await backend.sizes([rest[i] for i in ask])
            if backend.healthy:
                self.cost.tier(backend.tier).observe_latency(time.monotonic() - start)
            for i, size in zip(ask, sizes, strict=True):
                if size is not None:
                    found[i] = (backend.tier, size)
            self._tier_misses[backend.tier] += sum(size is None for size in sizes)

        hit = 0
        while hit < len(rest) and found[hit] is not None:
            hit += 1
        hit = self._admit(found[:hit])  # type: ignore[arg-type]
        below: list[BlockKey] = []
        for i in range(hit):
            tier, _ = found[i]  # type: ignore[misc]
            tiers.append(tier)
            if tier is Tier.HOST_MEMORY:
                self.hits += 1
                self.misses -= 1
                continue
            self._tier_hits[tier] += 1
            if rest[i] not in self._fetches:
                below.append(rest[i])
        if self.promote_on_hit and below:
            self.counters["tier_prefetch_blocks"] += len(below)
            self._start_fetch(below)
        return n_host + hit, tuple(tiers)

    def _admit(self, found: list[tuple[Tier, int]]) -> int:
        """The length of the prefix worth loading: cut before the first run of same-tier blocks that would load
        slower than it recomputes."""
        start = 0
        while start < len(found):
            tier = found[start][0]
            end = start
            while end < len(found) and found[end][0] is tier:
                end += 1
            sizes = [size for _, size in found[start:end] if size]
            block_bytes = sum(sizes) // len(sizes) if sizes else 0
            if not self.cost.worth_loading(tier, end - start, block_bytes):
                self.counters["tier_admission_rejected_blocks"] += len(found) - start
                return start
            start = end
        return len(found)

    # -- saves ---------------------------------------------------------------------------------------------------

    def finish_save(self, entries: Sequence[Entry], ok: bool) -> None:
        super().finish_save(entries, ok)
        if not ok or self.write_policy is not TierWritePolicy.WRITE_THROUGH or not self.backends:
            return
        for entry in entries:
            if self._queue_bytes + entry.nbytes > self.write_queue_limit:
                # Not lost: the block is not marked as stored below, so its eviction writes it down.
                self.counters["tier_write_down_dropped_blocks"] += 1
                continue
            self.pool.pin(entry)  # written straight from the slot; the pin keeps it from being evicted meanwhile
            self._enqueue(_WriteDown(entry.key, self.pool.slot_view(entry), entry))

    def _on_evict(self, entry: Entry, view: memoryview) -> None:
        """HostPool eviction hook: runs right before the slot is reused."""
        key = entry.key
        if key in self._backed:
            self._backed.discard(key)
            return
        if not self.backends:
            return
        if self._queue_bytes + entry.nbytes > self.write_queue_limit:
            self.counters["tier_write_down_dropped_blocks"] += 1
            return
        item = _WriteDown(key, bytes(view), None)
        self._pending[key] = item
        self._enqueue(item)

    def _enqueue(self, item: _WriteDown) -> None:
        self._queue.append(item)
        self._queue_bytes += item.nbytes
        self._idle.clear()
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[_WriteDown] = []
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
                for item in batch:
                    self._queue_bytes -= item.nbytes
                    if item.entry is not None:
                        if isinstance(item.payload, memoryview):
                            with contextlib.suppress(BufferError):  # a view of the pool's mapping, which
                                item.payload.release()  # cannot be unmapped while one exists
                        self.pool.unpin(item.entry)
                    if self._pending.get(item.key) is item:
                        del self._pending[item.key]

    async def _write_batch(self, batch: list[_WriteDown]) -> None:
        items = [(item.key, item.payload) for item in batch]
        results = await asyncio.gather(*(backend.put(items) for backend in self.backends))
        for i, item in enumerate(batch):
            if any(result[i] for result in results):
                self.counters["tier_write_down_blocks"] += 1
                if item.entry is not None and self.pool.get(item.key) is item.entry:
                    self._backed.add(item.key)
            else:
                self.counters["tier_write_down_failed_blocks"] += 1

    # -- loads ---------------------------------------------------------------------------------------------------

    async def acquire(self, keys: Sequence[BlockKey]) -> list[Entry | None]:
        out: list[Entry | None] = [None] * len(keys)
        waits: list[tuple[int, _Fetch]] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            entry = self.pool.get(key)
            if entry is not None:
                self.pool.pin(entry)
                self.pool.touch(entry)
                out[i] = entry
            elif key in self._fetches:
                fetch = self._fetches[key]
                fetch.waiters += 1
                waits.append((i, fetch))
            else:
                missing.append(i)
        if missing and (self.backends or self._pending):
            self._start_fetch(list(dict.fromkeys(keys[i] for i in missing)))
            for i in missing:
                fetch = self._fetches[keys[i]]
                fetch.waiters += 1
                waits.append((i, fetch))
        for i, fetch in waits:
            out[i] = await fetch.done  # pinned for this load at commit, if it arrived
        return out

    def _start_fetch(self, keys: list[BlockKey]) -> None:
        """Register fetches for `keys` (none of them in L1 or being fetched) and run them in the background."""
        loop = asyncio.get_running_loop()
        tier = self.backends[0].tier if self.backends else Tier.HOST_MEMORY
        fetches = []
        for key in keys:
            fetch = _Fetch(tier, loop.create_future())
            self._fetches[key] = fetch
            fetches.append(fetch)
        task = loop.create_task(self._fetch(keys, fetches), name="kvd-tiers-fetch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, keys: list[BlockKey], fetches: list[_Fetch]) -> None:
        results: list[Entry | None] = [None] * len(keys)
        try:
            payloads = await self._read_below(keys, fetches)
            results = await self._install(keys, payloads)
        except Exception:
            log.exception("tiers: fetching %d blocks failed", len(keys))
        finally:
            for key, fetch, entry in zip(keys, fetches, results, strict=True):
                if self._fetches.get(key) is fetch:
                    del self._fetches[key]
                if entry is not None:
                    for _ in range(fetch.waiters):
                        self.pool.pin(entry)
                    self.pool.touch(entry)
                else:
                    self.counters["tier_fetch_failed_blocks"] += 1
                if not fetch.done.done():
                    fetch.done.set_result(entry)

    async def _read_below(self, keys: list[BlockKey], fetches: list[_Fetch]) -> list[Buffer | None]:
        payloads: list[Buffer | None] = [None] * len(keys)
        for i, key in enumerate(keys):
            pending = self._pending.get(key)
            if pending is not None:
                payloads[i] = pending.payload
        for backend in self.backends:
            ask = [i for i, p in enumerate(payloads) if p is None]
            if not ask:
                break
            for i in ask:
                fetches[i].tier = backend.tier
            start = time.monotonic()
            got = await backend.get([keys[i] for i in ask])
            seconds = time.monotonic() - start
            nbytes = sum(len(p) for p in got if p is not None)
            if nbytes:
                self.cost.tier(backend.tier).observe_read(nbytes, seconds)
            for i, payload in zip(ask, got, strict=True):
                payloads[i] = payload
        return payloads

    async def _install(self, keys: list[BlockKey], payloads: list[Buffer | None]) -> list[Entry | None]:
        """Copy fetched payloads into fresh L1 slots and commit them."""
        loop = asyncio.get_running_loop()
        results: list[Entry | None] = [None] * len(keys)
        reserved: list[tuple[Buffer, Entry, asyncio.Future[bool]]] = []
        racing: list[tuple[int, asyncio.Future[bool]]] = []
        slots: list[int] = []  # position in `keys` of each reserved entry
        for i, (key, payload) in enumerate(zip(keys, payloads, strict=True)):
            if payload is None:
                continue
            entry = self.pool.get(key)
            if entry is not None:  # saved meanwhile
                results[i] = entry
                continue
            writing = self._writing.get(key)
            if writing is not None:  # a save is writing it right now: its bytes are as good
                racing.append((i, writing))
                continue
            try:
                entry = self.pool.reserve(key, len(payload))
            except (ResourceExhausted, InvalidArgument) as exc:
                log.debug("tiers: no L1 slot for a fetched block: %s", exc)
                continue
            waiter: asyncio.Future[bool] = loop.create_future()
            self._writing[key] = waiter  # a save of this key now waits for us, as for another save
            reserved.append((payload, entry, waiter))
            slots.append(i)
        try:
            if reserved:
                jobs = [(self.pool.slot_view(entry), payload) for payload, entry, _ in reserved]
                try:
                    await loop.run_in_executor(None, _copy_all, jobs)
                finally:
                    for slot, _ in jobs:
                        slot.release()
        except BaseException:
            for _, entry, waiter in reserved:
                self.pool.discard(entry)
                self._writing.pop(entry.key, None)
                waiter.set_result(False)
            raise
        from_pending = {k for k in keys if k in self._pending}
        for i, (_, entry, waiter) in zip(slots, reserved, strict=True):
            self.pool.commit(entry)
            self._writing.pop(entry.key, None)
            waiter.set_result(True)
            if entry.key not in from_pending:
                self._backed.add(entry.key)
            self.counters["tier_promoted_blocks"] += 1
            results[i] = entry
        for i, writing in racing:
            if await writing:
                results[i] = self.pool.get(keys[i])
        return results

    # -- stats ---------------------------------------------------------------------------------------------------

    def snapshots(self) -> tuple[TierSnapshot, ...]:
        return super().snapshots() + tuple(
            b.snapshot(self._tier_hits[b.tier], self._tier_misses[b.tier]) for b in self.backends
        )

    def degraded_tiers(self) -> tuple[str, ...]:
        """Names of the tiers that cannot serve now (the daemon keeps serving from the others)."""
        return tuple(b.name for b in self.backends if not b.healthy)

    def stats_counters(self) -> dict[str, int]:
        """Counters beyond TierSnapshot, flat, for StatsSnapshot.counters / metrics."""
        out = dict(self.counters)
        out["tier_write_queue_bytes"] = self._queue_bytes
        for backend in self.backends:
            c = backend.counters
            for field in ("dropped_writes", "errors", "bytes_read", "bytes_written"):
                out[f"tier_{backend.name}_{field}"] = getattr(c, field)
        for name, value in self.cost.describe().items():
            out[name] = int(value)
        return out


def _copy_all(jobs: list[tuple[memoryview, Buffer]]) -> None:
    for slot, payload in jobs:
        slot[:] = payload
