"""The keys the published index files blocks under, and where in its table a key may live.

A block's index key (its digest: the hash itself when it is 32 bytes, else blake2b of it; kvd_client.index) is
computed when a copy of it is published and remembered until that copy is dropped, so the drop (a large save retires
hundreds of blocks ahead of need) looks it up instead of hashing again. The memo holds values of a pure function:
an entry missing (or left behind) costs one hash again, never a wrong key.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from kvd_client.index import DIGEST_BYTES, digest_words, index_digest, stash_entry_offset

MAX_PATH_VISITS = 512  # breadth-first search for a free slot through kicks; beyond it a block stays unpublished


class DigestMemo:
    """Block hash -> index key, for the blocks published now (bounded: cleared when it outgrows `limit`)."""

    def __init__(self, limit: int) -> None:
        self._memo: dict[bytes, bytes] = {}
        self._limit = limit

    def arriving(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The keys of blocks a copy of which arrives (remembered). Raises ValueError for a malformed hash."""
        memo = self._memo
        if len(memo) + len(hashes) > self._limit:
            memo.clear()  # blocks that left without being dropped through here (never expected): start over
        out = []
        for block_hash in hashes:
            digest = memo.get(block_hash)
            if digest is None:
                digest = index_digest(block_hash)
                if len(block_hash) != DIGEST_BYTES:  # a 32-byte hash is its own key: nothing to remember
                    memo[block_hash] = digest
            out.append(digest)
        return out

    def leaving(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The keys of blocks a copy of which leaves (forgotten: another copy's drop hashes again, rarely)."""
        pop = self._memo.pop
        return [pop(block_hash, b"") or index_digest(block_hash) for block_hash in hashes]

    def __len__(self) -> int:
        return len(self._memo)


def find_path(digest: bytes, owner: dict[int, bytes], mask: int) -> list[int] | None:
    """Slots [s0, ..., sk]: s0 is one of the block's two homes, sk is free (not in `owner`), and the block in each
    s_i (i < k) may move to s_{i+1}, its other home. Breadth-first, so the fewest kicks; None: no path found."""
    first, tag, second = digest_words(digest)
    if tag == 0:
        return None  # tag 0 marks an empty slot: such a block (2^-64 of them) goes to the stash
    starts = [first & mask, second & mask]
    for home in starts:  # most blocks find a home free: what the search below would return first
        if home not in owner:
            return [home]
    parent: dict[int, int | None] = dict.fromkeys(starts)
    queue = collections.deque(dict.fromkeys(starts))
    while queue and len(parent) <= MAX_PATH_VISITS:
        slot = queue.popleft()
        occupant = owner.get(slot)
        if occupant is None:
            path = [slot]
            while (previous := parent[path[-1]]) is not None:
                path.append(previous)
            return path[::-1]
        home_a, _, home_b = digest_words(occupant)
        other = (home_b if home_a & mask == slot else home_a) & mask
        if other not in parent:
            parent[other] = slot
            queue.append(other)
    return None


def stash_state_word(entry: int) -> int:
    """The header word (8-byte units) holding stash entry `entry`'s state, after its digest."""
    return (stash_entry_offset(entry) + DIGEST_BYTES) // 8
