"""Admission by reuse for the disk tier: which blocks leaving L1 are worth writing to disk.

Writing every evicted block down makes a disk smaller than the working set rewrite itself at the rate blocks leave
L1 (one request's private blocks, never read again, included). Under `tiers.disk_admission = "reused"` (or
"reused_only") a block shows reuse when it was hit (a lookup found it in L1, or a load read it) while in L1, or when
it is leaving L1 for the second time, recently (a bounded set remembers the keys turned away; a block saved again
after that was reused after all, just later than L1 could keep it). Which blocks then go where is the write-back's
decision (kvd.tiers.writeback).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvd.types import BlockKey

GHOST_KEYS = 1 << 16  # keys turned away remembered (about 200 bytes each)
MAX_HIT_KEYS = 1 << 20  # hit keys kept for blocks still in L1; past this, the oldest half is forgotten


class ReuseFilter:
    def __init__(self, ghost_keys: int = GHOST_KEYS) -> None:
        self.ghost_keys = ghost_keys
        self._hit: dict[BlockKey, None] = {}  # L1 blocks hit since they were stored, oldest first
        self._ghosts: OrderedDict[BlockKey, None] = OrderedDict()

    def hit(self, keys: Iterable[BlockKey]) -> None:
        for key in keys:
            self._hit[key] = None
        if len(self._hit) > MAX_HIT_KEYS:
            for key in list(self._hit)[: MAX_HIT_KEYS // 2]:
                del self._hit[key]

    def reused(self, key: BlockKey) -> bool:
        return key in self._hit or key in self._ghosts

    def left(self, key: BlockKey, written: bool) -> None:
        """`key` left L1; `written`: it went to disk (or is already there). Turned-away keys are remembered."""
        self._hit.pop(key, None)
        if written:
            self._ghosts.pop(key, None)
            return
        self._ghosts[key] = None
        self._ghosts.move_to_end(key)
        while len(self._ghosts) > self.ghost_keys:
            self._ghosts.popitem(last=False)
