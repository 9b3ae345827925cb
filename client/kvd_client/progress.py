"""Progress of in-step loads: a page of shared memory the daemon advances layer by layer and the worker waits on.

An in-step load is a load vLLM does not wait a step for: the scheduler returns (n, False), start_load_kv asks the
daemon for a layer-ordered load, and wait_for_layer_load(i) waits only until layer i's bytes are in place, so the
copy of layer i overlaps the compute of the layers before it.

Layout of the page (little-endian): a 64-byte header (magic, version, slots), then `slots` entries of 16 bytes:

    counter  uint32   cyclic: a load on this entry with base b stores b + i + 1 once layers 0..i are in place;
                      b + layers when it ends, whatever the outcome (so nothing waiting on it waits forever)
    status   uint32   STATUS_RUNNING, then STATUS_OK or STATUS_FAILED (stored before the final counter)
    unused   8 bytes

Counters only grow (modulo 2^32; compared cyclically, as cuStreamWaitValue32's default GEQ does), and the next
load on an entry starts where the last one ended, so an entry is reused without ever being reset: a wait left over
from an earlier load is already satisfied by any later value. On a GPU the worker's current stream waits on the
counter with cuStreamWaitValue32 (no host wait); on a CPU the worker's thread polls the page's wake eventfd, which
the daemon writes after each layer, together with the lease socket, which hangs up the moment the daemon dies.
Then the worker stores the final counters itself (`release`), so no wait outlives the daemon, and reports the
loads as failed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import time
from dataclasses import dataclass

MAGIC = b"KVDPRG\x00\x01"
VERSION = 1
HEADER_BYTES = 64
ENTRY_BYTES = 16
DEFAULT_SLOTS = 1024
_HEADER = struct.Struct("<8sII")
MASK32 = 0xFFFFFFFF

STATUS_RUNNING = 0
STATUS_OK = 1
STATUS_FAILED = 2  # some block of the load is not in place: the completion notice says which


def page_bytes(slots: int) -> int:
    return -(-(HEADER_BYTES + slots * ENTRY_BYTES) // mmap.PAGESIZE) * mmap.PAGESIZE


def counter_word(slot: int) -> int:
    """Index of an entry's counter in the page viewed as uint32s."""
    return (HEADER_BYTES + slot * ENTRY_BYTES) // 4


def reached(value: int, target: int) -> bool:
    """Cyclic value >= target, as cuStreamWaitValue32's default GEQ: (int32)(value - target) >= 0."""
    return (value - target) & MASK32 < 0x80000000


def write_header(view: memoryview, slots: int) -> None:
    _HEADER.pack_into(view, 0, MAGIC, VERSION, slots)


def read_header(view: memoryview | bytes, size: int) -> int:
    """The slot count of a progress page, after checking it."""
    magic, version, slots = _HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION or slots < 1 or page_bytes(slots) > size:
        raise ValueError(f"not a kvd progress page (magic {magic!r}, version {version}, {slots} slots)")
    return int(slots)


@dataclass(frozen=True, slots=True)
class StepLoad:
    """One in-step load's place in the page."""

    slot: int
    base: int
    layers: int

    def target(self, layer: int) -> int:
        """The counter value that says layers 0..layer are in place."""
        return (self.base + layer + 1) & MASK32

    @property
    def final(self) -> int:
        return (self.base + self.layers) & MASK32


class ProgressPage:
    """The worker's mapping of its session's progress page. Used from the model thread only."""

    def __init__(self, fd: int, *, wake_fd: int = -1, lease_fd: int = -1) -> None:
        """Map `fd` (read-write: the worker releases waits itself when the daemon is gone). `wake_fd` (an eventfd
        the daemon writes after each layer) and `lease_fd` (a socket the daemon holds open while it lives) make a
        CPU wait block instead of spinning; the page keeps them open and closes them in close()."""
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self.slots = read_header(self._map[:HEADER_BYTES], size)
        except (ValueError, struct.error):
            self._map.close()
            raise
        self._view = memoryview(self._map)
        self._words = self._view.cast("I")
        self._next_base = [int(self._words[counter_word(s)]) for s in range(self.slots)]
        self._free = list(range(self.slots - 1, -1, -1))
        self._wake_fd, self._lease_fd = wake_fd, lease_fd
        self._poll = select.poll()
        if wake_fd >= 0:
            self._poll.register(wake_fd, select.POLLIN)
        if lease_fd >= 0:
            self._poll.register(lease_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self.daemon_gone = False

    @property
    def address(self) -> int:
        """Where the page is mapped here (a GPU worker registers it with cuMemHostRegister)."""
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def pin(self) -> object:
        """A reference that keeps the page mapped at its address while it lives, close() or not: a GPU worker's
        registration of the page (cuMemHostRegister) is for that address, and a page mapped there later could not
        be registered."""
        import ctypes

        return ctypes.c_char.from_buffer(self._map)

    def begin(self, layers: int) -> StepLoad | None:
        """An entry for a load of `layers` layers, or None when all are in use (then load asynchronously)."""
        if not self._free or self.daemon_gone:
            return None
        slot = self._free.pop()
        load = StepLoad(slot, self._next_base[slot], layers)
        self._next_base[slot] = load.final
        self._words[counter_word(slot) + 1] = STATUS_RUNNING
        return load

    def end(self, load: StepLoad) -> None:
        """The load is over (its completion arrived, or it was released): its entry may take the next one."""
        self._free.append(load.slot)

    def counter(self, load: StepLoad) -> int:
        return int(self._words[counter_word(load.slot)])

    def status(self, load: StepLoad) -> int:
        return int(self._words[counter_word(load.slot) + 1])

    def ready(self, load: StepLoad, layer: int) -> bool:
        return reached(self.counter(load), load.target(layer))

    def finished(self, load: StepLoad) -> bool:
        return reached(self.counter(load), load.final)

    def wait(self, load: StepLoad, layer: int, timeout_s: float) -> bool:
        """Block until layer `layer` of `load` is in place (True), or the load failed, the daemon died or
        `timeout_s` passed (False). The thread sleeps in poll(), never spins."""
        deadline = time.monotonic() + timeout_s
        while not self.ready(load, layer):
            if self.daemon_gone or self.status(load) == STATUS_FAILED:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for fd, events in self._poll.poll(min(left, 0.05) * 1000):
                if fd == self._lease_fd and events:
                    self._lease_lost()
                elif fd == self._wake_fd:
                    _drain(fd)
        return self.status(load) != STATUS_FAILED

    def release(self, load: StepLoad) -> None:
        """Store the load's final counter ourselves (the daemon is gone): anything waiting on it goes on. The load
        must then be reported failed."""
        self._words[counter_word(load.slot) + 1] = STATUS_FAILED
        self._words[counter_word(load.slot)] = load.final

    def _lease_lost(self) -> None:
        try:
            data = os.read(self._lease_fd, 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.daemon_gone = True
            self._poll.unregister(self._lease_fd)

    def close(self) -> None:
        self._words.release()
        self._view.release()
        with contextlib.suppress(BufferError):  # pinned (pin()): unmapped when the last pin goes
            self._map.close()
        for fd in (self._wake_fd, self._lease_fd):
            if fd >= 0:
                os.close(fd)
        self._wake_fd = self._lease_fd = -1


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 8)
