"""The published index's bookkeeping records and sizing (kvd.memory.shm_index keeps the table itself)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvd_client.index import layout_for

SLOTS_PER_BLOCK = 4  # load factor 1/4: two-choice cuckoo placement almost never needs a kick at this load
MIN_SLOTS = 64
DEFAULT_MAX_BYTES = 256 << 20


def slots_for(capacity_blocks: int, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Slots for an index of up to `capacity_blocks` blocks: a power of two at least 4 per block, but no file over
    `max_bytes` (then the index holds fewer blocks than the tiers: the rest read as absent)."""
    want = max(MIN_SLOTS, capacity_blocks * SLOTS_PER_BLOCK)
    slots = 1 << (want - 1).bit_length()
    while slots > MIN_SLOTS and layout_for(slots)[2] > max_bytes:
        slots >>= 1
    return slots


class Source(enum.IntEnum):
    """Where a rank's copy of a block is held locally (each may hold one; any of them makes it loadable)."""

    HOST = 0  # the host pool (L1): loadable without a fetch, the only source in-step loads read
    QUEUED = 1  # evicted from L1 and queued for a lower tier, bytes still in the daemon's memory
    DISK = 2  # the disk tier


@dataclass(slots=True)
class IndexBlock:
    masks: list[int] = field(default_factory=lambda: [0, 0, 0])  # per Source: bit r = rank r's copy is there
    slot: int = -1  # published in this table slot; -1: not in the table
    stash: int = -1  # published in this stash entry; -1: not in the stash

    @property
    def published(self) -> bool:
        return self.slot >= 0 or self.stash >= 0
