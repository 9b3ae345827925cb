"""The daemon's side of a session's completion queue (layout, and the worker's side: kvd_client.completions).

Write-only: the worker may be able to write the memory (through a descriptor it got some other way), so the daemon
never reads a byte of it back. Where a record goes is the client tag modulo the daemon's own slot count; the header
is written once and never consulted again. The memfd is sealed against any change of size (a worker can never cut
it short under the daemon's stores); the worker gets a read-only descriptor of it where /proc allows. The wake is a
pipe whose write end only the daemon holds (its flags are the daemon's alone: the worker's end can never make the
daemon's writes block); a full pipe (a worker that does not read) or a closed read end drops the wake byte, never a
record.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from kvd_client.completions import LOAD, SAVE, queue_bytes, write_header, write_record

from kvd.memory.sealed import fixed_size_memfd
from kvd.types import DaemonStages, Notice, OpKind

_WAKE = b"\x01"


class CompletionWriter:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        size = queue_bytes(slots)
        self._fd = fixed_size_memfd("kvd-completions", size)
        try:
            self._map: mmap.mmap | None = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            write_header(self._map, slots)
            self._read_end, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            os.close(self._fd)
            raise
        self.written = 0

    def hand_over(self) -> tuple[int, int]:
        """The worker's descriptors (the caller closes them once sent): a read-only descriptor of the queue and the
        wake pipe's read end (the daemon keeps none: the worker's copy is the only one)."""
        try:
            memfd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            memfd = os.dup(self._fd)
        read_end, self._read_end = self._read_end, -1
        return memfd, read_end

    def write(self, notice: Notice, stages: DaemonStages | None) -> bool:
        """Store a successful operation's record and ring the wake; False once closed (the caller then queues the
        notice on the Watch stream)."""
        view = self._map
        if view is None:
            return False
        kind = SAVE if notice.kind is OpKind.SAVE else LOAD
        stamps = _stamps(stages)
        write_record(view, self.slots, notice.client_tag, kind, notice.duration_us, notice.bytes_moved, stamps,
                     notice.done_event)  # fmt: skip
        self.written += 1
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or nobody reads it any more
            os.write(self._wake, _WAKE)
        return True

    def close(self) -> None:
        """No more records; the wake pipe's reader reads EOF (the worker's mapping stays valid)."""
        view, self._map = self._map, None
        if view is None:
            return
        view.close()
        for fd in (self._fd, self._wake, self._read_end):
            if fd >= 0:
                os.close(fd)


def _stamps(stages: DaemonStages | None) -> tuple[int, ...]:
    if stages is None:
        return (0,) * 9
    return (
        stages.received_ns,
        stages.planned_ns,
        stages.submitted_ns,
        stages.enqueue_start_ns,
        stages.enqueue_end_ns,
        stages.copy_done_ns,
        stages.resumed_ns,
        stages.queued_ns,
        stages.sent_ns,
    )
