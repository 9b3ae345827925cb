"""One engine thread per GPU. It sets its device before any CUDA call and owns everything of that device: streams,
events, staging buffers, gather/scatter kernels and the IPC mappings of workers' KV caches. Nothing here is shared
across devices; besides the engine thread, only its completion waiters (which also set the device first) make CUDA
calls on it, and they only wait on events.

The engine thread never waits for the GPU: a job (`save_job`, `load_job`, below, next to the resources they use)
only *enqueues* work (stream waits, a gather kernel, DMA copies, an event record) and returns a pending completion,
which goes to the waiter of the stream it completes on. A waiter waits for each event in turn (polling with short
naps, spinning in the driver, or asleep on a blocking-sync event: cuda_completion_wait) and resolves the
operation's future once its copies are done. So many operations are in flight at once: saves pipeline on one copy
engine (D2H) while loads use the other (H2D), and small requests keep the link busy instead of queueing behind each
other. Work is queued through the driver API with the GIL held (driver.Enqueue): each call takes microseconds, and
dropping the GIL around each would queue this thread behind the event loop once per call.

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
from kvd.transports.cuda.driver import (
    EVENT_BLOCKING_SYNC,
    EVENT_DISABLE_TIMING,
    HOST_REGISTER_PORTABLE,
    STREAM_NON_BLOCKING,
    CudaError,
    Driver,
    Enqueue,
)
from kvd.transports.cuda.kernels import MAX_GRID_Y, Kernels, launch_chunk, load_kernels, slot_runs
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
from kvd.transports.cuda.trace import NO_TRACE, ChunkTrace, Tracer, traced
from kvd.transports.cuda.vmm import VmmMappings
from kvd.types import CudaAllocation, CudaMemory, DaemonStages

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DONE_EVENT_RING = 128  # interprocess events handed to workers; reuse only makes a late waiter wait longer
INDEX_RING_ENTRIES = 1 << 20  # block indices in flight to the kernels (8 MiB of mapped pinned memory)
Job = tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any], DaemonStages | None]


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
        self.kernel_ctas = kernel_ctas  # a cap on each gather/scatter launch's CTAs (0: none)
        self._trace_path = trace_path  # the chunk trace's file (a diagnostic; see trace.py), or None: off
        self.completion_wait = wait
        # Completion events: blocking-sync ones let a BLOCK waiter sleep in the driver; others spin in it.
        self._completion_flags = EVENT_DISABLE_TIMING | (EVENT_BLOCKING_SYNC if wait is CompletionWait.BLOCK else 0)
        self.chunk_bytes = chunk_bytes
        self._staging_bytes = staging_bytes
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
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
        self._jobs.put((lambda: None, (), concurrent.futures.Future(), None))
        self._thread.join(timeout=30)

    def call(
        self, fn: Callable[..., Any], *args: Any, stages: DaemonStages | None = None
    ) -> concurrent.futures.Future[Any]:
        """Run fn(*args) on the engine thread. `stages`: an operation's stamps; the engine stamps when its job began
        and ended (enqueue_start, enqueue_end) and the completion waiter when its GPU work was done (copy_done)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, args, future, stages))
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
        fn, args, future, stages = job
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
        """What a layer-ordered load (layered.py) shares with load_job: staging, done events, the load waiter."""
        ring, events = self._started_part(self._load_ring), self._started_part(self._done_events)
        return ring, events, self._waiters[self.load_stream]

    def save_job(
        self, mapping: WorkerMapping, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes
    ) -> Pending:
        gpu, ring, block_bytes = self.gpu, self._started_part(self._save_ring), mapping.block_bytes
        trace = self._trace("save")
        if ready_event:
            gpu.wait(self.save_stream, self.worker_event(mapping, ready_event))
        step = mapping.chunk_blocks
        for start in range(0, len(block_indices), step):
            chunk = block_indices[start : start + step]
            staging = ring.next()
            gpu.wait(self.save_stream, staging.free)  # its previous D2H is done
            trace.mark(self.save_stream)
            self._launch(self.kernels.gather, self.save_stream, mapping, chunk, staging.address)
            trace.mark(self.save_stream)
            gpu.record(staging.filled, self.save_stream)
            gpu.wait(self.d2h_stream, staging.filled)
            trace.mark(self.d2h_stream)
            runs = slot_runs(addresses[start : start + step], block_bytes)
            for first, host, nbytes in runs:
                gpu.d2h(host, staging.address + first * block_bytes, nbytes, self.d2h_stream)
            trace.mark(self.d2h_stream)
            trace.chunk(len(chunk), len(runs))
            gpu.record(staging.free, self.d2h_stream)
        return Pending(self.events.record(self.d2h_stream), self.d2h_stream, b"", True, trace=traced(trace))

    def load_job(
        self, mapping: WorkerMapping, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes
    ) -> Pending:
        gpu, ring, block_bytes = self.gpu, self._started_part(self._load_ring), mapping.block_bytes
        worker = self.worker_event(mapping, ready_event) if ready_event else 0
        trace = self._trace("load")
        step = mapping.chunk_blocks
        for start in range(0, len(block_indices), step):
            chunk = block_indices[start : start + step]
            staging = ring.next()
            gpu.wait(self.h2d_stream, staging.free)  # its previous scatter is done
            trace.mark(self.h2d_stream)
            runs = slot_runs(addresses[start : start + step], block_bytes)
            for first, host, nbytes in runs:
                gpu.h2d(staging.address + first * block_bytes, host, nbytes, self.h2d_stream)
            trace.mark(self.h2d_stream)
            trace.chunk(len(chunk), len(runs))
            gpu.record(staging.filled, self.h2d_stream)
            gpu.wait(self.load_stream, staging.filled)
            if worker and start == 0:
                gpu.wait(self.load_stream, worker)  # nothing queued before may still read them
            trace.mark(self.load_stream)
            self._launch(self.kernels.scatter, self.load_stream, mapping, chunk, staging.address)
            trace.mark(self.load_stream)
            gpu.record(staging.free, self.load_stream)
        event, handle = self._started_part(self._done_events).next()
        gpu.record(event, self.load_stream)
        return Pending(event, self.load_stream, handle, recycle=False, trace=traced(trace))

    def _launch(self, kernel: int, stream: int, mapping: WorkerMapping, chunk: Sequence[int], staging: int) -> None:
        launch_chunk(self.gpu, self.indices, kernel, stream, mapping, chunk, staging, self.kernel_ctas)

    def _trace(self, kind: str) -> ChunkTrace:
        return self._tracer.begin(kind) if self._tracer is not None else NO_TRACE
