"""The published index's batched paths for the common block (one rank's copies in host memory only), and a save's
publication staged while its bytes are still being copied.

A save's blocks are placed in the table while the GPU copies them (`stage`, on the transport's thread once the copy is
queued): their table slots taken, flags set, but their tag words left empty, so no reader can find them (a probe hits
only on a slot whose word equals the block's tag). Once the bytes are complete, `reveal` writes the tag words: one
store per block between the last byte and the save's notice, instead of the whole placement. A save whose copy failed
takes its staged blocks out again (`unstage`) without a reader ever having seen them. The three calls may race (the
copy can finish before the transport's thread got to `stage`): each takes the index's lock and reads the token's state,
so a token revealed or dropped before it was staged is published the ordinary way, and staging it later does nothing.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvd_client.index import FLAG_HOST

from kvd.memory.index_blocks import IndexBlock, Source
from kvd.memory.index_keys import DigestMemo


class StageState(enum.Enum):
    PENDING = "pending"  # not placed (yet, or at all: several ranks' tokens are published the general way)
    STAGED = "staged"  # placed, invisible
    DONE = "done"  # revealed, or taken out: nothing more to do


@dataclass(eq=False, slots=True)
class Staged:
    """One rank's share of one save in one index. Mutable: its state moves on under the index's lock, from whichever
    thread gets there first."""

    hashes: Sequence[bytes]
    rank: int
    state: StageState = StageState.PENDING
    placed: list[tuple[bytes, int]] = field(default_factory=list)  # (digest, tag word) placed with an empty word
    rest: list[bytes] = field(default_factory=list)  # digests published the general way at `reveal`


class HostBatches:
    """The batched paths of kvd.memory.shm_index.ShmIndex (a mixin: the index holds the state)."""

    _blocks: dict[bytes, IndexBlock | int]
    _owner: dict[int, bytes]
    _stashed: dict[int, bytes]
    _unplaced: set[bytes]
    _flags: memoryview
    _words: memoryview
    _mask: int
    _full: int
    _changes: int
    _closed: bool
    _lock: threading.Lock
    _digests: DigestMemo

    def _rank_bit(self, rank: int) -> int:
        raise NotImplementedError

    def _update_one(self, digest: bytes, bit: int, source: Source, present: bool) -> None:
        raise NotImplementedError

    def _apply(self, hashes: Sequence[bytes], bit: int, source: Source, present: bool) -> None:
        raise NotImplementedError

    def _refill(self) -> None:
        raise NotImplementedError

    def _count_changes(self) -> None:
        raise NotImplementedError

    # -- a save's publication, staged -----------------------------------------------------------------------------

    def stage(self, token: Staged) -> None:
        """Place the token's blocks now, invisible until `reveal` (any thread; the copy of their bytes is queued).
        A token already revealed or dropped, a closed index, or a block outside the common case is left alone: that
        block (or the whole token) is published the ordinary way at `reveal`."""
        with self._lock:
            if token.state is not StageState.PENDING or self._closed or self._rank_bit(token.rank) != self._full:
                return  # (several ranks: each one's copy counts toward publication, the general way, at reveal)
            token.state = StageState.STAGED
            token.rest = self._added(self._digests.arriving(token.hashes), token.placed)
            self._count_changes()

    def reveal(self, token: Staged) -> None:
        """The token's bytes are complete: readers find its blocks from now on (before the save's notice goes out)."""
        with self._lock:
            if token.state is StageState.DONE or self._closed:
                return
            bit = self._rank_bit(token.rank)
            state, token.state = token.state, StageState.DONE
            if state is StageState.PENDING:  # not staged: the copy was faster than its thread, or several ranks
                self._apply(token.hashes, bit, Source.HOST, True)
                return
            blocks, owner, words = self._blocks, self._owner, self._words
            for digest, tag in token.placed:
                held = blocks.get(digest)  # its slot now: a kick since staging may have moved it to its other home
                slot = held if isinstance(held, int) else -1 if held is None else held.slot
                if slot >= 0 and owner.get(slot) == digest:
                    words[slot] = tag
                else:
                    self._update_one(digest, bit, Source.HOST, True)
            for digest in token.rest:
                self._update_one(digest, bit, Source.HOST, True)
            self._changes += len(token.placed)
            self._count_changes()

    def unstage(self, token: Staged) -> None:
        """The token's copy failed: its staged blocks leave the table, never having been visible."""
        with self._lock:
            state, token.state = token.state, StageState.DONE
            if state is not StageState.STAGED or self._closed:
                return
            bit = self._rank_bit(token.rank)
            for digest, _ in token.placed:
                self._update_one(digest, bit, Source.HOST, False)  # its word is empty: clearing it hides nothing
            self._digests.leaving(token.hashes)
            self._count_changes()

    # -- one rank's host copies, batched --------------------------------------------------------------------------

    def _added(self, digests: list[bytes], staged: list[tuple[bytes, int]] | None = None) -> list[bytes]:
        """New blocks in host memory whose home slot is free, published at once (the words of every key unpacked in
        one call), or with `staged`, placed with their tag words left empty and listed there as (digest, tag); the
        rest (known blocks, both homes taken) are returned for the general path."""
        blocks, owner, mask, flags, words = self._blocks, self._owner, self._mask, self._flags, self._words
        unpacked = struct.unpack(f"<{4 * len(digests)}Q", b"".join(digests))
        rest = []
        for digest, first, tag, second in zip(digests, unpacked[0::4], unpacked[1::4], unpacked[2::4], strict=True):
            slot = first & mask
            if slot in owner:
                slot = second & mask
                if slot in owner:
                    rest.append(digest)
                    continue
            if not tag or digest in blocks:
                rest.append(digest)
                continue
            blocks[digest] = slot
            flags[slot] = FLAG_HOST
            if staged is None:
                words[slot] = tag
            else:
                staged.append((digest, tag))
            owner[slot] = digest
        self._changes += len(digests) - len(rest)
        return rest

    def _dropped(self, digests: list[bytes], bit: int) -> list[bytes]:
        """Blocks held only in host memory leave it, unpublished from their table slots; the rest are returned for
        the general path."""
        blocks, owner, flags, words = self._blocks, self._owner, self._flags, self._words
        rest = []
        for digest in digests:
            held = blocks.get(digest)
            if held is None:
                continue  # not held anywhere: nothing to drop (the general path would do the same)
            if isinstance(held, int):
                slot = held
            elif held.slot < 0 or held.masks[0] != bit or held.masks[1] or held.masks[2]:
                rest.append(digest)
                continue
            else:
                slot = held.slot
            words[slot] = 0
            flags[slot] = 0
            del owner[slot]
            del blocks[digest]
            self._changes += 1
            if self._stashed or self._unplaced:
                self._refill()
        return rest
