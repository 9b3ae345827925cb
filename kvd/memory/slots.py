"""The host pool's bookkeeping records: a stored block (Entry), a slab, and a block size's slabs and LRU order."""

from __future__ import annotations

import enum
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvd.types import BlockKey


class SlotState(enum.Enum):
    RESERVED = "reserved"  # a save is writing it; invisible to lookups
    READY = "ready"
    RETIRED = "retired"  # evicted from lookups and the index; bytes kept until its grace period is over
    FREED = "freed"  # its slot went back to the pool (an Entry object kept elsewhere is stale)


@dataclass(eq=False, slots=True)
class Entry:
    """One stored block. Mutable bookkeeping, owned by the pool (identity-compared)."""

    key: BlockKey
    slab: int
    slot: int
    address: int
    nbytes: int
    state: SlotState = SlotState.RESERVED
    pins: int = 0
    last_use: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class Slab:
    index: int
    block_bytes: int = 0  # 0: free slab
    free_slots: list[int] = field(default_factory=list)  # descending when `sorted`: the lowest is taken first
    sorted: bool = True
    entries: int = 0
    last_use: float = 0.0


@dataclass(slots=True)
class SizeClass:
    block_bytes: int
    slabs: set[int] = field(default_factory=set)
    # Its slabs with a free slot, oldest first (a dict as an ordered set): a reservation takes a slot in O(1)
    # instead of scanning every slab of the size (a 512-block save into a full 4 GiB pool scanned 64 slabs per block,
    # twice, milliseconds per request).
    open: dict[int, None] = field(default_factory=dict)
    free: int = 0  # free slots in its slabs (those in `open`): whether a request fits without evicting
    lru: OrderedDict[BlockKey, Entry] = field(default_factory=OrderedDict)  # READY entries, oldest first
    retired: OrderedDict[BlockKey, Entry] = field(default_factory=OrderedDict)  # oldest retirement first
    reserves: deque[float] = field(default_factory=deque)  # recent reserve times (how many to retire ahead)


EvictHook = Callable[[Entry, memoryview], None]
