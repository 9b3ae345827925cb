"""The submission ring: saves and loads handed to the daemon through shared memory instead of a unary RPC.

After RegisterSession the client asks for its session's ring on the credential socket (kvd_client.fdpass, a grant
request carrying the session key); the daemon creates a sealed memfd (its size fixed) and a pipe, the doorbell, and
passes the memfd and the pipe's write end. The caller's thread publishes a record into the next free slot and writes
one byte to the doorbell, with the GIL held throughout (struct packing, slice writes, a ctypes.PyDLL write): no hop
to the client's loop thread, no gRPC call. The daemon's event loop reads the doorbell, one byte per record
published, copies that many records out of shared memory, checks every byte of the copies (the client may write the
slots meanwhile) and submits each through the same entry point as the Save/Load RPCs. Successes are reported
through the completion queue (kvd_client.completions), failures on the Watch stream; a record the daemon refuses
gets a notice there with the status the RPC would have answered.

    page 0     b"KVDRING1", u32 version, u32 slot_bytes, u32 slots; u64 tail at TAIL_AT (the daemon's: records taken),
               u64 head at HEAD_AT (the client's: records published, for diagnostics; the daemon never reads it)
    slot i     at PAGE + i * slot_bytes: RECORD (magic, kind, hash length, event length, sequence number, client
               tag, block count), the ready event at EVENT_AT, then u32 block indices, then the hashes back to back

Why a pipe and not an eventfd: a duplicated eventfd shares its file status flags, so a client could make the
daemon's end blocking and drain the counter under it, and a read on the daemon's event loop would then block the
daemon. The pipe's read end is the daemon's alone. Ordering: the doorbell's write and read are system calls, so a
record's bytes are in place before the daemon counts it; the slot is reused only after the daemon stored a tail
past it, which it does after copying the record out (x86 keeps a load before a later store). The client uses a ring
only on x86-64; elsewhere it keeps the RPCs. A request that does not fit one slot (too many blocks, mixed hash
lengths, an index past 32 bits) or finds the ring full goes by RPC: the ring never blocks the caller and never
drops a request.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import platform
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kvd_client.fdpass import close_fds

RING_MAGIC = b"KVDRING1"
RECORD_MAGIC = b"KVR1"
VERSION = 1
PAGE = 4096  # the header page; slots follow
RING_HEADER = struct.Struct("<8sIII")
TAIL_AT = 64  # its own cache line: the daemon writes it, the client reads it
HEAD_AT = 128
COUNTER = struct.Struct("<Q")
RECORD = struct.Struct("<4sBBHQQII")  # magic, kind, hash length, event length, sequence, client tag, count, 0
EVENT_AT = 32
EVENT_BYTES = 64  # a CUDA IPC event handle
DATA_AT = EVENT_AT + EVENT_BYTES
MAX_HASH_BYTES = 64
SAVE, LOAD = 1, 2
MIN_SLOT_BYTES = 512
MAX_SLOT_BYTES = 1 << 20
MAX_SLOTS = 4096
_INDEX = array.array("I").itemsize  # 4 on every Linux ABI
_ONE = b"\x01"  # one doorbell byte per record

_libc_keep_gil = ctypes.PyDLL(None, use_errno=True)  # a PyDLL call keeps the GIL (see kvd_client.handoff)
_libc_keep_gil.write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
_libc_keep_gil.write.restype = ctypes.c_ssize_t


def supported() -> bool:
    """Whether this machine orders the ring's plain loads and stores as it needs (x86-64: total store order)."""
    return platform.machine() in ("x86_64", "AMD64") and _INDEX == 4


def ring_bytes(slots: int, slot_bytes: int) -> int:
    return PAGE + slots * slot_bytes


def capacity(slot_bytes: int, hash_len: int) -> int:
    """How many blocks with hashes of `hash_len` bytes one record of a slot holds."""
    return (slot_bytes - DATA_AT) // (_INDEX + hash_len)


def write_header(ring: mmap.mmap, slots: int, slot_bytes: int) -> None:
    """The daemon's description of a new ring (the client reads it; the daemon never reads it back)."""
    RING_HEADER.pack_into(ring, 0, RING_MAGIC, VERSION, slot_bytes, slots)


class RingWriter:
    """The client's end. `publish` runs on the caller's thread; `close` on any thread (the lock keeps the mapping
    until no publish is under way)."""

    def __init__(self, memfd: int, doorbell: int) -> None:
        """Takes both descriptors (closed by `close`, or here if the ring is not what a daemon makes)."""
        try:
            try:
                size = os.fstat(memfd).st_size
                ring = mmap.mmap(memfd, size)
            finally:
                os.close(memfd)  # the mapping keeps the memory
            header = RING_HEADER.unpack_from(ring) if size >= PAGE else (b"", 0, 0, 0)
            magic, version, self.slot_bytes, self.slots = header
            if magic != RING_MAGIC or version != VERSION or size != ring_bytes(self.slots, self.slot_bytes):
                ring.close()
                raise ValueError("not a kvd submission ring")
        except BaseException:
            close_fds([doorbell])
            raise
        self._map: mmap.mmap | None = ring
        self._doorbell = doorbell
        self._head = 0
        self._lock = threading.Lock()
        self.published = 0

    def publish(self, kind: int, tag: int, event: bytes, indices: Sequence[int], hashes: Sequence[bytes]) -> bool:
        """Hand one request to the daemon; False (nothing written) when it must go by RPC instead."""
        count = len(hashes)
        hash_len = len(hashes[0]) if count else 0
        if not 0 < hash_len <= MAX_HASH_BYTES or len(event) not in (0, EVENT_BYTES):
            return False
        if count > capacity(self.slot_bytes, hash_len) or count != len(indices):
            return False
        try:
            packed = array.array("I", indices).tobytes()
        except (OverflowError, TypeError):
            return False
        joined = b"".join(hashes)
        if len(joined) != count * hash_len:
            return False  # hashes of several lengths
        with self._lock:
            ring = self._map
            if ring is None or self._head - COUNTER.unpack_from(ring, TAIL_AT)[0] >= self.slots:
                return False
            at = PAGE + (self._head % self.slots) * self.slot_bytes
            RECORD.pack_into(ring, at, RECORD_MAGIC, kind, hash_len, len(event), self._head, tag, count, 0)
            ring[at + EVENT_AT : at + EVENT_AT + len(event)] = event
            data = at + DATA_AT
            ring[data : data + len(packed)] = packed
            ring[data + len(packed) : data + len(packed) + len(joined)] = joined
            self._head += 1
            COUNTER.pack_into(ring, HEAD_AT, self._head)
            if _libc_keep_gil.write(self._doorbell, _ONE, 1) != 1:  # the daemon counts this record from now on
                self._drop()  # nobody reads the doorbell (the daemon dropped the ring): this and the rest by RPC
                return False
            self.published += 1
        return True

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        ring, self._map = self._map, None
        if ring is not None:
            ring.close()
            close_fds([self._doorbell])
            self._doorbell = -1


@dataclass(frozen=True, slots=True)
class RingRecord:
    kind: int  # SAVE or LOAD
    tag: int  # the client's tag, echoed in the notice
    ready_event: bytes
    indices: list[int]
    hashes: list[bytes]


class RecordError(ValueError):
    """A slot that holds no valid record; `tag` is what it says its client tag is (for the refusal notice).
    `unpublished`: not the record the sequence expects at all (the doorbell rang more than was written)."""

    def __init__(self, message: str, tag: int, unpublished: bool = False) -> None:
        super().__init__(message)
        self.tag = tag
        self.unpublished = unpublished


def read_record(ring: mmap.mmap, at: int, slot_bytes: int, seq: int) -> RingRecord:
    """The record in the slot at `at` (the daemon's own offset and size, never the client's word), copied out before
    anything is checked: every field is untrusted, and nothing is read past the slot. RecordError if it is not the
    `seq`-th record the client published, or malformed."""
    head = ring[at : at + DATA_AT]
    magic, kind, hash_len, event_len, record_seq, tag, count, _ = RECORD.unpack_from(head)
    if magic != RECORD_MAGIC or record_seq != seq:
        raise RecordError(f"slot {at}: not record {seq} (out of sequence, or never written)", tag, unpublished=True)
    if kind not in (SAVE, LOAD) or event_len not in (0, EVENT_BYTES):
        raise RecordError(f"record {seq}: kind {kind}, ready event of {event_len} bytes", tag)
    if not 0 < hash_len <= MAX_HASH_BYTES or not 0 < count <= capacity(slot_bytes, hash_len):
        raise RecordError(f"record {seq}: {count} blocks with hashes of {hash_len} bytes do not fit a slot", tag)
    body = ring[at + DATA_AT : at + DATA_AT + count * (_INDEX + hash_len)]
    indices = array.array("I")
    indices.frombytes(body[: count * _INDEX])
    hashes = body[count * _INDEX :]
    split = [hashes[i : i + hash_len] for i in range(0, count * hash_len, hash_len)]
    return RingRecord(kind, tag, head[EVENT_AT : EVENT_AT + event_len], indices.tolist(), split)
