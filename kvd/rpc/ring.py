"""The daemon's end of the sessions' submission rings (the format, and the client's end: kvd_client.ring).

A memory session's process asks for its ring on the credential socket, naming the session and its key
(kvd.rpc.fd_channel). `RingGrantor.grant` checks the key and that the process on that connection is the session's own,
then creates the ring: a memfd of mode 0600 sealed against any change of size (the worker shares the mapping, but can
never cut it short under the daemon's reads) and a pipe, the doorbell. The daemon keeps its mapping and the pipe's
read end (nothing the worker holds can change how that end behaves) and passes the memfd and the write end; the ring
is closed as the session starts closing, and a later grant for the same session replaces it.

Reading, on the event loop: one doorbell byte per record published; at most `slots` bytes are read per wake-up (an
honest client never has more outstanding). Each record is copied out of shared memory and checked
(kvd_client.ring.read_record: nothing past its slot, every length bounded), its slot handed back, and submitted
through kvd.rpc.transfer.start_transfer exactly as a Save/Load RPC would be. A slot that holds no record of the
expected sequence number means the doorbell rang for nothing: that record is refused and whatever else the doorbell
holds is dropped, so a lying client costs one record per wake-up. A record refused for any reason gets a notice on
the session's Watch stream with the status the RPC would have answered; refusals are counted in Stats and logged at
most once a minute per session. A client that scribbles on its ring only gets its own records refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time

from kvd_client.fdpass import GRANT_DOORBELL, GRANT_RING
from kvd_client.ring import (
    COUNTER,
    PAGE,
    SAVE,
    TAIL_AT,
    RecordError,
    RingRecord,
    read_record,
    ring_bytes,
    write_header,
)

from kvd.errors import FailedPrecondition, InvalidArgument, KvdError, Unimplemented, status_of
from kvd.logs import Throttled
from kvd.memory.sealed import fixed_size_memfd
from kvd.process import PeerProcess
from kvd.rpc.fd_channel import Granted
from kvd.rpc.transfer import start_transfer
from kvd.service.service import KvdService
from kvd.types import BlockBatch, DaemonStages, Notice, OpKind, SessionRef

log = logging.getLogger(__name__)
_refusals = Throttled(log, interval_s=60.0)


def rings_supported() -> bool:
    """Whether this kernel gives sealed memfds (without seals the daemon's reads could fault: no rings then)."""
    try:
        os.close(fixed_size_memfd("kvd-ring", PAGE))
        return True
    except (OSError, AttributeError):
        return False


class SessionRing:
    """One session's ring, read on the event loop."""

    def __init__(self, service: KvdService, ref: SessionRef, label: str, slots: int, slot_bytes: int) -> None:
        self._service, self._ref, self._label = service, ref, label
        self._slots, self._slot_bytes = slots, slot_bytes
        self._memfd = fixed_size_memfd("kvd-ring", ring_bytes(slots, slot_bytes))
        try:
            self._map: mmap.mmap | None = mmap.mmap(self._memfd, ring_bytes(slots, slot_bytes))
            write_header(self._map, slots, slot_bytes)
            self._doorbell, self._bell = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # read end ours, write end theirs
        except BaseException:
            os.close(self._memfd)
            raise
        self._tail = 0
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._doorbell, self._on_doorbell)

    def hand_over(self) -> Granted:
        """The worker's descriptors, for the grant: the memfd (the daemon's mapping keeps the memory) and the
        doorbell's write end (the daemon keeps none: once the worker's copies are gone, the doorbell reads EOF)."""
        memfd, bell, self._memfd, self._bell = self._memfd, self._bell, -1, -1
        return Granted(GRANT_RING | GRANT_DOORBELL, (memfd, bell))

    def _on_doorbell(self) -> None:
        try:
            rung = os.read(self._doorbell, self._slots)  # one byte per record, a ring's worth at most
        except OSError:  # nothing there (a spurious wake-up)
            return
        if not rung:  # every write end closed: the worker let go of its ring
            self._loop.remove_reader(self._doorbell)
            return
        for _ in rung:
            if self._map is None:
                return
            if not self._take(self._map):
                self._silence()
                return

    def _silence(self) -> None:
        """Drop whatever else the doorbell holds (it rang for a record that is not there)."""
        with contextlib.suppress(OSError):
            while os.read(self._doorbell, 65536):
                pass

    def _take(self, ring: mmap.mmap) -> bool:
        """Take the next record; False when its slot held none at all (the doorbell rang for nothing)."""
        seq = self._tail
        at = PAGE + (seq % self._slots) * self._slot_bytes  # our own geometry, never the client's word
        try:
            record: RingRecord | None = read_record(ring, at, self._slot_bytes, seq)
            refusal = None
        except RecordError as exc:
            record, refusal = None, exc
        self._tail = seq + 1
        COUNTER.pack_into(ring, TAIL_AT, self._tail)  # after the copy: the slot is the client's again
        self._service.counters.ring_records += 1
        if refusal is not None:
            self._refuse(refusal.tag, InvalidArgument(f"submission ring: {refusal}"))
            return not refusal.unpublished
        if record is not None:
            self._submit(record)
        return True

    def _submit(self, record: RingRecord) -> None:
        stamps = DaemonStages(received_ns=time.monotonic_ns())
        kind = OpKind.SAVE if record.kind == SAVE else OpKind.LOAD
        blocks = BlockBatch(record.indices, record.hashes)
        try:
            start_transfer(self._service, kind, self._ref, blocks, record.ready_event, record.tag, stamps)
        except KvdError as exc:
            self._refuse(record.tag, exc)
        except Exception as exc:  # a bug: this record fails, the daemon serves on
            _refusals.exception(f"bug:{self._label}", "session %s: ring record failed", self._label)
            self._refuse(record.tag, exc)

    def _refuse(self, tag: int, exc: Exception) -> None:
        """The record's notice: its status and why. No block list: its client knows what it asked for, and a
        refusal must not cost the daemon more memory than a few bytes while its client is slow to read them."""
        code, message = status_of(exc)
        self._service.counters.ring_refused += 1
        _refusals.warning(self._label, "session %s: ring record refused: %s: %s", self._label, code.name, message)
        self._service.refuse(self._ref, Notice(0, OpKind.SAVE, False, (), message, tag, refused_status=code.value[0]))

    def close(self) -> None:
        ring, self._map = self._map, None
        if ring is None:
            return
        self._loop.remove_reader(self._doorbell)
        for fd in (self._doorbell, self._bell, self._memfd):
            if fd >= 0:
                os.close(fd)
        ring.close()


class RingGrantor:
    """Decides grant requests on the credential socket (kvd.rpc.fd_channel.Grantor): a ring for a memory session's
    own process, holding the session's key."""

    def __init__(self, service: KvdService, slots: int, slot_bytes: int) -> None:
        self._service = service
        self._slots, self._slot_bytes = slots, slot_bytes
        self._rings: dict[str, SessionRing] = {}

    def grant(self, session_id: str, key: bytes, want: int, peer: PeerProcess) -> Granted:
        if not want & GRANT_RING:
            raise InvalidArgument(f"grant request for {want:#x}: this daemon grants only a submission ring")
        ref = SessionRef(session_id, key)
        session = self._service.session_of_process(ref, peer)  # NOT_FOUND, PERMISSION_DENIED
        if session.attachment is None:
            raise FailedPrecondition("a lookup-only session neither saves nor loads: it has no ring")
        old = self._rings.pop(session.id, None)
        if old is not None:
            old.close()
        try:
            ring = SessionRing(self._service, ref, session.label, self._slots, self._slot_bytes)
        except OSError as exc:
            raise Unimplemented(f"no submission ring: {exc.strerror or exc}") from None
        self._rings[session.id] = ring
        session.ring = True

        def closed() -> None:
            ring.close()
            with contextlib.suppress(KeyError):
                if self._rings[session.id] is ring:
                    del self._rings[session.id]

        session.closers.append(closed)
        log.debug("session %s: submission ring of %d slots", session.label, self._slots)
        return ring.hand_over()
