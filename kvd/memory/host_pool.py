"""L1: the daemon's host-memory pool, allocated once at start and carved into slabs of equal-size block slots.

One anonymous mapping holds every stored block, so the CUDA transport can page-lock it (its `region`) with a single
cudaHostRegister and DMA straight into slots, and the CPU transport can hand slot addresses to process_vm_readv.
Slabs are assigned to a block size on first use (namespaces with different layouts have different block sizes) and
handed back when they empty. Eviction is LRU within a block size; a size with nothing left to evict takes the
least-recently-used slab of another size whole.

Everything here runs on the event-loop thread; copies into and out of slots run elsewhere while the slot is
RESERVED (being written) or pinned (being read), and neither kind of slot is ever evicted.

Eviction is in two steps (retire, then reuse after a grace period): kvd.memory.retire.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path

from kvd.config import HostPoolConfig, human_bytes
from kvd.errors import InvalidArgument, ResourceExhausted, StartupError
from kvd.memory.index_registry import BlockListener, StagedSave
from kvd.memory.placement import Placer
from kvd.memory.region import PinnedRegion, node_cpus
from kvd.memory.retire import Retiring
from kvd.memory.shm_index import Source
from kvd.memory.slots import Entry, EvictHook, SizeClass, Slab, SlotState
from kvd.types import BlockKey

__all__ = ["Entry", "EvictHook", "HostPool", "SlotState"]

log = logging.getLogger(__name__)


class HostPool(Retiring):
    """Fixed-capacity block storage in one host mapping."""

    def __init__(self, config: HostPoolConfig) -> None:
        self.slab_bytes = config.slab_bytes
        self.capacity_bytes = config.usable_bytes  # whole slabs (the configuration keeps it at least one)
        self.num_slabs = self.capacity_bytes // self.slab_bytes
        if self.capacity_bytes != config.capacity_bytes:
            log.warning(
                "host pool: %s is not a whole number of %s slabs; using %s",
                human_bytes(config.capacity_bytes),
                human_bytes(self.slab_bytes),
                human_bytes(self.capacity_bytes),
            )
        self._map = _map_anonymous(self.capacity_bytes)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)  # fewer TLB misses and faster first touch for a large pool
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.base_address = ctypes.addressof(self._anchor)
        self.view = memoryview(self._map)
        self._closed = False
        self._populate_threads = config.populate_threads
        self._numa_node = config.numa_node
        self._slabs = [Slab(i) for i in range(self.num_slabs)]
        self._free_slabs = list(range(self.num_slabs - 1, -1, -1))
        self._placer = Placer(self._slabs, self._free_slabs, self.slab_bytes)
        self._classes: dict[int, SizeClass] = {}
        self._entries: dict[BlockKey, Entry] = {}
        self.used_bytes = 0
        self.evictions = 0
        self.grace_s = config.reuse_grace_ms / 1000
        self.grace_cut = 0  # slots reused before their block's grace period was over
        self.evict_hooks: list[EvictHook] = []
        self.listener: BlockListener | None = None  # the published index: told of each block in and out

    @property
    def region(self) -> PinnedRegion:
        """The whole mapping, for transports that page-lock it."""
        return PinnedRegion(self.base_address, self.capacity_bytes)

    def populate(self) -> None:
        """Touch every page once, in parallel, so the first saves do not pay for page faults (slow for GiBs)."""
        start = time.monotonic()
        chunk = max(self.slab_bytes, self.capacity_bytes // (self._populate_threads * 4))
        offsets = range(0, self.capacity_bytes, chunk)

        def touch(offset: int) -> None:
            ctypes.memset(self.base_address + offset, 0, min(chunk, self.capacity_bytes - offset))

        cpus = self._node_cpus()

        def pin() -> None:  # first touch places each page on the node of the CPU that touches it
            if cpus:
                os.sched_setaffinity(0, cpus)

        with ThreadPoolExecutor(self._populate_threads, "kvd-populate", initializer=pin) as pool:
            list(pool.map(touch, offsets))
        where = f" on NUMA node {self._numa_node}" if cpus else ""
        seconds = time.monotonic() - start
        log.info("host pool: %s populated%s in %.2f s", human_bytes(self.capacity_bytes), where, seconds)

    def _node_cpus(self) -> set[int]:
        """The CPUs to first-touch the pool from (host_pool.numa_node), those this process may run on; empty: any."""
        if self._numa_node < 0:
            return set()
        cpus = node_cpus(self._numa_node) & os.sched_getaffinity(0)
        if not cpus:
            log.warning("host_pool.numa_node %d: no CPUs there this daemon may use: pool anywhere", self._numa_node)
        return cpus

    def close(self) -> None:
        self._closed = True  # a retire_ahead still scheduled on the loop finds nothing to do
        self.view.release()
        del self._anchor
        self._map.close()

    # -- lookups -------------------------------------------------------------------------------------------------

    def get(self, key: BlockKey) -> Entry | None:
        """The READY entry for `key`, or None."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not SlotState.READY:
            return None
        return entry

    def holds_none(self, keys: Sequence[BlockKey]) -> bool:
        """Whether none of `keys` has an entry in any state (one set operation for a whole request)."""
        return self._entries.keys().isdisjoint(keys)

    def __contains__(self, key: BlockKey) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self._entries)

    def touch_prefix(self, keys: Sequence[BlockKey]) -> int:
        """How many leading keys are stored (READY), marking each of them used: one pass, one clock read (this is
        the lookup hot path: a thousand keys per call)."""
        now = time.monotonic()
        entries, slabs, classes = self._entries, self._slabs, self._classes
        ready = SlotState.READY
        n = 0
        for key in keys:
            entry = entries.get(key)
            if entry is None or entry.state is not ready:
                break
            entry.last_use = now
            slabs[entry.slab].last_use = now
            classes[entry.nbytes].lru.move_to_end(key)
            n += 1
        return n

    def pin_stored(self, keys: Sequence[BlockKey]) -> list[Entry | None]:
        """For a load: each key's READY entry pinned (never evicted while read) and marked used, or None where the
        key is not stored; a RETIRED one is taken back first (its bytes are still there: the lookup that found it was
        right). One pass and one clock read for the whole request."""
        now = time.monotonic()
        entries, slabs, classes = self._entries, self._slabs, self._classes
        ready, retired = SlotState.READY, SlotState.RETIRED
        out: list[Entry | None] = []
        for key in keys:
            entry = entries.get(key)
            if entry is not None and entry.state is retired:
                entry = self.reclaim(key)
            if entry is None or entry.state is not ready:
                out.append(None)
                continue
            entry.pins += 1
            entry.last_use = now
            slabs[entry.slab].last_use = now
            classes[entry.nbytes].lru.move_to_end(key)
            out.append(entry)
        return out

    def resident(self, namespace_key: str) -> list[bytes]:
        """The hashes of `namespace_key`'s READY blocks."""
        return [k[1] for k, e in self._entries.items() if k[0] == namespace_key and e.state is SlotState.READY]

    def touch(self, entry: Entry) -> None:
        entry.last_use = time.monotonic()
        self._slabs[entry.slab].last_use = entry.last_use
        lru = self._classes[entry.nbytes].lru
        if entry.key in lru:
            lru.move_to_end(entry.key)

    def slot_view(self, entry: Entry) -> memoryview:
        offset = entry.address - self.base_address
        return self.view[offset : offset + entry.nbytes]

    # -- writes --------------------------------------------------------------------------------------------------

    def reserve(self, key: BlockKey, nbytes: int) -> Entry:
        """A RESERVED slot for `key` (which must not be stored); evicts LRU blocks if the pool is full."""
        entries = self.reserve_many([key], nbytes)
        if not entries:
            raise ResourceExhausted("host pool is full and every block in it is in use")
        return entries[0]

    def reserve_many(
        self, keys: Sequence[BlockKey], nbytes: int, *, checked: bool = False, retire_ahead: bool = True
    ) -> list[Entry]:
        """RESERVED slots for `keys` (distinct, none of them stored), in order, evicting LRU blocks as needed; fewer
        than asked when the pool has no room left (every other block in use): the first len(result) keys got theirs.
        One call per request, not per block: a large save reserves hundreds, as runs of consecutive slots where the
        free space allows (kvd.memory.placement). `checked`: the caller found the keys distinct and none of them
        held (HostStore.prepare_save's fast path), so they are not checked twice. `retire_ahead=False`: the caller
        calls `retire_ahead` itself, later (HostStore: once the save is committed, off that save's path)."""
        if nbytes <= 0 or nbytes > self.slab_bytes:
            raise InvalidArgument(f"a block of {nbytes} bytes does not fit a {self.slab_bytes}-byte slab")
        entries, slabs = self._entries, self._slabs
        if not checked:
            if not self.holds_none(keys):
                self._release_retired(keys)
            if len(set(keys)) != len(keys):
                raise InvalidArgument("block is already stored or being stored")
        size_class = self._classes.setdefault(nbytes, SizeClass(nbytes))
        places = self._placer.take(size_class, self._make_room(size_class, len(keys)))
        now, base, slab_bytes, reserved = time.monotonic(), self.base_address, self.slab_bytes, SlotState.RESERVED
        out = [  # Entry's fields positionally: a third cheaper than by keyword, for hundreds of blocks
            Entry(key, slab, slot, base + slab * slab_bytes + slot * nbytes, nbytes, reserved, 0, now)
            for key, (slab, slot) in zip(keys, places, strict=False)
        ]
        entries.update((entry.key, entry) for entry in out)
        for slab_index, taken in Counter(map(itemgetter(0), places)).items():  # per slab, not per block
            slab = slabs[slab_index]
            slab.entries += taken
            slab.last_use = now
        self.used_bytes += nbytes * len(out)
        if out and retire_ahead:
            self._retire_ahead(size_class, len(out))
        return out

    def retire_ahead(self, nbytes: int, reserved: int) -> None:
        """The upkeep after `reserved` slots of `nbytes` were reserved with `reserve_many(..., retire_ahead=False)`:
        while that size class is full, keep blocks retired ahead of need (kvd.memory.retire)."""
        size_class = self._classes.get(nbytes)
        if size_class is not None and reserved > 0 and not self._closed:
            self._retire_ahead(size_class, reserved)

    def _release_retired(self, keys: Sequence[BlockKey]) -> None:
        """New bytes for retired blocks: their old slots are not needed. A key stored or being stored is refused."""
        for key in keys:
            old = self._entries.get(key)
            if old is None:
                continue
            if old.state is not SlotState.RETIRED or old.pins:
                raise InvalidArgument("block is already stored or being stored")
            self._release(old)

    def _make_room(self, size_class: SizeClass, count: int) -> int:
        """Free slots until `count` fit (retiring and reusing LRU blocks of this size, then emptying another size's
        slab); how many fit."""
        per_slab = self.slab_bytes // size_class.block_bytes
        short = count - size_class.free - len(self._free_slabs) * per_slab
        if short > 0:
            short -= self._reuse_retired_many(size_class, short)
        while short > 0 and self._evict_slab(exclude=size_class.block_bytes):
            short -= per_slab
        return count - max(short, 0)

    def commit(self, entry: Entry) -> None:
        """The slot's bytes are complete: make it visible to lookups."""
        entry.state = SlotState.READY
        entry.last_use = time.monotonic()
        self._classes[entry.nbytes].lru[entry.key] = entry
        if self.listener is not None:  # before the save's notice goes out: read-your-writes through the index
            self.listener.stored(entry.key, Source.HOST)

    def staging(self, keys: Sequence[BlockKey]) -> StagedSave | None:
        """The index publication of a save of `keys` (reserved), to stage while its bytes are copied; commit_many
        reveals it."""
        return self.listener.staging(keys) if self.listener is not None and keys else None

    def commit_many(self, entries: Sequence[Entry], staged: StagedSave | None = None) -> None:
        """`commit` for a whole save: one clock read, one index update (`staged`: the save's publication, staged
        during its copy, only revealed now)."""
        now, ready, classes = time.monotonic(), SlotState.READY, self._classes
        for entry in entries:
            entry.state = ready
            entry.last_use = now
            classes[entry.nbytes].lru[entry.key] = entry
        if staged is not None:  # before the save's notice goes out: read-your-writes
            staged.reveal()
        elif self.listener is not None and entries:
            self.listener.stored_many([entry.key for entry in entries], Source.HOST)

    def discard(self, entry: Entry) -> None:
        """Forget an entry (an aborted save, a failed verification, an explicit delete) and free its slot."""
        if self._entries.get(entry.key) is not entry:
            return
        if entry.pins:
            raise InvalidArgument("cannot discard a block that is being read")
        self._release(entry)

    def pin(self, entry: Entry) -> None:
        entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        entry.pins -= 1

    # -- internals -----------------------------------------------------------------------------------------------

    def _slot_address(self, slab: int, slot: int, nbytes: int) -> int:
        return self.base_address + slab * self.slab_bytes + slot * nbytes

    def _release(self, entry: Entry) -> None:
        if self.listener is not None and entry.state is SlotState.READY:
            self.listener.dropped(entry.key, Source.HOST)  # out of the index before the slot can be reused
        del self._entries[entry.key]
        size_class = self._classes[entry.nbytes]
        size_class.lru.pop(entry.key, None)
        size_class.retired.pop(entry.key, None)
        entry.state = SlotState.FREED
        slab = self._slabs[entry.slab]
        free = slab.free_slots
        if free and entry.slot > free[-1]:
            slab.sorted = False
        free.append(entry.slot)
        slab.entries -= 1
        self.used_bytes -= entry.nbytes
        size_class.free += 1
        self._settle_slab(size_class, slab)

    def _evict_slab(self, exclude: int) -> bool:
        """Empty the least-recently-used slab of another block size whose blocks are all evictable."""
        candidates = []
        for slab in self._slabs:
            if slab.block_bytes in (0, exclude):
                continue
            size_class = self._classes[slab.block_bytes]
            held = [e for e in (*size_class.lru.values(), *size_class.retired.values()) if e.slab == slab.index]
            if len(held) == slab.entries and all(e.pins == 0 for e in held):
                candidates.append((slab, held))
        if not candidates:
            return False
        _, victims = min(candidates, key=lambda c: c[0].last_use)
        for entry in victims:
            if entry.state is SlotState.READY:
                self._retire(entry)
            self._release(entry)
        return True


_LOWER = "lower --capacity (host_pool.capacity_bytes)"


def _map_anonymous(nbytes: int) -> mmap.mmap:
    """The pool's one mapping. A size this machine (or this container) cannot hold is refused before the mapping: with
    overcommit the mmap itself may succeed, and the first touch of every page would bring the OOM killer instead."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_memory_limit()
    if nbytes > total or (limit is not None and nbytes > limit):
        where = f"this machine's {human_bytes(total)} of memory"
        if limit is not None and limit < total:
            where = f"this container's memory limit of {human_bytes(limit)}"
        raise StartupError(f"a host pool of {human_bytes(nbytes)} does not fit {where}: {_LOWER}")
    try:
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        raise StartupError(
            f"cannot map a host pool of {human_bytes(nbytes)}: {exc.strerror}; {_LOWER}, or raise this process's "
            "memory limits (ulimit -v, LimitAS=)"
        ) from exc


def _cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes (v2 memory.max, v1 memory.limit_in_bytes), None if unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "no limit" with a huge number, v2 with "max"
            return int(text)
    return None
