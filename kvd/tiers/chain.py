"""The tier chain: L1 (the host store) in front of any number of backends (disk, a global kvstore), fastest first.

The transports only ever copy to and from L1 slots, so every lower-tier block reaches a worker through L1:

* lookup: the longest prefix held by any tier, each hit labelled with its tier. A run of lower-tier hits counts
  only if the cost model says loading it beats recomputing it (kvd.tiers.admission). With `promote_on_hit`, the
  hits below L1 start being fetched into L1 at once (not awaited), so the load that follows finds them in memory.
* fetch: read + verify in the backend, reserve L1 slots, copy in (off the loop), commit. A save of the same key
  meanwhile waits for it like for another save. Loads waiting for a fetch get their pin at commit, so nothing can
  evict the block between the fetch and the load.
* prepare_load: L1 entries are pinned; blocks being fetched are awaited (never fetched twice); blocks only below L1
  are fetched now.
* write-down, to every backend (kvd.tiers.writeback): WRITE_THROUGH queues each committed save, WRITE_ON_EVICT
  copies an evicted block out as L1 drops it. Blocks copied out and still queued stay findable (lookup reports the
  tier they are going to).

Read-your-writes: a finished save is in L1 until evicted, and an evicted one is in the write queue until a tier has
it (or the write is dropped for lack of room, counted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvd.config import TiersConfig, TierWritePolicy
from kvd.errors import InvalidArgument, ResourceExhausted
from kvd.logs import Throttled
from kvd.memory.host_pool import Entry
from kvd.memory.index_registry import BlockListener
from kvd.memory.shm_index import Source
from kvd.tiers.admission import CostModel
from kvd.tiers.base import Buffer, StorageBackend, stop_task
from kvd.tiers.store import BlockStore, HostStore, SavePlan
from kvd.tiers.writeback import WriteBack
from kvd.types import BlockKey, Tier, TierSnapshot

log = logging.getLogger(__name__)

CLOSE_FLUSH_TIMEOUT_S = 10.0
Found = tuple[Tier, int]  # where a block is: (tier, blob bytes; 0 when unknown)


@dataclass(eq=False, slots=True)
class _Fetch:
    tier: Tier
    done: asyncio.Future[Entry | None]
    waiters: int = 0  # loads that want the entry pinned for them the moment it is committed


class TieredBlockStore(BlockStore):
    def __init__(
        self,
        l1: HostStore,
        backends: Sequence[StorageBackend],
        config: TiersConfig,
        *,
        write_queue_bytes: int | None = None,
    ) -> None:
        self.l1 = l1
        self.pool = pool = l1.pool
        self.backends = tuple(backends)
        self.write_policy = config.write_policy
        self.promote_on_hit = config.promote_on_hit
        self.cost = CostModel(config.recompute_us_per_token, config.tokens_per_block)
        # A quarter of L1 by default: enough to absorb a burst of evictions, small next to the pool.
        queue_limit = write_queue_bytes if write_queue_bytes is not None else pool.capacity_bytes // 4
        self.writeback = WriteBack(
            pool,
            self.backends,
            queue_limit,
            disk_admission=config.disk_admission,
            wait_s=config.write_down_wait_ms / 1000,
        )
        self._fetches: dict[BlockKey, _Fetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._warn = Throttled(log)
        self._tier_hits = dict.fromkeys((b.tier for b in self.backends), 0)
        self._tier_misses = dict.fromkeys((b.tier for b in self.backends), 0)
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "tier_prefetch_blocks",
                "tier_promoted_blocks",
                "tier_fetch_failed_blocks",
                "tier_admission_rejected_blocks",
            ),
            0,
        )
        pool.evict_hooks.append(self.writeback.on_evict)

    @property
    def max_block_bytes(self) -> int:
        return self.l1.max_block_bytes

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every backend (quick: slow work such as the disk index rebuild continues in the background)."""
        if self.writeback.task is not None:
            return
        self.writeback.start()
        for backend in self.backends:
            try:
                await backend.start()
            except Exception:
                log.exception("tier %s failed to start", backend.name)

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write-down is done; False on timeout."""
        return await self.writeback.flush(timeout_s)

    async def wait_fetches(self) -> None:
        """Wait for every fetch in flight (tests, the bench)."""
        pending = [f.done for f in self._fetches.values()]
        if pending:
            await asyncio.gather(*pending)

    async def close(self) -> None:
        if not await self.flush(CLOSE_FLUSH_TIMEOUT_S):
            log.warning("tiers: %d write-downs still queued at shutdown; dropped", self.writeback.abandon())
        for task in (self.writeback.task, *self._tasks):
            await stop_task(task)
        for backend in self.backends:
            try:
                await backend.close()
            except Exception:
                log.exception("closing tier %s", backend.name)
        await self.l1.close()

    # -- lookups -------------------------------------------------------------------------------------------------

    async def lookup(self, keys: Sequence[BlockKey]) -> tuple[int, tuple[Tier, ...]]:
        n_host, host_tiers = await self.l1.lookup(keys)
        self.writeback.reuse.hit(keys[:n_host])
        tiers: list[Tier] = list(host_tiers)
        rest = keys[n_host:]
        if not rest or not self.backends:
            return n_host, tuple(tiers)
        found = await self._locate(rest)
        hit = 0
        while hit < len(rest) and found[hit] is not None:
            hit += 1
        hit = self._admit(found[:hit])  # type: ignore[arg-type]
        below: list[BlockKey] = []
        late_l1_hits = 0
        for i in range(hit):
            tier, _ = found[i]  # type: ignore[misc]
            tiers.append(tier)
            if tier is Tier.HOST_MEMORY:
                late_l1_hits += 1
                self.writeback.reuse.hit((rest[i],))
                continue
            self._tier_hits[tier] += 1
            if rest[i] not in self._fetches:
                below.append(rest[i])
        self.l1.count_late_hits(late_l1_hits)
        if self.promote_on_hit and below:
            self._counters["tier_prefetch_blocks"] += len(below)
            self._start_fetch(below)
        return n_host + hit, tuple(tiers)

    async def _locate(self, keys: Sequence[BlockKey]) -> list[Found | None]:
        """Where each of `keys` (past the L1 prefix) is, or None."""
        found: list[Found | None] = [None] * len(keys)
        pending = self.writeback.pending
        for i, key in enumerate(keys):
            entry = self.pool.get(key)
            fetch = self._fetches.get(key)
            if entry is not None:  # in L1 after a block that is not (e.g. one promoted earlier)
                self.pool.touch(entry)
                found[i] = (Tier.HOST_MEMORY, entry.nbytes)
            elif fetch is not None:
                found[i] = (fetch.tier, 0)
            elif key in pending:
                found[i] = (pending[key].targets[0].tier, pending[key].nbytes)
        for backend in self.backends:
            ask = [i for i, where in enumerate(found) if where is None]
            if not ask:
                break
            start = time.monotonic()
            sizes = await backend.sizes([keys[i] for i in ask])
            if backend.healthy:
                self.cost.tier(backend.tier).observe_latency(time.monotonic() - start)
            for i, size in zip(ask, sizes, strict=True):
                if size is not None:
                    found[i] = (backend.tier, size)
            self._tier_misses[backend.tier] += sum(size is None for size in sizes)
        return found

    def _admit(self, found: list[Found]) -> int:
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
                self._counters["tier_admission_rejected_blocks"] += len(found) - start
                return start
            start = end
        return len(found)

    # -- saves ---------------------------------------------------------------------------------------------------

    async def make_room(self, keys: Sequence[BlockKey], nbytes: int) -> None:
        await self.writeback.make_room(len(keys) * nbytes)

    def prepare_save(self, keys: Sequence[BlockKey], nbytes: int) -> SavePlan:
        return self.l1.prepare_save(keys, nbytes)

    def complete_save(self, plan: SavePlan, ok: bool) -> None:
        self.l1.complete_save(plan, ok)
        if not ok or self.write_policy is not TierWritePolicy.WRITE_THROUGH or not self.backends:
            return
        self.writeback.write_through(plan.entries)

    # -- loads ---------------------------------------------------------------------------------------------------

    async def prepare_load(self, keys: Sequence[BlockKey]) -> list[Entry | None]:
        out: list[Entry | None] = [None] * len(keys)
        waits: list[tuple[int, _Fetch]] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            entry = self.l1.pin(key)
            if entry is not None:
                out[i] = entry
                self.writeback.reuse.hit((key,))
            elif key in self._fetches:
                fetch = self._fetches[key]
                fetch.waiters += 1
                waits.append((i, fetch))
            else:
                missing.append(i)
        if missing and (self.backends or self.writeback.pending):
            self._start_fetch(list(dict.fromkeys(keys[i] for i in missing)))
            for i in missing:
                fetch = self._fetches[keys[i]]
                fetch.waiters += 1
                waits.append((i, fetch))
        for i, fetch in waits:
            out[i] = await fetch.done  # pinned for this load at commit, if it arrived
        return out

    def complete_load(self, entries: Sequence[Entry | None]) -> None:
        self.l1.complete_load(entries)

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
            self._warn.exception("fetch", "tiers: fetching %d blocks failed", len(keys))
        finally:
            for key, fetch, entry in zip(keys, fetches, results, strict=True):
                if self._fetches.get(key) is fetch:
                    del self._fetches[key]
                if entry is not None:
                    for _ in range(fetch.waiters):
                        self.pool.pin(entry)
                    self.pool.touch(entry)
                else:
                    self._counters["tier_fetch_failed_blocks"] += 1
                if not fetch.done.done():
                    fetch.done.set_result(entry)

    async def _read_below(self, keys: list[BlockKey], fetches: list[_Fetch]) -> list[Buffer | None]:
        payloads: list[Buffer | None] = [None] * len(keys)
        for i, key in enumerate(keys):
            pending = self.writeback.pending.get(key)
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
        results: list[Entry | None] = [None] * len(keys)
        reserved: list[tuple[Buffer, Entry]] = []
        racing: list[tuple[int, asyncio.Future[bool]]] = []
        slots: list[int] = []  # position in `keys` of each reserved entry
        for i, (key, payload) in enumerate(zip(keys, payloads, strict=True)):
            if payload is None:
                continue
            entry = self.pool.get(key) or self.pool.reclaim(key)
            if entry is not None:  # saved meanwhile, or retired but not reused
                results[i] = entry
                continue
            writing = self.l1.pending_write(key)
            if writing is not None:  # a save is writing it right now: its bytes are as good
                racing.append((i, writing))
                continue
            try:
                entry = self.l1.reserve(key, len(payload))  # a save of this key now waits for us, as for another
            except (ResourceExhausted, InvalidArgument) as exc:
                log.debug("tiers: no L1 slot for a fetched block: %s", exc)
                continue
            reserved.append((payload, entry))
            slots.append(i)
        entries = [entry for _, entry in reserved]
        try:
            await self._copy_in(reserved)
        except BaseException:
            self.l1.finish_writes(entries, ok=False)
            raise
        from_pending = {k for k in keys if k in self.writeback.pending}
        self.l1.finish_writes(entries, ok=True)
        for i, entry in zip(slots, entries, strict=True):
            if entry.key not in from_pending:
                self.writeback.backed.add(entry.key)
            self._counters["tier_promoted_blocks"] += 1
            results[i] = entry
        for i, writing in racing:
            if await writing:
                results[i] = self.pool.get(keys[i])
        return results

    async def _copy_in(self, reserved: list[tuple[Buffer, Entry]]) -> None:
        """Copy payloads into their reserved slots, off the event loop."""
        if not reserved:
            return
        jobs = [(self.pool.slot_view(entry), payload) for payload, entry in reserved]
        try:
            await asyncio.get_running_loop().run_in_executor(None, _copy_all, jobs)
        finally:
            for slot, _ in jobs:
                slot.release()

    def publish_to(self, listener: BlockListener) -> None:
        self.l1.publish_to(listener)
        self.writeback.listener = listener
        for backend in self.backends:
            backend.publish_to(listener)

    def resident(self, namespace_key: str) -> list[tuple[bytes, Source]]:
        out = self.l1.resident(namespace_key)
        out += [(key[1], Source.QUEUED) for key in self.writeback.pending if key[0] == namespace_key]
        for backend in self.backends:
            out += [(h, Source.DISK) for h in backend.resident(namespace_key)]
        return out

    # -- stats ---------------------------------------------------------------------------------------------------

    def snapshots(self) -> tuple[TierSnapshot, ...]:
        return self.l1.snapshots() + tuple(
            b.snapshot(self._tier_hits[b.tier], self._tier_misses[b.tier]) for b in self.backends
        )

    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        out.update(self.l1.counters())
        out.update(self.writeback.stats())
        for backend in self.backends:
            c = backend.counters
            for field in ("dropped_writes", "errors", "bytes_read", "bytes_written"):
                out[f"tier_{backend.name}_{field}"] = getattr(c, field)
            for field, figure in backend.extra_counters().items():
                out[f"tier_{backend.name}_{field}"] = figure
        for name, value in self.cost.describe().items():
            out[name] = int(value)
        return out


def _copy_all(jobs: list[tuple[memoryview, Buffer]]) -> None:
    for slot, payload in jobs:
        slot[:] = payload
