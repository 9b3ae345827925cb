"""Eviction in two steps, so that a block a client just found in the published index is still there for the load
that follows.

A block first *retires*: it leaves lookups and the index, the eviction hooks run (write-on-evict copies it out), but
its bytes stay, and a load or a save of it takes it back (`reclaim`). Its slot is reused only `reuse_grace_ms` later.
While a size class is full the pool keeps about one grace period's worth of its reserves retired ahead of need (at
most a quarter of it: those blocks are still loadable, only no longer advertised). A slot needed before any retired
block's grace is over cuts the grace of the oldest (counted: `grace_cut`).
"""

from __future__ import annotations

import itertools
import time

from kvd.memory.index_registry import BlockListener
from kvd.memory.shm_index import Source
from kvd.memory.slots import Entry, EvictHook, SizeClass, Slab, SlotState
from kvd.types import BlockKey

RETIRED_AHEAD_DIVISOR = 4  # at most this fraction (1/n) of a size class's blocks retired ahead of need


class Retiring:
    """The two-step eviction of kvd.memory.host_pool.HostPool (a mixin: the pool holds the state)."""

    grace_s: float
    grace_cut: int
    evictions: int
    listener: BlockListener | None
    evict_hooks: list[EvictHook]
    _classes: dict[int, SizeClass]
    _entries: dict[BlockKey, Entry]
    _free_slabs: list[int]
    _slabs: list[Slab]
    used_bytes: int

    def commit(self, entry: Entry) -> None:
        raise NotImplementedError

    def slot_view(self, entry: Entry) -> memoryview:
        raise NotImplementedError

    def _release(self, entry: Entry) -> None:
        raise NotImplementedError

    def reclaim(self, key: BlockKey) -> Entry | None:
        """A RETIRED block taken back (READY, in the index again: a load or save wants it and its bytes were never
        reused), or None."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not SlotState.RETIRED:
            return None
        size_class = self._classes[entry.nbytes]
        del size_class.retired[key]
        self.commit(entry)
        return entry

    def _reuse_retired_many(self, size_class: SizeClass, count: int) -> int:
        """Free the slots of up to `count` of the oldest retired blocks (retiring least recently used ones first
        where too few are retired); how many were freed."""
        retired = size_class.retired
        if len(retired) < count:
            self._retire_many(size_class, count - len(retired))
        victims = list(itertools.islice(retired.values(), count))
        cut = time.monotonic() - self.grace_s
        self.grace_cut += sum(1 for entry in victims if entry.last_use > cut)
        self._free_retired(size_class, victims)
        return len(victims)

    def _free_retired(self, size_class: SizeClass, victims: list[Entry]) -> None:
        """Give retired blocks' slots back (they left the index when they retired): one pass, slabs settled once."""
        entries, slabs, retired, freed = self._entries, self._slabs, size_class.retired, SlotState.FREED
        touched: dict[int, Slab] = {}
        for entry in victims:
            del entries[entry.key]
            del retired[entry.key]
            entry.state = freed
            slab = touched[entry.slab] = slabs[entry.slab]
            slab.free_slots.append(entry.slot)
            slab.entries -= 1
        self.used_bytes -= size_class.block_bytes * len(victims)
        size_class.free += len(victims)
        for slab in touched.values():
            slab.sorted = False
            self._settle_slab(size_class, slab)

    def _settle_slab(self, size_class: SizeClass, slab: Slab) -> None:
        """After slots of `slab` were freed (and counted in `size_class.free`): it is open for reservations, or, now
        empty, back on the shared free list, so another block size can use it."""
        if slab.entries:
            size_class.open[slab.index] = None
            return
        size_class.slabs.discard(slab.index)
        size_class.open.pop(slab.index, None)
        size_class.free -= len(slab.free_slots)
        slab.block_bytes = 0
        slab.free_slots.clear()
        slab.sorted = True
        self._free_slabs.append(slab.index)

    def _retire_ahead(self, size_class: SizeClass, reserved: int) -> None:
        """While the size class is full, keep one grace period's worth of its reserves retired ahead of need."""
        if self.grace_s <= 0:
            return
        now = time.monotonic()
        reserves = size_class.reserves
        reserves.extend([now] * reserved)
        while reserves and now - reserves[0] > self.grace_s:
            reserves.popleft()
        full = not self._free_slabs and not size_class.open
        limit = min(len(reserves), max(1, len(size_class.lru) // RETIRED_AHEAD_DIVISOR))
        if full and len(size_class.retired) < limit:
            self._retire_many(size_class, limit - len(size_class.retired))

    def _retire_many(self, size_class: SizeClass, wanted: int) -> None:
        """Retire up to `wanted` of the least recently used blocks nobody reads, out of the index in one update."""
        victims = list(itertools.islice((e for e in size_class.lru.values() if e.pins == 0), wanted))
        if self.listener is not None and victims:  # out of the index first, all of them in one update
            self.listener.dropped_many([entry.key for entry in victims], Source.HOST)
        if self.evict_hooks:
            for entry in victims:
                self._retire(entry, indexed=False)
            return
        now, lru, retired, state = time.monotonic(), size_class.lru, size_class.retired, SlotState.RETIRED
        for entry in victims:  # `_retire` without hooks, inlined: a large save retires hundreds
            del lru[entry.key]
            entry.state = state
            entry.last_use = now
            retired[entry.key] = entry
        self.evictions += len(victims)

    def _retire(self, entry: Entry, indexed: bool = True) -> None:
        """Out of lookups and the index (`indexed`: still in it), eviction hooks run (write-down copies it out);
        bytes kept for the grace."""
        if self.listener is not None and indexed:
            self.listener.dropped(entry.key, Source.HOST)
        if self.evict_hooks:
            view = self.slot_view(entry)
            for hook in self.evict_hooks:
                hook(entry, view)
        self.evictions += 1
        size_class = self._classes[entry.nbytes]
        del size_class.lru[entry.key]
        entry.state = SlotState.RETIRED
        entry.last_use = time.monotonic()
        size_class.retired[entry.key] = entry
