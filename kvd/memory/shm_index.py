"""The daemon's side of the published block index: a sealed memfd that clients map read-only and probe in-process.

The layout and the reader live in kvd_client.index (clients need them without the daemon). Here: creating and
sealing the file, and keeping it equal to the store's contents. The store calls `add` once a rank's copy of a block
is complete in a local tier (before the save's completion notice goes out: read-your-writes) and `discard` before
the copy's slot may be reused. A block is published once every tensor-parallel rank has it in some local tier. A save
into host memory may place its blocks while their bytes are still being copied, invisible until revealed
(kvd.memory.index_batches: `stage`, `reveal`, `unstage`), so little of the publication is left after the copy.

One writer: every mutation takes `_lock`, and only this object writes the mapping. Slot words and flags are written
with single stores; relocations (cuckoo kicks) are bracketed by the `relocations` header counter so readers retry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence

from kvd_client.index import (
    FLAG_HOST,
    HEADER_BYTES,
    MAX_TP_WORLD_SIZE,
    STASH_SLOTS,
    STASH_USED,
    STATE_LIVE,
    STATE_RETIRED,
    W_COLD,
    W_DAEMON_FLAGS,
    W_ENTRIES,
    W_GENERATION,
    W_MAX_LOOKUP,
    W_OVERFLOWS,
    W_RELOCATIONS,
    W_STASHED,
    W_STATE,
    IndexHeader,
    digest_words,
    label_of,
    layout_for,
    stash_entry_offset,
)

from kvd.errors import InvalidArgument, Unavailable
from kvd.memory.index_batches import HostBatches, Staged
from kvd.memory.index_blocks import DEFAULT_MAX_BYTES, MIN_SLOTS, SLOTS_PER_BLOCK, Source, slots_for
from kvd.memory.index_blocks import IndexBlock as _Block
from kvd.memory.index_keys import DigestMemo, find_path, stash_state_word
from kvd.memory.sealed import create_sealed_memfd

log = logging.getLogger(__name__)

RETRY_UNPLACED = 8  # unpublished blocks tried for each slot that frees up

__all__ = ["DEFAULT_MAX_BYTES", "MIN_SLOTS", "ShmIndex", "Source", "Staged", "slots_for"]


class ShmIndex(HostBatches):
    """One namespace group's published index."""

    def __init__(
        self,
        *,
        capacity_blocks: int,
        tp_world_size: int,
        boot_id: str,
        group_key: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        daemon_flags: int = 0,
        max_lookup_blocks: int = 1 << 16,
    ) -> None:
        if not 1 <= tp_world_size <= MAX_TP_WORLD_SIZE:
            raise InvalidArgument(f"an index covers 1..{MAX_TP_WORLD_SIZE} tensor-parallel ranks, not {tp_world_size}")
        self.slots = slots_for(capacity_blocks, max_bytes)
        words_offset, flags_offset, total = layout_for(self.slots)
        self.header = IndexHeader(self.slots, words_offset, flags_offset, tp_world_size, boot_id, label_of(group_key))
        self.group_key = group_key
        self._fd, self._map = create_sealed_memfd("kvd-index", total)
        packed = self.header.pack()
        self._map[: len(packed)] = packed
        view = memoryview(self._map)
        self._hdr = view[:HEADER_BYTES].cast("Q")
        self._words = view[words_offset : words_offset + 8 * self.slots].cast("Q")
        self._flags = view[flags_offset : flags_offset + self.slots]
        self._view = view
        self._hdr[W_DAEMON_FLAGS] = daemon_flags
        self._hdr[W_MAX_LOOKUP] = max_lookup_blocks
        self._hdr[W_STATE] = STATE_LIVE
        self._mask = self.slots - 1
        self._full = (1 << tp_world_size) - 1
        # digest -> its record; a bare int for the common block (every rank's copy in host memory only, published in
        # that table slot): no record object to build and free per block of a large save
        self._blocks: dict[bytes, _Block | int] = {}
        self._owner: dict[int, bytes] = {}  # slot -> digest published there
        self._stashed: dict[int, bytes] = {}  # stash entry -> digest published there
        self._unplaced: set[bytes] = set()  # complete blocks that found no slot (published once one frees up)
        self._digests = DigestMemo(limit=2 * self.slots)
        self._lock = threading.Lock()
        self._closed = False
        self._changes = 0  # changes of the update under way, counted in the header once it is done
        if capacity_blocks * SLOTS_PER_BLOCK > self.slots:
            log.warning(
                "index %r: %d slots for up to %d blocks (capped at %d bytes)",
                group_key,
                self.slots,
                capacity_blocks,
                max_bytes,
            )

    # -- for clients -----------------------------------------------------------------------------------------------

    def open_reader_fd(self) -> int:
        """A new fd on the index to pass to a client (SCM_RIGHTS). Opened read-only where /proc allows; the seals
        keep the file read-only for every other holder either way. The caller closes it once sent."""
        if self._closed:
            raise Unavailable("index is closed")
        try:
            return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return os.dup(self._fd)

    # -- the store's notices ---------------------------------------------------------------------------------------

    def add(self, block_hash: bytes, rank: int, source: Source) -> None:
        """Rank `rank`'s copy of the block is complete in `source`."""
        self.add_many((block_hash,), rank, source)

    def discard(self, block_hash: bytes, rank: int, source: Source) -> None:
        """Rank `rank`'s copy of the block leaves `source` (call before its slot may be reused)."""
        self.discard_many((block_hash,), rank, source)

    def add_many(self, block_hashes: Iterable[bytes], rank: int, source: Source) -> None:
        self._update(block_hashes, rank, source, present=True)

    def discard_many(self, block_hashes: Iterable[bytes], rank: int, source: Source) -> None:
        self._update(block_hashes, rank, source, present=False)

    def _update(self, block_hashes: Iterable[bytes], rank: int, source: Source, *, present: bool) -> None:
        bit = self._rank_bit(rank)
        hashes = block_hashes if isinstance(block_hashes, Sequence) else list(block_hashes)
        with self._lock:
            self._apply(hashes, bit, source, present)

    def _apply(self, hashes: Sequence[bytes], bit: int, source: Source, present: bool) -> None:
        """`_update` under the lock."""
        digests = self._digests.arriving(hashes) if present else self._digests.leaving(hashes)
        if bit == self._full and source is Source.HOST:  # one rank's host copies: the common case, batched
            digests = self._added(digests) if present else self._dropped(digests, bit)
        for digest in digests:
            self._update_one(digest, bit, source, present)
        self._count_changes()

    def _update_one(self, digest: bytes, bit: int, source: Source, present: bool) -> None:
        blocks = self._blocks
        block = blocks.get(digest)
        if block is None:
            if not present:
                return
            block = blocks[digest] = _Block([0, 0, 0])
        elif isinstance(block, int):
            block = blocks[digest] = _Block([self._full, 0, 0], block)
        masks = block.masks
        was_cold = self._cold(block)
        masks[source] = masks[source] | bit if present else masks[source] & ~bit
        self._publish(digest, block)
        if (cold := self._cold(block)) != was_cold:  # a header store only when it changes
            self._hdr[W_COLD] += cold - was_cold
        if not any(masks):
            del blocks[digest]

    def _cold(self, block: _Block) -> int:
        """1 if the block is published with some rank's copy outside host memory."""
        return int(block.published and block.masks[Source.HOST] != self._full)

    # -- lifecycle and stats ---------------------------------------------------------------------------------------

    def retire(self) -> None:
        """Tell every mapped reader to stop answering from this index (they ask the daemon again)."""
        with self._lock:
            if not self._closed:
                self._hdr[W_STATE] = STATE_RETIRED

    def close(self) -> None:
        """Retire, unmap and close. Readers keep their (retired) mappings until they drop them."""
        self.retire()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for view in (self._hdr, self._words, self._flags, self._view):
                view.release()
            self._map.close()
            os.close(self._fd)

    @property
    def entries(self) -> int:
        return len(self._owner) + len(self._stashed)

    @property
    def unplaced(self) -> int:
        return len(self._unplaced)

    def counters(self) -> dict[str, int]:
        if self._closed:
            return {}
        return {
            "entries": self.entries,
            "stashed": len(self._stashed),
            "unplaced": len(self._unplaced),
            "overflows": int(self._hdr[W_OVERFLOWS]),
            "relocations": int(self._hdr[W_RELOCATIONS]) // 2,
            "generation": int(self._hdr[W_GENERATION]),
        }

    # -- internals -------------------------------------------------------------------------------------------------

    def _rank_bit(self, rank: int) -> int:
        if not 0 <= rank < self.header.tp_world_size:
            raise InvalidArgument(f"rank {rank} outside the index's {self.header.tp_world_size} ranks")
        if self._closed:
            raise Unavailable("index is closed")
        return 1 << rank

    def _publish(self, digest: bytes, block: _Block) -> None:
        """Bring the mapping in line with `block`: published iff every rank has it in some local tier."""
        masks = block.masks
        present = (masks[0] | masks[1] | masks[2]) == self._full
        if present and not block.published:
            self._place(digest, block)
        elif not present and block.published:
            self._unpublish(block)
            self._refill()
        elif block.slot >= 0:
            self._flags[block.slot] = self._flag(block)
        elif block.stash >= 0:
            self._hdr[stash_state_word(block.stash)] = STASH_USED | self._flag(block)
        elif not present:
            self._unplaced.discard(digest)

    def _flag(self, block: _Block) -> int:
        return FLAG_HOST if block.masks[Source.HOST] == self._full else 0

    def _place(self, digest: bytes, block: _Block) -> bool:
        """Publish a block in the table (kicking others along a path to a free slot), else in the stash."""
        path = find_path(digest, self._owner, self._mask)
        if path is not None:
            self._insert_along(path, digest, block)
        elif len(self._stashed) < STASH_SLOTS:
            self._stash(digest, block)
        elif digest not in self._unplaced:
            self._unplaced.add(digest)
            self._hdr[W_OVERFLOWS] += 1
            return False
        else:
            return False
        self._unplaced.discard(digest)
        return True

    @contextlib.contextmanager
    def _relocating(self, moving: bool = True) -> Iterator[None]:
        """Odd relocation counter while blocks move or the stash changes: readers retry probes that overlap."""
        if moving:
            self._hdr[W_RELOCATIONS] += 1
        try:
            yield
        finally:
            if moving:
                self._hdr[W_RELOCATIONS] += 1

    def _insert_along(self, path: list[int], digest: bytes, block: _Block) -> None:
        if len(path) > 1:  # most inserts find a home free: no relocation to announce
            with self._relocating():
                for i in range(len(path) - 2, -1, -1):
                    self._move(path[i], path[i + 1])
        self._write(path[0], digest, block)

    def _move(self, src: int, dst: int) -> None:
        """Copy the block in `src` to `dst` (its other home); `src` keeps it until the next write overwrites it, so
        a reader always finds it in one of the two."""
        digest = self._owner[src]
        self._flags[dst] = self._flags[src]
        self._words[dst] = self._words[src]
        self._owner[dst] = digest
        block = self._blocks[digest]
        if isinstance(block, int):
            self._blocks[digest] = dst
        else:
            block.slot = dst

    def _write(self, slot: int, digest: bytes, block: _Block) -> None:
        self._flags[slot] = self._flag(block)
        self._words[slot] = digest_words(digest)[1]
        self._owner[slot] = digest
        block.slot = slot
        self._changed()

    def _stash(self, digest: bytes, block: _Block) -> None:
        entry = next(i for i in range(STASH_SLOTS) if i not in self._stashed)
        offset = stash_entry_offset(entry)
        with self._relocating():
            self._view[offset : offset + len(digest)] = digest
            self._hdr[stash_state_word(entry)] = STASH_USED | self._flag(block)
        self._stashed[entry] = digest
        block.stash = entry
        self._changed()

    def _unpublish(self, block: _Block) -> None:
        if block.slot >= 0:
            self._words[block.slot] = 0
            self._flags[block.slot] = 0
            del self._owner[block.slot]
            block.slot = -1
        else:
            with self._relocating():
                self._hdr[stash_state_word(block.stash)] = 0
            del self._stashed[block.stash]
            block.stash = -1
        self._changed()

    def _refill(self) -> None:
        """A slot freed: move stashed blocks into the table, then publish blocks that found no place at all."""
        for entry, digest in list(self._stashed.items()):
            path = find_path(digest, self._owner, self._mask)
            if path is None:
                continue
            block = self._record(digest)
            self._insert_along(path, digest, block)  # in the table first, then out of the stash: never absent
            with self._relocating():
                self._hdr[stash_state_word(entry)] = 0
            del self._stashed[entry]
            block.stash = -1
            self._changed()
        for digest in list(self._unplaced)[:RETRY_UNPLACED]:
            self._place(digest, self._record(digest))

    def _record(self, digest: bytes) -> _Block:
        """The block's full record (a stashed or unplaced block has one already; a bare slot becomes one)."""
        block = self._blocks[digest]
        if isinstance(block, int):
            block = self._blocks[digest] = _Block([self._full, 0, 0], block)
        return block

    def _changed(self) -> None:
        self._changes += 1

    def _count_changes(self) -> None:
        """The header's counts, once per update (a whole save's blocks), not once per block: they are statistics
        and a hint (W_STASHED: whether probes look in the stash), and a block of an update under way is not
        promised to anyone yet (its save's notice goes out after the update)."""
        if self._changes:
            self._hdr[W_ENTRIES] = len(self._owner) + len(self._stashed)
            self._hdr[W_STASHED] = len(self._stashed)
            self._hdr[W_GENERATION] += self._changes
            self._changes = 0
