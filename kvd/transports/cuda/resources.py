"""What one GPU's engine thread owns besides its streams: pooled completion events, the ring of block indices the
kernels read from mapped pinned memory, the staging buffers, the interprocess done events handed to workers, the IPC
mappings of workers' allocations, and the completion waiters that resolve operations once their events complete.

Everything here is used by copy jobs (one at a time: DeviceEngine.call or submit) and by the engine thread while no
copy job can run (start-up, shutdown), except `EventPool.give` (waiters hand events back; deque append/pop are
atomic) and `CompletionWaiter.put`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvd.logs import Throttled
from kvd.transports.base import call_guarded
from kvd.transports.cuda.driver import (
    EVENT_DISABLE_TIMING,
    EVENT_INTERPROCESS,
    HOST_ALLOC_MAPPED,
    NOT_READY,
    SUCCESS,
    CudaError,
    Driver,
    Enqueue,
)
from kvd.types import DaemonStages

if TYPE_CHECKING:
    from kvd.transports.cuda.trace import OpTrace, Tracer

log = logging.getLogger(__name__)
_throttled = Throttled(log)  # repeating errors: one line a minute per kind
POLL_NAP_S = 0.00002


@dataclass(slots=True)
class Pending:
    """A job's result that is valid once `event`, recorded last on `stream`, has completed on the GPU."""

    event: int
    stream: int
    value: Any
    recycle: bool  # the event is ours to reuse afterwards
    stages: DaemonStages | None = None  # the waiter stamps copy_done when the event completed
    trace: OpTrace | None = None  # the chunk trace (transports.cuda_trace_path), finished by the waiter
    on_done: Callable[[], None] | None = None  # called by the waiter once the event completed (not on an error)


@dataclass(slots=True)
class Staging:
    address: int
    nbytes: int
    free: int  # event: recorded when the last reader/writer of this buffer finished
    filled: int  # event: recorded when the buffer holds a chunk ready for its next stage


class StagingRing:
    """Device buffers of one direction, used round-robin; a chunk waits on a buffer's `free` event before reuse."""

    def __init__(self, runtime: Any, base: int, count: int, chunk_bytes: int) -> None:
        self._runtime = runtime
        self.buffers = [
            Staging(
                address=base + i * chunk_bytes,
                nbytes=chunk_bytes,
                free=runtime.eventCreateWithFlags(EVENT_DISABLE_TIMING),
                filled=runtime.eventCreateWithFlags(EVENT_DISABLE_TIMING),
            )
            for i in range(count)
        ]
        self._next = 0

    def busy(self, gpu: Enqueue) -> bool:
        """Whether the chunk that took a buffer last is still in flight (that buffer's `free` not reached yet)."""
        return gpu.query(self.buffers[self._next - 1].free) == NOT_READY

    def next(self) -> Staging:
        staging = self.buffers[self._next]
        self._next = (self._next + 1) % len(self.buffers)
        return staging

    def close(self) -> None:
        for staging in self.buffers:
            self._runtime.eventDestroy(staging.free)
            self._runtime.eventDestroy(staging.filled)


class DoneEvents:
    """Interprocess events handed to workers (a load's done event), reused round-robin: reuse only makes a late
    waiter wait longer."""

    def __init__(self, runtime: Any, flags: int, count: int) -> None:
        self._runtime = runtime
        self._events: list[tuple[int, bytes]] = []
        for _ in range(count):
            event = runtime.eventCreateWithFlags(flags | EVENT_INTERPROCESS)
            self._events.append((event, runtime.ipcGetEventHandle(event)))
        self._next = 0

    def next(self) -> tuple[int, bytes]:
        event, handle = self._events[self._next]
        self._next = (self._next + 1) % len(self._events)
        return event, handle

    def close(self) -> None:
        for event, _ in self._events:
            self._runtime.eventDestroy(event)


class EventPool:
    """Reusable completion events of one device (creating one per operation costs a driver call each time). The
    engine thread takes them; the waiters give them back."""

    def __init__(self, runtime: Any, gpu: Enqueue, flags: int) -> None:
        self._runtime = runtime
        self._gpu = gpu
        self.flags = flags
        self._spare: deque[int] = deque()  # append/pop are atomic: no lock between the threads

    def record(self, stream: int) -> int:
        try:
            event = self._spare.pop()
        except IndexError:
            event = self._runtime.eventCreateWithFlags(self.flags)
        self._gpu.record(event, stream)
        return event

    def give(self, event: int) -> None:
        self._spare.append(event)

    def close(self) -> None:
        while self._spare:
            self._runtime.eventDestroy(self._spare.pop())


class IndexRing:
    """Block indices reach the gather/scatter kernels through a ring in mapped pinned memory, which the kernels read
    directly. (An upload would be one more copy queued on a copy engine, behind whole chunks of DMA; from pageable
    memory it would even let the driver synchronize with the stream, stalling this thread on a worker's forward
    pass.) A region is rewritten only after the kernel that read it has finished."""

    def __init__(self, runtime: Any, driver: Driver, gpu: Enqueue, entries: int, events: EventPool) -> None:
        self._runtime = runtime
        self._gpu = gpu
        self._events = events
        self.entries = entries
        self.host = runtime.hostAlloc(entries * 8, HOST_ALLOC_MAPPED)
        self.device = driver.device_pointer(self.host)
        self._head = 0
        self._guards: deque[tuple[int, int, int]] = deque()  # (start, end, event recorded after the reader)

    def put(self, values: Sequence[int]) -> tuple[int, int, int]:
        """Store `values` for the next kernel; (device pointer, start, end) of their region."""
        n = len(values)
        if n > self.entries:
            raise CudaError(f"{n} block indices exceed the index ring")
        if self._head + n > self.entries:
            self._head = 0
        start, end = self._head, self._head + n
        self._head = end
        for guard in list(self._guards):
            g_start, g_end, event = guard
            if g_start < end and start < g_end:
                self._runtime.eventSynchronize(event)  # rare: the ring wrapped onto work still in flight
                self._events.give(event)
                self._guards.remove(guard)
        (ctypes.c_int64 * n).from_address(self.host + start * 8)[:] = list(values)
        return self.device + start * 8, start, end

    def guard(self, start: int, end: int, stream: int) -> None:
        """Protect [start, end) until the work queued on `stream` so far (the kernel that reads it) is done."""
        self._guards.append((start, end, self._events.record(stream)))
        while self._guards and self._gpu.query(self._guards[0][2]) == SUCCESS:
            self._events.give(self._guards.popleft()[2])

    def close(self) -> None:
        for _, _, event in self._guards:
            self._events.give(event)
        self._guards.clear()
        self._runtime.freeHost(self.host)


class IpcMappings:
    """Workers' allocations mapped into the daemon, once per daemon and device (CUDA refuses to open a handle twice
    in a process), counted by reference."""

    def __init__(self, runtime: Any, driver: Driver) -> None:
        self._runtime = runtime
        self._driver = driver
        self._mappings: dict[bytes, list[int]] = {}  # IPC handle -> [device pointer, references]

    def open(self, handle: bytes, nbytes: int) -> int:
        """Map a worker's allocation, check that it really spans `nbytes`, and count the reference."""
        mapping = self._mappings.get(handle)
        if mapping is None:
            pointer = self._runtime.ipcOpenMemHandle(handle)
            mapping = [pointer, 0]
            self._mappings[handle] = mapping
        pointer = mapping[0]
        mapping[1] += 1
        base, size = self._driver.address_range(pointer)
        if pointer + nbytes > base + size:
            self.close(handle)
            raise CudaError(f"the allocation is {base + size - pointer} bytes, the worker claims {nbytes}")
        return pointer

    def close(self, handle: bytes) -> None:
        mapping = self._mappings.get(handle)
        if mapping is None:
            return
        mapping[1] -= 1
        if mapping[1] == 0:
            del self._mappings[handle]
            self._runtime.ipcCloseMemHandle(mapping[0])

    def close_all(self) -> None:
        for pointer, _ in self._mappings.values():
            self._runtime.ipcCloseMemHandle(pointer)
        self._mappings.clear()


@dataclass(frozen=True, slots=True)
class WaiterContext:
    """What a completion waiter needs of its device (all set once the engine thread has started)."""

    ordinal: int
    runtime: Any
    driver: Driver
    gpu: Enqueue
    events: EventPool
    poll: bool  # query with naps; else wait in cuEventSynchronize (spins or sleeps, as the event's flags say)
    tracer: Tracer | None = None


class CompletionWaiter:
    """Resolves the operations that complete on one stream, in the order their events were recorded (a stream
    finishes its work in order, so waiting on each in turn loses nothing). Its own thread sets the device first,
    then only waits on events (polling, spinning or asleep, as configured) and sets futures."""

    def __init__(self, context: WaiterContext, name: str) -> None:
        self._context = context
        self._queue: queue.SimpleQueue[tuple[Pending, concurrent.futures.Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def put(self, pending: Pending, future: concurrent.futures.Future[Any]) -> None:
        self._queue.put((pending, future))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _main(self) -> None:
        context = self._context
        context.runtime.setDevice(context.ordinal)  # first, before any other CUDA call on this thread
        driver, gpu, events, poll = context.driver, context.gpu, context.events, context.poll
        while (item := self._queue.get()) is not None:
            pending, future = item
            if poll:
                # A query holds the GIL for a microsecond; the nap releases it. (cuEventSynchronize would spin.)
                while (status := gpu.query(pending.event)) == NOT_READY:
                    time.sleep(POLL_NAP_S)
            else:
                status = driver.event_synchronize(pending.event)  # spins or sleeps, as the event's flags say
            if pending.stages is not None:
                pending.stages.copy_done_ns = time.monotonic_ns()
            if pending.recycle:
                events.give(pending.event)
            if pending.on_done is not None and status == 0:
                call_guarded(pending.on_done, "on-done")
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # resolved elsewhere already
                if status == 0:
                    future.set_result(pending.value)
                else:
                    future.set_exception(CudaError(f"GPU {context.ordinal}: copy failed with CUresult {status}"))
            if pending.trace is not None and context.tracer is not None and status == 0:
                self._trace(context.tracer, pending.trace, pending.stages)  # after: it never delays the operation

    @staticmethod
    def _trace(tracer: Tracer, trace: OpTrace, stages: DaemonStages | None) -> None:
        """A diagnostic never fails an operation."""
        try:
            tracer.finish(trace, stages)
        except Exception:
            _throttled.exception("trace", "chunk trace")
