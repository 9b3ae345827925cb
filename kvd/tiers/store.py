"""The block store the service talks to: which blocks exist, where, and slots to copy them into or out of.

The service layer decides (sessions, admission); the engine moves bytes; this module owns the bookkeeping of what
is stored. L1 is the host pool (the only tier the engine copies to and from directly); lower tiers (disk, remote
kvstore) sit behind it and are reached only through this class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvd.memory.host_pool import Entry, HostPool
from kvd.types import BlockKey, Tier, TierSnapshot


@dataclass(slots=True)
class SavePlan:
    """What a save has to do, per position in its batch."""

    to_write: list[tuple[int, Entry]] = field(default_factory=list)  # reserved slots this save fills
    in_flight: list[tuple[int, asyncio.Future[bool]]] = field(default_factory=list)  # another save is writing it
    no_room: list[int] = field(default_factory=list)


class BlockStore:
    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self._writing: dict[BlockKey, asyncio.Future[bool]] = {}
        self.hits = 0
        self.misses = 0

    # -- lookups -------------------------------------------------------------------------------------------------

    async def lookup(self, keys: Sequence[BlockKey]) -> tuple[int, tuple[Tier, ...]]:
        hit = self.pool.touch_prefix(keys)
        self.hits += hit
        self.misses += len(keys) - hit
        return hit, (Tier.HOST_MEMORY,) * hit

    # -- saves ---------------------------------------------------------------------------------------------------

    def plan_save(self, keys: Sequence[BlockKey], nbytes: int) -> SavePlan:
        """Reserve slots for the keys not stored yet. Keys already stored need nothing; keys being written by
        another save are waited for, so this save's notice never claims a block that is not there yet."""
        plan = SavePlan()
        seen: set[BlockKey] = set()
        fresh: list[int] = []
        pool, writing = self.pool, self._writing
        for i, key in enumerate(keys):
            if key in seen:
                continue
            seen.add(key)
            if pool.get(key) is not None:
                continue
            pending = writing.get(key)
            if pending is not None:
                plan.in_flight.append((i, pending))
                continue
            fresh.append(i)
        entries = pool.reserve_many([keys[i] for i in fresh], nbytes)
        done = asyncio.get_running_loop().create_future()  # one per save: finish_save settles its blocks together
        for i, entry in zip(fresh, entries, strict=False):
            writing[entry.key] = done
            plan.to_write.append((i, entry))
        plan.no_room = fresh[len(entries) :]
        return plan

    def finish_save(self, entries: Sequence[Entry], ok: bool) -> None:
        """Commit (bytes complete) or drop the reserved slots of a save, and wake saves waiting on them."""
        for entry in entries:
            if ok:
                self.pool.commit(entry)
            else:
                self.pool.discard(entry)
            waiter = self._writing.pop(entry.key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(ok)

    # -- loads ---------------------------------------------------------------------------------------------------

    async def acquire(self, keys: Sequence[BlockKey]) -> list[Entry | None]:
        """Pin the stored blocks for reading; None where a block is missing."""
        return self.pool.pin_stored(keys)

    def release(self, entries: Sequence[Entry | None]) -> None:
        for entry in entries:
            if entry is not None:
                self.pool.unpin(entry)

    # -- stats ---------------------------------------------------------------------------------------------------

    def snapshots(self) -> tuple[TierSnapshot, ...]:
        pool = self.pool
        return (
            TierSnapshot(
                tier=Tier.HOST_MEMORY,
                name="host",
                capacity_bytes=pool.capacity_bytes,
                used_bytes=pool.used_bytes,
                blocks=len(pool),
                hits=self.hits,
                misses=self.misses,
                evictions=pool.evictions,
            ),
        )

    def degraded_tiers(self) -> tuple[str, ...]:
        """Names of tiers that cannot serve now (health reports them; the daemon keeps serving). L1 never is."""
        return ()

    def stats_counters(self) -> dict[str, int]:
        """Tier counters beyond TierSnapshot (write-downs, prefetches, admission), for StatsSnapshot.counters."""
        return {}

    async def close(self) -> None:
        for waiter in self._writing.values():
            if not waiter.done():
                waiter.set_result(False)
