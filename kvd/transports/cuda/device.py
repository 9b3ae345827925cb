"""One engine per GPU. Its thread sets its device before any CUDA call and creates everything of that device: streams,
events, staging buffers, gather/scatter kernels and the IPC mappings of workers' KV caches. Nothing here is shared
across devices. Besides the engine thread, its completion waiters make CUDA calls on it (they only wait on events), and,
with transports.cuda_queue_on_loop (the default), the thread that queues copy jobs (the daemon's event loop, one job at
a time under a lock); each sets the device first.

A copy job (copies.save_job and load_job, layered.load_layers_job) never waits for the GPU: it only *enqueues* work
(stream waits, a gather kernel, DMA copies, an event record) and returns a pending completion, which goes to the waiter
of the stream it completes on. With transports.cuda_queue_on_loop (the default) it runs where the operation was
planned, in the caller's thread (`submit`): no hop to another thread and no wait for the GIL between a request's
planning and its first copy; without it, on the engine thread (`call`), where the calls that may block always run
(mapping a worker's memory, unmapping it after synchronizing the streams, page-locking the pool, shutting down).
A waiter waits for each event in turn (polling with short naps, spinning in the driver, or asleep on a blocking-sync
event: cuda_completion_wait) and resolves the operation's future once its copies are done. So many operations are in
flight at once: saves pipeline on one copy engine (D2H) while loads use the other (H2D), and small requests keep the
link busy instead of queueing behind each other. Work is queued through the driver API with the GIL held
(driver.Enqueue): each call takes microseconds, and dropping the GIL around each would queue for it again once per call.

Data path of a save chunk:  [save stream]  wait(worker's ready event) -> wait(staging slot free) -> gather kernel
                            [d2h stream]   wait(gathered) -> cuMemcpyDtoHAsync runs into pinned host slots -> free slot
Load chunk:                 [h2d stream]   wait(slot free) -> cuMemcpyHtoDAsync runs from pinned slots -> loaded
                            [load stream]  wait(loaded) -> wait(worker's ready event) -> scatter kernel -> free slot
The kernels read their block indices straight from mapped pinned memory: no index upload queues on a copy engine
behind a chunk's DMA (which would hold a save's gather back while loads stream in).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kvd_client.fdpass import close_fds
from kvd_client.layout import KvLayout

from kvd.config import CompletionWait
from kvd.transports.base import call_guarded
from kvd.transports.cuda.driver import (
    EVENT_BLOCKING_SYNC,
    EVENT_DISABLE_TIMING,
    HOST_REGISTER_PORTABLE,
    STREAM_NON_BLOCKING,
    CudaError,
    Driver,
    Enqueue,
)
from kvd.transports.cuda.kernels import MAX_GRID_Y, Kernels, load_kernels
from kvd.transports.cuda.mapping import WorkerMapping
from kvd.transports.cuda.resources import (
    CompletionWaiter,
    DoneEvents,
    EventPool,
    IndexRing,
    IpcMappings,
    Pending,
    StagingRing,
    WaiterContext,
)
from kvd.transports.cuda.trace import NO_TRACE, ChunkTrace, Tracer
from kvd.transports.cuda.vmm import VmmMappings
from kvd.types import CudaAllocation, CudaMemory, DaemonStages

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DONE_EVENT_RING = 128  # interprocess events handed to workers; reuse only makes a late waiter wait longer
INDEX_RING_ENTRIES = 1 << 20  # block indices in flight to the kernels (8 MiB of mapped pinned memory)
# (job, its arguments, its future, the operation's stamps, what to run once its copies are queued)
Job = tuple[
    Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any], DaemonStages | None, Callable[[], None] | None
]


class DeviceEngine:
    """The thread that owns one GPU. `call(fn, *args)` runs fn on it and returns a future for its result."""

    def __init__(
        self,
        ordinal: int,
        chunk_bytes: int,
        staging_bytes: int,
        wait: CompletionWait = CompletionWait.POLL,
        trace_path: Path | None = None,
        kernel_ctas: int = 0,
    ) -> None:
        self.ordinal = ordinal
        self.kernel_ctas = kernel_ctas  # a cap on a gather/scatter launch's CTAs beside DMA (0: none): chunk_ctas
        self._trace_path = trace_path  # the chunk trace's file (a diagnostic; see trace.py), or None: off
        self.completion_wait = wait
        # Completion events: blocking-sync ones let a BLOCK waiter sleep in the driver; others spin in it.
        self._completion_flags = EVENT_DISABLE_TIMING | (EVENT_BLOCKING_SYNC if wait is CompletionWait.BLOCK else 0)
        self.chunk_bytes = chunk_bytes
        self._staging_bytes = staging_bytes
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._submitting = threading.Lock()  # a copy job in a caller's thread vs the engine starting to stop
        self._thread = threading.Thread(target=self._main, name=f"kvd-cuda{ordinal}", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self._closing = False  # set on the engine thread: every later job fails
        self.uuid = ""
        # Set on the engine thread in _init:
        self.runtime: Any = None
        self.cupy: Any = None
        self.save_stream = self.d2h_stream = self.h2d_stream = self.load_stream = 0
        self._staging_base = 0
        self._save_ring: StagingRing | None = None
        self._load_ring: StagingRing | None = None
        self._waiters: dict[int, CompletionWaiter] = {}  # completion stream -> its waiter
        self._done_events: DoneEvents | None = None
        self._kernels: Kernels | None = None
        self._driver: Driver | None = None
        self._gpu: Enqueue | None = None
        self._events: EventPool | None = None
        self._mappings: IpcMappings | None = None
        self._vmm: VmmMappings | None = None
        self._indices: IndexRing | None = None
        self._tracer: Tracer | None = None

    # The driver bindings, the pools and the rings exist once the engine thread has set the device (in _init).

    @property
    def driver(self) -> Driver:
        return self._started_part(self._driver)

    @property
    def gpu(self) -> Enqueue:
        return self._started_part(self._gpu)

    @property
    def events(self) -> EventPool:
        return self._started_part(self._events)

    @property
    def indices(self) -> IndexRing:
        return self._started_part(self._indices)

    @property
    def kernels(self) -> Kernels:
        return self._started_part(self._kernels)

    def _started_part(self, part: _T | None) -> _T:
        if part is None:
            raise CudaError(f"GPU {self.ordinal}: the engine has not started")
        return part

    # -- lifecycle (any thread) ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise CudaError(f"GPU {self.ordinal}: {self._start_error}") from self._start_error

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        # Refuse new work and let the GPU finish; then the waiters resolve what is left and exit; only then are the
        # events they wait on destroyed.
        self.call(self._quiesce).result(timeout=30)
        for waiter in self._waiters.values():
            waiter.stop()
        self.call(self._shutdown).result(timeout=30)
        self._stopping = True
        self._jobs.put((lambda: None, (), concurrent.futures.Future(), None, None))
        self._thread.join(timeout=30)

    def call(
        self, fn: Callable[..., Any], *args: Any, stages: DaemonStages | None = None,
        then: Callable[[], None] | None = None,
    ) -> concurrent.futures.Future[Any]:  # fmt: skip
        """Run fn(*args) on the engine thread. `stages`: an operation's stamps; the engine stamps when its job began
        and ended (enqueue_start, enqueue_end) and the completion waiter when its GPU work was done (copy_done).
        `then`: for a copy job, run on the same thread once its GPU work is queued (while it runs)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, args, future, stages, then))
        return future

    def submit(
        self, job: Callable[..., Any], *args: Any, stages: DaemonStages | None = None,
        then: Callable[[], None] | None = None,
    ) -> concurrent.futures.Future[Any]:  # fmt: skip
        """Run a copy job (one that only queues GPU work) now, in the caller's thread; the future resolves when its
        GPU work is done (its completion waiter sets it). Jobs submitted from one thread queue in submission order."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if not self._started.is_set() or self._start_error is not None:
            future.set_exception(CudaError(f"GPU {self.ordinal}: the engine has not started"))
            return future
        with self._submitting:
            self.runtime.setDevice(self.ordinal)  # this thread's device, before any CUDA call of the job
            self._execute((job, args, future, stages, then))
        return future

    # -- the engine thread ---------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._init()
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        while not self._stopping:
            self._execute(self._jobs.get())

    def _init(self) -> None:
        import cupy
        from cupy.cuda import runtime

        runtime.setDevice(self.ordinal)  # first, before any other CUDA call on this thread
        self.runtime, self.cupy = runtime, cupy
        self._driver = driver = Driver()
        self._gpu = gpu = Enqueue()
        self._events = events = EventPool(runtime, gpu, self._completion_flags)
        self._mappings = IpcMappings(runtime, driver)
        self._vmm = VmmMappings(self.ordinal)
        self.uuid = driver.uuid(self.ordinal)
        self.save_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.d2h_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.h2d_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.load_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self._kernels = load_kernels(cupy)
        per_direction = max(1, (self._staging_bytes // 2) // self.chunk_bytes)
        self._staging_base = base = runtime.malloc(per_direction * 2 * self.chunk_bytes)
        self._save_ring = StagingRing(runtime, base, per_direction, self.chunk_bytes)
        self._load_ring = StagingRing(runtime, base + per_direction * self.chunk_bytes, per_direction, self.chunk_bytes)
        self._indices = IndexRing(runtime, driver, gpu, INDEX_RING_ENTRIES, events)
        self._done_events = DoneEvents(runtime, self._completion_flags, DONE_EVENT_RING)
        # Saves complete on the D2H stream, loads on the load stream: one waiter each.
        poll = self.completion_wait is CompletionWait.POLL
        if self._trace_path is not None:
            header = {"device": self.ordinal, "chunk_bytes": self.chunk_bytes, "buffers_per_direction": per_direction}
            self._tracer = Tracer(self._trace_path, runtime, gpu, header)
        context = WaiterContext(self.ordinal, runtime, driver, gpu, events, poll, self._tracer)
        for stream, name in ((self.d2h_stream, "save"), (self.load_stream, "load")):
            self._waiters[stream] = CompletionWaiter(context, f"kvd-cuda{self.ordinal}-{name}-done")
        ready = "GPU %d (%s): engine thread ready, %d+%d staging buffers of %d MiB"
        log.info(ready, self.ordinal, self.uuid, per_direction, per_direction, self.chunk_bytes >> 20)

    def _quiesce(self) -> None:
        with self._submitting:  # no copy job is being queued from another thread, and none will be
            self._closing = True
        self.runtime.deviceSynchronize()

    def _shutdown(self) -> None:
        runtime = self.runtime
        if self._mappings is not None:
            self._mappings.close_all()
        if self._vmm is not None:
            self._vmm.close_all()
        for ring in (self._save_ring, self._load_ring):
            if ring is not None:
                ring.close()
        if self._done_events is not None:
            self._done_events.close()
        runtime.free(self._staging_base)
        if self._indices is not None:
            self._indices.close()
        self.events.close()
        if self._tracer is not None:
            self._tracer.close()
        for stream in (self.save_stream, self.d2h_stream, self.h2d_stream, self.load_stream):
            runtime.streamDestroy(stream)

    def _execute(self, job: Job) -> None:
        fn, args, future, stages, then = job
        if not future.set_running_or_notify_cancel():
            return
        if self._closing and fn != self._shutdown:
            future.set_exception(CudaError(f"GPU {self.ordinal}: the engine is stopping"))
            return
        if stages is not None:
            stages.enqueue_start_ns = time.monotonic_ns()
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
            return
        if not isinstance(result, Pending):
            future.set_result(result)
            return
        if stages is not None:
            stages.enqueue_end_ns = time.monotonic_ns()
            result.stages = stages
        waiter = self._waiters.get(result.stream)
        if waiter is None:
            future.set_exception(CudaError(f"no completion waiter for stream {result.stream:#x}"))
            return
        waiter.put(result, future)
        if then is not None:
            call_guarded(then, "while-copying")  # never fails the copy, which is under way

    # -- host memory (engine thread) -----------------------------------------------------------------------------

    def register_host(self, address: int, nbytes: int) -> None:
        self.runtime.hostRegister(address, nbytes, HOST_REGISTER_PORTABLE)

    def unregister_host(self, address: int) -> None:
        self.runtime.hostUnregister(address)

    # -- a worker's KV cache (engine-thread jobs) ----------------------------------------------------------------

    def open_worker(self, memory: CudaMemory, layout: KvLayout) -> WorkerMapping:
        """Map the worker's allocations and upload the segment tables its copies read."""
        mapping = WorkerMapping(layout, max(1, min(MAX_GRID_Y, self.chunk_bytes // layout.block_bytes)))
        fds = memory.fds.take()  # ours now: imported below, closed after (the imports hold the memory)
        try:
            pointers = [self._open_allocation(mapping, allocation, fds) for allocation in memory.allocations]
        except Exception:
            self.close_worker(mapping)
            raise
        finally:
            close_fds(fds)
        columns = mapping.segment_columns([pointers[layer.allocation] + layer.offset for layer in memory.layers])
        # Uploaded on the legacy default stream, which our non-blocking streams never wait for or block.
        cupy = self.cupy
        mapping.tables = tuple(cupy.asarray(values, dtype=cupy.uint64) for values in columns)
        self.runtime.streamSynchronize(0)
        return mapping

    def _open_allocation(self, mapping: WorkerMapping, allocation: CudaAllocation, fds: Sequence[int]) -> int:
        if allocation.vmm_chunks:
            mapped = self._started_part(self._vmm).open(allocation, fds)
            mapping.vmm_ranges.append(mapped)
            return mapped.base
        pointer = self._started_part(self._mappings).open(allocation.ipc_handle, allocation.nbytes)
        mapping.opened.append(allocation.ipc_handle)
        return pointer

    def close_worker(self, mapping: WorkerMapping) -> None:
        runtime = self.runtime
        for stream in (self.save_stream, self.load_stream):
            runtime.streamSynchronize(stream)  # nothing of ours may still touch the mapping
        for event in mapping.worker_events.values():
            runtime.eventDestroy(event)
        mapping.worker_events.clear()
        for handle in mapping.opened:
            self._started_part(self._mappings).close(handle)
        mapping.opened.clear()
        for mapped in mapping.vmm_ranges:
            self._started_part(self._vmm).close(mapped)
        mapping.vmm_ranges.clear()
        for host in mapping.progress_pages:  # registered by its in-step loads (layered.py)
            runtime.hostUnregister(host)
        mapping.progress_pages.clear()
        mapping.tables = mapping.layer_parts = None

    def worker_event(self, mapping: WorkerMapping, handle: bytes) -> int:
        event = mapping.worker_events.get(handle)
        if event is None:
            event = self.runtime.ipcOpenEventHandle(handle)
            mapping.worker_events[handle] = event
        return event

    def load_parts(self) -> tuple[StagingRing, DoneEvents, CompletionWaiter]:
        """What a load (copies.load_job, layered.py) uses: staging, done events, the load waiter."""
        ring, events = self._started_part(self._load_ring), self._started_part(self._done_events)
        return ring, events, self._waiters[self.load_stream]

    def chunk_ctas(self, ring: StagingRing, more_follow: bool = False) -> int:
        """The CTA cap for the kernel of the chunk about to take a buffer of `ring`: `kernel_ctas` while DMA of the
        same direction runs beside it (an earlier chunk still in flight, or, `more_follow`, later chunks of the same
        job), where an uncapped kernel would take device memory's bandwidth from the copy engine; none for a chunk
        alone, whose kernel is on the request's critical path and finishes soonest on every SM."""
        cap = self.kernel_ctas
        if cap <= 0:
            return 0
        return cap if more_follow or ring.busy(self.gpu) else 0

    def save_ring(self) -> StagingRing:
        return self._started_part(self._save_ring)

    def trace(self, kind: str) -> ChunkTrace:
        """A copy job's chunk trace (a no-op unless transports.cuda_trace_path is set)."""
        return self._tracer.begin(kind) if self._tracer is not None else NO_TRACE
