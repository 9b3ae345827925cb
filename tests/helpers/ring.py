"""A session's submission ring driven by hand: granted to this process like KvdClient's, then written byte by byte,
so tests can publish what a correct client never would (garbage, huge counts, records out of sequence) and ring the
doorbell with any count."""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import termios
from collections.abc import Sequence
from pathlib import Path

from kvd_client.credentials import fetch_grant
from kvd_client.fdpass import GRANT_DOORBELL, GRANT_RING, Grant, GrantRefused
from kvd_client.ring import COUNTER, DATA_AT, EVENT_AT, PAGE, RECORD, RECORD_MAGIC, RING_HEADER, TAIL_AT


def grant(socket: Path, session_id: str, key: bytes, want: int = GRANT_RING | GRANT_DOORBELL) -> Grant:
    return fetch_grant(socket, session_id, key, want, timeout_s=5.0)


def refusal_status(socket: Path, session_id: str, key: bytes, want: int = GRANT_RING | GRANT_DOORBELL) -> int:
    """The status a grant request is refused with (0: it was granted; the descriptors are closed)."""
    try:
        grant(socket, session_id, key, want).close()
    except GrantRefused as exc:
        return exc.status
    return 0


class RawRing:
    """This process's mapping of a granted ring and its doorbell."""

    def __init__(self, granted: Grant) -> None:
        self.memfd = granted.take(GRANT_RING)
        self.doorbell = granted.take(GRANT_DOORBELL)
        self.map = mmap.mmap(self.memfd, os.fstat(self.memfd).st_size)
        _, _, self.slot_bytes, self.slots = RING_HEADER.unpack_from(self.map)
        self.head = 0  # records written so far (the next record's sequence number)

    @classmethod
    def of(cls, socket: Path, session_id: str, key: bytes) -> RawRing:
        return cls(grant(socket, session_id, key))

    @property
    def tail(self) -> int:
        """Records the daemon has taken."""
        return int(COUNTER.unpack_from(self.map, TAIL_AT)[0])

    def slot(self, seq: int) -> int:
        return PAGE + (seq % self.slots) * self.slot_bytes

    def write(
        self,
        kind: int,
        tag: int,
        pairs: Sequence[tuple[int, bytes]],
        *,
        seq: int | None = None,
        record_seq: int | None = None,
        event: bytes = b"",
        count: int | None = None,
        hash_len: int | None = None,
        event_len: int | None = None,
        magic: bytes = RECORD_MAGIC,
    ) -> None:
        """A record in the slot of `seq` (default: the next one), every header field overridable (`record_seq`: the
        sequence number it claims)."""
        seq = self.head if seq is None else seq
        at = self.slot(seq)
        hashes = b"".join(h for _, h in pairs)
        hash_len = len(pairs[0][1]) if hash_len is None and pairs else (hash_len or 0)
        count = len(pairs) if count is None else count
        event_len = len(event) if event_len is None else event_len
        claimed = seq if record_seq is None else record_seq
        RECORD.pack_into(self.map, at, magic, kind, hash_len, event_len, claimed, tag, count, 0)
        self.map[at + EVENT_AT : at + EVENT_AT + len(event)] = event
        indices = array.array("I", [i for i, _ in pairs]).tobytes()
        body = (indices + hashes)[: self.slot_bytes - DATA_AT]
        self.map[at + DATA_AT : at + DATA_AT + len(body)] = body
        self.head = max(self.head, seq + 1)

    def scribble(self, seq: int, data: bytes) -> None:
        """Raw bytes over the slot of `seq` (cut to the slot)."""
        at = self.slot(seq)
        data = data[: self.slot_bytes]
        self.map[at : at + len(data)] = data

    def unread(self) -> int:
        """Doorbell bytes the daemon has not read yet (FIONREAD answers on either end of a pipe)."""
        count = array.array("i", [0])
        fcntl.ioctl(self.doorbell, termios.FIONREAD, count, True)
        return count[0]

    def ring(self, count: int = 1) -> None:
        """`count` doorbell bytes (the daemon takes one record per byte)."""
        os.write(self.doorbell, b"\x01" * count)

    def close(self) -> None:
        self.map.close()
        for fd in (self.memfd, self.doorbell):
            if fd >= 0:
                os.close(fd)
