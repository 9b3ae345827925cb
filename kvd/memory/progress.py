"""The daemon's side of a session's progress page (layout and the worker's side: kvd_client.progress).

The daemon creates one page per session that asks for in-step loads, with an eventfd, and passes both to the
worker. The worker may write the page (it releases its own waits when the daemon is gone), so the daemon never reads
anything back from it: it only stores counters and statuses. Seals keep the worker from resizing the file under the
daemon's mapping.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from dataclasses import dataclass

from kvd_client.progress import (
    DEFAULT_SLOTS,
    MASK32,
    STATUS_FAILED,
    STATUS_OK,
    counter_word,
    page_bytes,
    write_header,
)

from kvd.errors import InvalidArgument

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ProgressWriter:
    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        size = page_bytes(slots)
        self._fd = os.memfd_create("kvd-progress", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self._fd, size)
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, SEALS)
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)
        # Where the page is mapped here (a CUDA transport registers it to store counters from its stream); the
        # ctypes view is dropped at once so that close() can unmap.
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.nbytes = size
        write_header(self._view, slots)
        self._words = self._view.cast("I")
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closed = False

    def client_fds(self) -> tuple[int, int]:
        """New descriptors of the page and the wake eventfd, for passing to the worker (the caller closes them)."""
        return os.dup(self._fd), os.dup(self.wake_fd)

    def check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise InvalidArgument(f"progress slot {slot} outside the session's {self.slots}")

    def layer_done(self, slot: int, value: int) -> None:
        """Layers up to the one `value` stands for are in place (called from the copy thread, after the copy)."""
        if self._closed:
            return
        self._words[counter_word(slot)] = value & MASK32
        os.eventfd_write(self.wake_fd, 1)

    def wake(self) -> None:
        """Wake CPU waiters: a counter moved (stored by a GPU stream, which cannot write an eventfd)."""
        if not self._closed:
            os.eventfd_write(self.wake_fd, 1)

    def finish(self, slot: int, final: int, ok: bool) -> None:
        """The load ended: its status first, then its final counter, so a waiter never sees the end without it."""
        if self._closed:
            return
        word = counter_word(slot)
        self._words[word + 1] = STATUS_OK if ok else STATUS_FAILED
        self._words[word] = final & MASK32
        os.eventfd_write(self.wake_fd, 1)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._words.release()
        self._view.release()
        self._map.close()
        os.close(self._fd)
        os.close(self.wake_fd)


@dataclass(frozen=True, slots=True)
class LayerProgress:
    """One in-step load's entry in its session's page: what the transport calls after each layer, and at the end."""

    writer: ProgressWriter
    slot: int
    base: int
    layers: int

    def layer_done(self, layer: int) -> None:
        if layer + 1 < self.layers:  # the last layer's value is the final one: `finish` stores it, after the status
            self.writer.layer_done(self.slot, self.target(layer))

    def target(self, layer: int) -> int:
        """The counter value that says layers 0..layer are in place."""
        return (self.base + layer + 1) & MASK32

    def wake(self) -> None:
        """For a transport that stores `target(layer)` itself (from a GPU stream): wake CPU waiters after it."""
        self.writer.wake()

    @property
    def counter_offset(self) -> int:
        """Byte offset of this load's counter in the page (at writer.address; writer.nbytes long)."""
        return 4 * counter_word(self.slot)

    def finish(self, ok: bool) -> None:
        self.writer.finish(self.slot, self.base + self.layers, ok)
