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
from kvd.memory.slots import Entry, EvictHook, SizeClass, SlotState
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

    def _reuse_retired(self, size_class: SizeClass) -> bool:
        """Free the slot of the oldest retired block (retiring the least recently used one first if none is)."""
        if not size_class.retired and not self._retire_one(size_class):
            return False
        entry = next(iter(size_class.retired.values()))
        if time.monotonic() - entry.last_use < self.grace_s:
            self.grace_cut += 1
        self._release(entry)
        return True

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
        if not full or len(size_class.retired) >= limit:
            return
        wanted = limit - len(size_class.retired)
        victims = list(itertools.islice((e for e in size_class.lru.values() if e.pins == 0), wanted))
        if self.listener is not None and victims:  # out of the index first, all of them in one update
            self.listener.dropped_many([entry.key for entry in victims], Source.HOST)
        for entry in victims:
            self._retire(entry, indexed=False)

    def _retire_one(self, size_class: SizeClass) -> bool:
        for entry in size_class.lru.values():
            if entry.pins == 0:
                self._retire(entry)
                return True
        return False

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
