"""The completion queue: how a save or load that went well reaches its worker through shared memory instead of the
session's Watch stream (the Watch stream keeps everything else: failures with their block lists, refusals).

After RegisterSession the client asks for its session's queue on the credential socket (kvd_client.fdpass, a grant
request with GRANT_COMPLETIONS | GRANT_COMPLETION_WAKE); the daemon creates a sealed memfd (its size fixed, mode 0600)
and a pipe, keeps its mapping and the pipe's write end, and passes a read-only descriptor of the memfd and the
pipe's read end. The daemon only ever writes the memory; it never reads a byte of it back, so nothing a worker
writes there (where it can) changes what the daemon does.

    page 0    b"KVDCMPL1", u32 version, u32 slot_bytes, u32 slots (the daemon's; the client checks them)
    slot i    at PAGE + i * slot_bytes: u64 client tag (stored last: the record is complete once it is there),
              u8 kind, u8 status, u8 event length, pad, u32 duration µs, u64 bytes moved, 9 x u64 daemon stage
              stamps (kvd_client.types.DaemonStages, `sent` = when the record was stored), a 64-byte done event

Which slot: the operation's client tag modulo `slots`, so the daemon writes where the client looks without reading
anything. The client owns the slots: it gives an operation a tag whose slot no operation of its own still holds
(`claim`), and a slot is free again once its record was taken, or its operation ended another way (a notice on the
Watch stream). One byte on the pipe follows each record, so the client's loop thread wakes; a full pipe means a wake
is pending already. When the daemon goes, the pipe reads EOF: the session is over.

Ordering: the daemon stores the record's body, then its tag; the client reads the tag, then the body (x86-64 keeps
stores in order and loads in order), so a tag that matches means the body is the one written for it. Like the
submission ring, the queue is used only on x86-64 (kvd_client.ring.supported).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = b"KVDCMPL1"
VERSION = 1
PAGE = 4096
HEADER = struct.Struct("<8sIII")
SLOT_BYTES = 256
TAG = struct.Struct("<Q")
BODY_AT = TAG.size
STAMPS = 9  # kvd_client.types.DaemonStages, in field order
BODY = struct.Struct(f"<BBBxIQ{STAMPS}Q")  # kind, status, event length, duration µs, bytes moved, stamps
EVENT_AT = BODY_AT + BODY.size
EVENT_BYTES = 64
DEFAULT_SLOTS = 1024
MAX_SLOTS = 65536
SAVE, LOAD = 1, 2
STATUS_OK = 1


def queue_bytes(slots: int) -> int:
    return PAGE + slots * SLOT_BYTES


def slot_at(tag: int, slots: int) -> int:
    """The byte offset of the slot of the operation tagged `tag`."""
    return PAGE + (tag % slots) * SLOT_BYTES


def write_header(view: mmap.mmap, slots: int) -> None:
    HEADER.pack_into(view, 0, MAGIC, VERSION, SLOT_BYTES, slots)


def write_record(
    view: mmap.mmap, slots: int, tag: int, kind: int, duration_us: int, nbytes: int, stamps: Sequence[int], event: bytes
) -> None:
    """The daemon's store of one successful operation's record: the body, then the tag that completes it."""
    at = slot_at(tag, slots)
    event = event[:EVENT_BYTES]
    BODY.pack_into(view, at + BODY_AT, kind, STATUS_OK, len(event), duration_us & 0xFFFFFFFF, nbytes, *stamps)
    view[at + EVENT_AT : at + EVENT_AT + len(event)] = event
    TAG.pack_into(view, at, tag)


@dataclass(frozen=True, slots=True)
class Record:
    """One operation's record, as the client read it."""

    tag: int
    kind: int
    duration_us: int
    nbytes: int
    stamps: tuple[int, ...]
    done_event: bytes


class CompletionReader:
    """The client's end: the queue mapped read-only, the wake pipe, and which slots the client's operations hold.
    `claim` runs on the caller's thread, `collect` on either thread (the lock keeps them apart)."""

    def __init__(self, memfd: int, wake_fd: int) -> None:
        """Takes both descriptors (closed by `close`, or here if the queue is not what a daemon makes)."""
        try:
            try:
                size = os.fstat(memfd).st_size
                view = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(memfd)  # the mapping keeps the memory
            magic, version, slot_bytes, slots = HEADER.unpack_from(view) if size >= PAGE else (b"", 0, 0, 0)
            if magic != MAGIC or version != VERSION or slot_bytes != SLOT_BYTES or not 0 < slots <= MAX_SLOTS:
                view.close()
                raise ValueError("not a kvd completion queue")
            if size != queue_bytes(slots):
                view.close()
                raise ValueError("a kvd completion queue of the wrong size")
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(wake_fd)
            raise
        os.set_blocking(wake_fd, False)  # the loop thread drains it
        self.slots = slots
        self.wake_fd = wake_fd
        self._map: mmap.mmap | None = view
        self._held: dict[int, int] = {}  # slot -> the tag of the operation that holds it
        self._lock = threading.Lock()
        self.taken = 0  # records taken, ever

    def claim(self, tag: int) -> bool:
        """Hold `tag`'s slot for its operation; False when an operation of ours still holds it."""
        slot = tag % self.slots
        with self._lock:
            if slot in self._held:
                return False
            self._held[slot] = tag
            return True

    def release(self, tag: int) -> None:
        """The operation ended without a record (a failure or refusal on the Watch stream): its slot is free."""
        slot = tag % self.slots
        with self._lock:
            if self._held.get(slot) == tag:
                del self._held[slot]

    def collect(self) -> list[Record]:
        """The records of every held slot whose tag has arrived; those slots are free again."""
        out: list[Record] = []
        with self._lock:
            view = self._map
            if view is None or not self._held:
                return out
            for slot, tag in list(self._held.items()):
                at = PAGE + slot * SLOT_BYTES
                if TAG.unpack_from(view, at)[0] != tag:
                    continue
                kind, _, event_len, duration_us, nbytes, *stamps = BODY.unpack_from(view, at + BODY_AT)
                event = view[at + EVENT_AT : at + EVENT_AT + min(event_len, EVENT_BYTES)]
                out.append(Record(tag, kind, duration_us, nbytes, tuple(stamps), event))
                del self._held[slot]
            self.taken += len(out)
        return out

    def drain_wake(self) -> bool:
        """Empty the wake pipe; False once it reads EOF (the daemon is gone, or dropped the session)."""
        try:
            while data := os.read(self.wake_fd, 4096):
                if len(data) < 4096:
                    return True
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        with self._lock:
            view, self._map = self._map, None
            self._held.clear()
        if view is not None:
            view.close()
            with contextlib.suppress(OSError):
                os.close(self.wake_fd)
            self.wake_fd = -1
