"""The daemon's published block index: its shared-memory layout and the in-process reader.

The daemon publishes which blocks its local tiers (host pool, disk) hold, one index per namespace group (model,
layout fingerprint, tensor-parallel world size; tenant once tenants exist), in a sealed memfd that clients map
read-only. A lookup then costs no round trip: a few microseconds of probing in the caller's thread.

Layout (little-endian, one file):

    [0, 4096)                 header: static fields (`_STATIC`), then live 64-bit words from offset 128
    [4096, 4096 + 8·slots)    slot words: 0 = empty, else the tag (word 1 of the block's digest)
    [flags, flags + slots)    one byte per slot: bit 0 set = every rank's copy is in host memory

A block's digest is its hash when that is 32 bytes (kvd's hashes are blake2b), else blake2b of it. Words 0 and 2
of the digest pick the block's two candidate slots (cuckoo hashing, `& (slots - 1)`), word 1 is its tag. A block
is present iff one of its two slots holds its tag. Every slot is one aligned 64-bit word, written with one store,
so a reader never sees half a word; the daemon only relocates a block (cuckoo kicks) between `relocations`
increments (odd while moving), and a reader that saw the counter change probes again. A block for which no slot
can be freed goes to a small stash (whole digests), changed under the same counter. See docs/design.md for why this
layout and its false-positive/negative cases.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvd_client.hash_run import HASH_BYTES, HashRun

_np: Any
try:  # vLLM always has numpy; kvd-client itself does not depend on it
    import numpy

    _np = numpy
except ImportError:  # the pure-Python probe (tests run it through use_numpy=False)
    _np = None

MAGIC = b"KVDIDX\x00\x01"
VERSION = 1
HEADER_BYTES = 4096
DIGEST_BYTES = HASH_BYTES
MAX_HASH_BYTES = 64  # the daemon refuses longer (and empty) hashes; so does the index
MAX_TP_WORLD_SIZE = 32  # one bit per rank in the daemon's bookkeeping
FLAG_HOST = 1

# Static header: magic, version, header bytes, slots, words offset, flags offset, tp world size, boot id, label.
_STATIC = struct.Struct("<8sIIQQQI4x16s16s")
# Live header words (index into the header viewed as 64-bit words), written by the daemon while readers probe.
W_RELOCATIONS = 16  # odd while a relocation chain is being written
W_GENERATION = 17  # +1 per change
W_ENTRIES = 18  # blocks published now
W_OVERFLOWS = 19  # blocks that found no slot (they read as absent)
W_STATE = 20
W_STASHED = 21  # blocks in the stash now
W_DAEMON_FLAGS = 22  # what the daemon has beyond this index (DAEMON_REMOTE_TIER)
DAEMON_REMOTE_TIER = 1  # a remote tier may hold blocks this index does not show (a lookup RPC can find more)
W_MAX_LOOKUP = 23  # the daemon's max_lookup_blocks: a longer batch is the RPC's to refuse
W_COLD = 24  # published blocks some rank holds outside host memory only (0: every hit is a host-memory hit)
STATE_LIVE = 1
STATE_RETIRED = 2  # the daemon dropped this index: map the new one (or ask over RPC)

# The stash: a few blocks that found no slot in the table (a cuckoo placement can fail, rarely), kept with their
# whole digest and probed only when the table alone ends a prefix and the stash is not empty.
STASH_OFFSET = 1024
STASH_SLOTS = 16
STASH_ENTRY_BYTES = 40  # digest, then a 64-bit state word: 0 = free, else STASH_USED | flags
STASH_USED = 1 << 8

NUMPY_MIN_BATCH = 32  # below this a Python loop beats numpy's per-call overhead
PROBE_ATTEMPTS = 4  # probes repeated while relocations run; after that the answer may miss a moving block

_WORDS3 = struct.Struct("<QQQ")
_DIGEST_WORDS = struct.Struct("<QQQ8x")  # a whole digest: its two home words and its tag
_DIGEST_PERSON = b"kvd-index-v1"
_DIGEST_SEED = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_DIGEST_PERSON)  # copied: half a fresh one's cost


class IndexUnavailable(Exception):
    """The mapped index was retired by the daemon (or is closed): ask the daemon again."""


@dataclass(frozen=True, slots=True)
class IndexHeader:
    slots: int
    words_offset: int
    flags_offset: int
    tp_world_size: int
    boot_id: str
    label: bytes

    @property
    def total_bytes(self) -> int:
        return self.flags_offset + self.slots

    def pack(self) -> bytes:
        boot = self.boot_id.encode()[:16]
        return _STATIC.pack(
            MAGIC, VERSION, HEADER_BYTES, self.slots, self.words_offset, self.flags_offset, self.tp_world_size, boot,
            self.label,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes | memoryview, file_bytes: int) -> IndexHeader:
        if len(raw) < _STATIC.size:
            raise ValueError("index file is shorter than its header")
        magic, version, header_bytes, slots, words_off, flags_off, world, boot, label = _STATIC.unpack_from(raw)
        if magic != MAGIC or version != VERSION or header_bytes != HEADER_BYTES:
            raise ValueError(f"not a kvd index of version {VERSION} (magic {magic!r}, version {version})")
        header = cls(slots, words_off, flags_off, world, boot.rstrip(b"\0").decode(errors="replace"), label)
        if slots < 1 or slots & (slots - 1) or words_off < HEADER_BYTES or words_off % 8:
            raise ValueError(f"index header is inconsistent: {slots} slots at offset {words_off}")
        if flags_off < words_off + 8 * slots or header.total_bytes > file_bytes:
            raise ValueError(f"index header is inconsistent with its {file_bytes}-byte file")
        return header


def layout_for(slots: int) -> tuple[int, int, int]:
    """(words offset, flags offset, file bytes) for a table of `slots` slots."""
    words = HEADER_BYTES
    flags = words + 8 * slots
    total = -(-(flags + slots) // mmap.PAGESIZE) * mmap.PAGESIZE
    return words, flags, total


def index_digest(block_hash: bytes) -> bytes:
    """The 32 bytes the index keys a block by: the hash itself when it is 32 bytes, else blake2b of it."""
    if len(block_hash) == DIGEST_BYTES:
        return block_hash
    if not 0 < len(block_hash) <= MAX_HASH_BYTES:
        raise ValueError(f"a block hash must be 1..{MAX_HASH_BYTES} bytes, got {len(block_hash)}")
    state = _DIGEST_SEED.copy()
    state.update(block_hash)
    return state.digest()


def digest_words(digest: bytes) -> tuple[int, int, int]:
    """(first home word, tag, second home word) of a digest."""
    return _WORDS3.unpack_from(digest)


def stash_entry_offset(i: int) -> int:
    return STASH_OFFSET + i * STASH_ENTRY_BYTES


def group_key(tenant: str, model_id: str, layout_fingerprint: str, tp_world_size: int) -> str:
    """The namespace group an index covers: every tensor-parallel rank of one model and KV layout, in one tenant."""
    return f"{tenant}|{model_id}|{layout_fingerprint}|tp*/{tp_world_size}"


def label_of(group_key: str) -> bytes:
    """The 16-byte label an index carries for its namespace group, so a client can check it mapped the right one."""
    return hashlib.blake2b(group_key.encode(), digest_size=16, person=b"kvd-index-label").digest()


class IndexReader:
    """A read-only mapping of one published index, probed in the caller's thread (no locks, no syscalls)."""

    def __init__(self, fd: int, *, use_numpy: bool | None = None) -> None:
        """Map `fd` read-only (the caller keeps ownership of the fd and may close it after this returns)."""
        if sys.byteorder != "little":
            raise ValueError("the kvd index layout is little-endian; this host is not")
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise ValueError(f"index file of {size} bytes is shorter than its header")
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            self.header = IndexHeader.unpack(self._map[: _STATIC.size], size)
        except ValueError:
            self._map.close()
            raise
        h = self.header
        self._mask = h.slots - 1
        self._view = memoryview(self._map)
        self._hdr: memoryview | None = self._view[:HEADER_BYTES].cast("Q")
        self._words = self._view[h.words_offset : h.words_offset + 8 * h.slots].cast("Q")
        self._flags = self._view[h.flags_offset : h.flags_offset + h.slots]
        self._np: Any = None
        self._np_words: Any = None
        self._np_flags: Any = None
        if _np is not None and use_numpy is not False:
            self._np = _np
            self._np_words = _np.frombuffer(self._map, dtype="<i8", count=h.slots, offset=h.words_offset)
            self._np_flags = _np.frombuffer(self._map, dtype=_np.uint8, count=h.slots, offset=h.flags_offset)
        elif use_numpy:
            raise ValueError("numpy is not installed")
        self.retries = 0  # probes repeated because the daemon relocated blocks meanwhile
        self.unsettled = 0  # probes answered while relocations kept running (they may have missed a moving block)
        # The stash's digest -> entry, as of (relocation counter, generation): a miss with a non-empty stash would
        # otherwise read all of it on every probe. Its flags are read live (they change without a relocation).
        self._stash_at: tuple[tuple[int, int], dict[bytes, int]] | None = None

    # -- state -----------------------------------------------------------------------------------------------------

    @property
    def boot_id(self) -> str:
        return self.header.boot_id

    @property
    def closed(self) -> bool:
        return self._hdr is None

    @property
    def live(self) -> bool:
        return self._hdr is not None and self._hdr[W_STATE] == STATE_LIVE

    def counter(self, word: int) -> int:
        """A live header word (W_GENERATION, W_ENTRIES, W_OVERFLOWS, ...)."""
        if self._hdr is None:
            raise IndexUnavailable("index is closed")
        return int(self._hdr[word])

    def close(self) -> None:
        """Unmap. Safe to call twice; probes after it raise IndexUnavailable."""
        if self._hdr is None:
            return
        self._np_words = self._np_flags = None
        for view in (self._hdr, self._words, self._flags, self._view):
            view.release()
        self._hdr = None
        self._map.close()

    # -- probes ----------------------------------------------------------------------------------------------------

    def probe(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `block_hashes` are present (every rank, some local tier)."""
        return self.probe_tiers(block_hashes, want_host=False)[0]

    def probe_tiers(self, block_hashes: Sequence[bytes], *, want_host: bool = True) -> tuple[int, int]:
        """(present prefix, prefix of it whose every rank's copy is in host memory; 0 unless want_host).
        A HashRun is probed from its buffer as it is (no join of the hashes: most of a 1,000-hash probe's cost)."""
        hdr = self._hdr
        if hdr is None or hdr[W_STATE] != STATE_LIVE:
            raise IndexUnavailable("the daemon retired this index" if hdr is not None else "index is closed")
        n = len(block_hashes)
        if n == 0:
            return 0, 0
        joined = _joined(block_hashes)  # None: hashes to digest, each only when the probe reaches it
        result = (0, 0)
        for attempt in range(PROBE_ATTEMPTS):
            before = hdr[W_RELOCATIONS]
            result = self._probe_once(block_hashes, joined, n, want_host)
            if not before & 1 and hdr[W_RELOCATIONS] == before:
                if attempt:
                    self.retries += attempt
                return result
        self.retries += PROBE_ATTEMPTS - 1
        self.unsettled += 1
        return result

    def _probe_once(
        self, block_hashes: Sequence[bytes], joined: bytes | memoryview | None, n: int, want_host: bool
    ) -> tuple[int, int]:
        hdr = self._hdr
        if hdr is None:
            raise IndexUnavailable("index is closed")
        cold = want_host and hdr[W_COLD] != 0  # 0: every published block is in host memory (host == hit)
        first = joined if joined is not None else index_digest(block_hashes[0])
        if self._np_words is None or n < NUMPY_MIN_BATCH or not self._has_first(first):
            # A miss at the first block (a new prefix) digests one hash, not the batch.
            triples = (_DIGEST_WORDS.iter_unpack(joined) if joined is not None
                       else (_DIGEST_WORDS.unpack(index_digest(h)) for h in block_hashes))  # fmt: skip
            hit, host = self._probe_python(triples, cold)
        else:
            hit, host = self._probe_numpy(joined or b"".join(map(index_digest, block_hashes)), n, cold)
        if hit < n and hdr[W_STASHED]:
            hit, host = self._extend_with_stash(block_hashes, hit, host, cold)
        if want_host and not cold:
            host = hit
        return hit, host

    def _read_stash(self) -> dict[bytes, int]:
        """digest -> header word of its stash entry's state, for the stashed blocks. Kept while neither the
        relocation counter (odd around every change of the stash's digests) nor the generation moved."""
        hdr = self._hdr
        if hdr is None:
            return {}
        at = (int(hdr[W_RELOCATIONS]), int(hdr[W_GENERATION]))
        if self._stash_at is not None and self._stash_at[0] == at:
            return self._stash_at[1]
        stash: dict[bytes, int] = {}
        for i in range(STASH_SLOTS):
            offset = stash_entry_offset(i)
            word = (offset + DIGEST_BYTES) // 8
            if hdr[word]:
                stash[bytes(self._view[offset : offset + DIGEST_BYTES])] = word
        if not at[0] & 1 and (int(hdr[W_RELOCATIONS]), int(hdr[W_GENERATION])) == at:
            self._stash_at = (at, stash)
        return stash

    def _extend_with_stash(
        self, block_hashes: Sequence[bytes], hit: int, host: int, want_host: bool
    ) -> tuple[int, int]:
        """Continue a prefix the table ended at `hit`, looking in the stash as well as the table."""
        stash, hdr = self._read_stash(), self._hdr
        host_run = want_host and host == hit
        while hit < len(block_hashes):
            digest = index_digest(block_hashes[hit])
            word = stash.get(digest)
            state = hdr[word] if word is not None and hdr is not None else 0
            flags = state & 0xFF if state else None
            if flags is None:
                slot = self._slot_of(digest)
                if slot < 0:
                    break
                flags = self._flags[slot]
            hit += 1
            host_run = host_run and bool(flags & FLAG_HOST)
            host += host_run
        return hit, host

    def _slot_of(self, block_hash: bytes) -> int:
        """The slot holding `block_hash`, or -1."""
        w0, tag, w2 = _WORDS3.unpack_from(block_hash if len(block_hash) == DIGEST_BYTES else index_digest(block_hash))
        words, mask = self._words, self._mask
        if words[w0 & mask] == tag:
            return w0 & mask
        if words[w2 & mask] == tag:
            return w2 & mask
        return -1

    def _has_first(self, joined: bytes | memoryview) -> bool:
        """Whether the first block is present: a batch whose first block misses (a new prefix) needs no numpy."""
        w0, tag, w2 = _WORDS3.unpack_from(joined)
        words, mask = self._words, self._mask
        return words[w0 & mask] == tag or words[w2 & mask] == tag

    def _probe_python(self, triples: Iterable[tuple[int, ...]], want_host: bool) -> tuple[int, int]:
        words, flags, mask = self._words, self._flags, self._mask
        hit = host = 0
        host_run = want_host
        for w0, tag, w2 in triples:
            slot = w0 & mask
            if words[slot] != tag:
                slot = w2 & mask
                if words[slot] != tag:
                    break
            hit += 1
            if host_run:
                if flags[slot] & FLAG_HOST:
                    host += 1
                else:
                    host_run = False
        return hit, host

    def _probe_numpy(self, joined: bytes | memoryview, n: int, want_host: bool) -> tuple[int, int]:
        # Plain operators on whole arrays: on a 1,000-hash batch they beat out=/take(mode=) forms and strided 2-D
        # views (keyword parsing and the 2-D iterator cost more than the temporaries they avoid; measured).
        words = self._np.frombuffer(joined, dtype="<i8")  # int64 throughout: indices need no cast in the gathers
        homes = words & self._mask  # one pass over every word is cheaper than two strided passes
        first, second, tags = homes[0::4], homes[2::4], words[1::4]
        table = self._np_words
        in_first = table[first] == tags
        present = in_first | (table[second] == tags)
        miss = int(present.argmin())
        hit = n if present[miss] else miss
        if not want_host or hit == 0:
            return hit, 0
        slots = self._np.where(in_first[:hit], first[:hit], second[:hit])
        host = self._np_flags[slots] & FLAG_HOST
        first_cold = int(host.argmin())
        return hit, (hit if host[first_cold] else first_cold)


def _joined(block_hashes: Sequence[bytes]) -> bytes | memoryview | None:
    """The batch as consecutive 32-byte digests (what both probes read), or None when its hashes are not digests
    already (then each is digested as the probe reaches it)."""
    if type(block_hashes) is HashRun:  # not isinstance: an ABC's check costs more than a list's whole small probe
        return block_hashes.buffer
    joined = b"".join(block_hashes)
    if len(joined) == DIGEST_BYTES * len(block_hashes):
        return joined
    if not all(0 < len(h) <= MAX_HASH_BYTES for h in block_hashes):  # refused whole, as the daemon would
        raise ValueError(f"a block hash must be 1..{MAX_HASH_BYTES} bytes")
    return None
