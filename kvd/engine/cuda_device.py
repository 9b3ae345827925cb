"""One engine thread per GPU. It sets its device before any CUDA call and owns everything of that device: streams,
events, staging buffers, gather/scatter kernels and the IPC mappings of workers' KV caches. Nothing here is shared
across devices; besides the engine thread, only its completion waiters (which also set the device first) make CUDA
calls on it, and they only wait on events.

The engine thread never waits for the GPU: a job only *enqueues* work (stream waits, a gather kernel, DMA copies, an
event record) and returns a pending completion, which goes to the waiter of the stream it completes on. A waiter
waits for each event in turn (polling with short naps, spinning in the driver, or asleep on a blocking-sync event:
engine.cuda_completion_wait) and resolves the operation's future once its copies are done. So many operations are
in flight at once: saves pipeline on one copy engine (D2H) while loads use the other (H2D), and small requests keep
the link busy instead of queueing behind each other. Work is queued through the driver API with the GIL held
(_Enqueue): each call takes microseconds, and dropping the GIL around each would queue this thread behind the event
loop once per call.

Data path of a save chunk:  [save stream]  wait(worker's ready event) -> wait(staging slot free) -> gather kernel
                            [d2h stream]   wait(gathered) -> cuMemcpyDtoHAsync runs into pinned host slots -> free slot
Load chunk:                 [h2d stream]   wait(slot free) -> cuMemcpyHtoDAsync runs from pinned slots -> loaded
                            [load stream]  wait(loaded) -> wait(worker's ready event) -> scatter kernel -> free slot
The kernels read their block indices straight from mapped pinned memory: no index upload queues on a copy engine
behind a chunk's DMA (which would hold a save's gather back while loads stream in).
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
from typing import Any, TypeVar

from kvd.config import CompletionWait

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STREAM_NON_BLOCKING = 0x1
EVENT_BLOCKING_SYNC = 0x1
EVENT_DISABLE_TIMING = 0x2
EVENT_INTERPROCESS = 0x4
HOST_REGISTER_PORTABLE = 0x1
HOST_ALLOC_MAPPED = 0x2
SUCCESS = 0
NOT_READY = 600
POLL_NAP_S = 0.00002
MAX_GRID_Y = 65_535
THREADS_PER_BLOCK = 256
DONE_EVENT_RING = 128  # interprocess events handed to workers; reuse only makes a late waiter wait longer
INDEX_RING_ENTRIES = 1 << 20  # block indices in flight to the kernels (8 MiB of mapped pinned memory)

_KERNELS = r"""
__device__ __forceinline__ void kvd_copy(unsigned char* dst, const unsigned char* src,
                                         unsigned long long len, int vec16) {
    if (vec16) {
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        const unsigned long long n = len >> 4;
        for (unsigned long long k = threadIdx.x; k < n; k += blockDim.x) d[k] = s[k];
    } else {
        for (unsigned long long k = threadIdx.x; k < len; k += blockDim.x) dst[k] = src[k];
    }
}

// blockIdx.x: one (layer, segment) of a block; blockIdx.y: one block of the chunk.
extern "C" __global__ void kvd_gather(const unsigned long long* seg_base, const unsigned long long* seg_len,
                                      const unsigned long long* seg_off, const long long* blocks,
                                      unsigned long long block_bytes, unsigned char* staging, int vec16) {
    const unsigned long long len = seg_len[blockIdx.x];
    const unsigned char* src = reinterpret_cast<const unsigned char*>(
        seg_base[blockIdx.x] + static_cast<unsigned long long>(blocks[blockIdx.y]) * len);
    unsigned char* dst = staging + static_cast<unsigned long long>(blockIdx.y) * block_bytes + seg_off[blockIdx.x];
    kvd_copy(dst, src, len, vec16);
}

extern "C" __global__ void kvd_scatter(const unsigned long long* seg_base, const unsigned long long* seg_len,
                                       const unsigned long long* seg_off, const long long* blocks,
                                       unsigned long long block_bytes, const unsigned char* staging, int vec16) {
    const unsigned long long len = seg_len[blockIdx.x];
    unsigned char* dst = reinterpret_cast<unsigned char*>(
        seg_base[blockIdx.x] + static_cast<unsigned long long>(blocks[blockIdx.y]) * len);
    const unsigned char* src = staging + static_cast<unsigned long long>(blockIdx.y) * block_bytes
                               + seg_off[blockIdx.x];
    kvd_copy(dst, src, len, vec16);
}
"""


class CudaEngineError(RuntimeError):
    pass


@dataclass(slots=True)
class Pending:
    """A job's result that is valid once `event`, recorded last on `stream`, has completed on the GPU."""

    event: int
    stream: int
    value: Any
    recycle: bool  # the event is ours to reuse afterwards


@dataclass(slots=True)
class _Staging:
    address: int
    nbytes: int
    free: int  # event: recorded when the last reader/writer of this buffer finished
    filled: int  # event: recorded when the buffer holds a chunk ready for its next stage


class _IndexRing:
    """Block indices reach the gather/scatter kernels through a ring in mapped pinned memory, which the kernels read
    directly. (An upload would be one more copy queued on a copy engine, behind whole chunks of DMA; from pageable
    memory it would even let the driver synchronize with the stream, stalling this thread on a worker's forward
    pass.) A region is rewritten only after the kernel that read it has finished."""

    def __init__(self, runtime: Any, driver: _Driver, gpu: _Enqueue, entries: int, events: _EventPool) -> None:
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
            raise CudaEngineError(f"{n} block indices exceed the index ring")
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


class _EventPool:
    """Reusable completion events of one device (creating one per operation costs a driver call each time). The
    engine thread takes them; the waiters give them back."""

    def __init__(self, runtime: Any, gpu: _Enqueue, flags: int) -> None:
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


class _CompletionWaiter:
    """Resolves the operations that complete on one stream, in the order their events were recorded (a stream
    finishes its work in order, so waiting on each in turn loses nothing). Its own thread sets the device first,
    then only waits on events (as engine.cuda_completion_wait says) and sets futures."""

    def __init__(self, engine: DeviceEngine, name: str) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[tuple[Pending, concurrent.futures.Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def put(self, pending: Pending, future: concurrent.futures.Future[Any]) -> None:
        self._queue.put((pending, future))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _main(self) -> None:
        engine = self._engine
        engine.runtime.setDevice(engine.ordinal)  # first, before any other CUDA call on this thread
        driver, gpu, events = engine.driver, engine.gpu, engine.events
        poll = engine.completion_wait is CompletionWait.POLL
        while (item := self._queue.get()) is not None:
            pending, future = item
            if poll:
                # A query holds the GIL for a microsecond; the nap releases it. (cuEventSynchronize would spin.)
                while (status := gpu.query(pending.event)) == NOT_READY:
                    time.sleep(POLL_NAP_S)
            else:
                status = driver.event_synchronize(pending.event)  # spins or sleeps, as the event's flags say
            if pending.recycle:
                events.give(pending.event)
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # resolved elsewhere already
                if status == 0:
                    future.set_result(pending.value)
                else:
                    future.set_exception(CudaEngineError(f"GPU {engine.ordinal}: copy failed with CUresult {status}"))


class _Enqueue:
    """The engine thread's hot path: stream waits, event records, async copies and kernel launches through the
    driver API with the GIL *held* (ctypes.PyDLL). Each call only queues work and takes microseconds; releasing the
    GIL around each (as cupy and ctypes.CDLL do) would make this thread queue for the GIL once per call behind the
    event loop's protobuf work, up to a switch interval each time: a 1 GiB save is ~130 such calls."""

    def __init__(self) -> None:
        lib = ctypes.PyDLL("libcuda.so.1")
        vp, u64, uint = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint
        self._wait = lib.cuStreamWaitEvent
        self._wait.argtypes = [vp, vp, uint]
        self._record = lib.cuEventRecord
        self._record.argtypes = [vp, vp]
        self._query = lib.cuEventQuery
        self._query.argtypes = [vp]
        self._d2h = lib.cuMemcpyDtoHAsync_v2
        self._d2h.argtypes = [vp, u64, ctypes.c_size_t, vp]
        self._h2d = lib.cuMemcpyHtoDAsync_v2
        self._h2d.argtypes = [u64, vp, ctypes.c_size_t, vp]
        self._launch = lib.cuLaunchKernel
        self._launch.argtypes = [vp, uint, uint, uint, uint, uint, uint, uint, vp, vp, vp]

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise CudaEngineError(f"{what} failed: CUresult {status}")

    def wait(self, stream: int, event: int) -> None:
        self._check(self._wait(stream, event, 0), "cuStreamWaitEvent")

    def record(self, event: int, stream: int) -> None:
        self._check(self._record(event, stream), "cuEventRecord")

    def query(self, event: int) -> int:
        """0 when complete, 600 (CUDA_ERROR_NOT_READY) while pending, else the error."""
        return int(self._query(event))

    def d2h(self, host: int, device: int, nbytes: int, stream: int) -> None:
        self._check(self._d2h(host, device, nbytes, stream), "cuMemcpyDtoHAsync")

    def h2d(self, device: int, host: int, nbytes: int, stream: int) -> None:
        self._check(self._h2d(device, host, nbytes, stream), "cuMemcpyHtoDAsync")

    def launch(self, function: int, grid: tuple[int, int], threads: int, stream: int, *args: Any) -> None:
        """Launch `function` (a CUfunction) with ctypes scalar `args`, in order."""
        params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
        self._check(
            self._launch(function, grid[0], grid[1], 1, threads, 1, 1, 0, stream, params, None), "cuLaunchKernel"
        )


class _Driver:
    """The few driver-API calls the runtime API lacks (ctypes on libcuda; the process already loaded it)."""

    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libcuda.so.1")
        self._range = getattr(self._lib, "cuMemGetAddressRange_v2", None) or self._lib.cuMemGetAddressRange
        self._range.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        self._uuid = getattr(self._lib, "cuDeviceGetUuid_v2", None) or self._lib.cuDeviceGetUuid
        self._uuid.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._device = self._lib.cuDeviceGet
        self._device.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self._host_pointer = getattr(self._lib, "cuMemHostGetDevicePointer_v2", None) or (
            self._lib.cuMemHostGetDevicePointer
        )
        self._host_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        # ctypes drops the GIL around the call: a waiter asleep here never holds up the daemon's other threads.
        self._event_sync = self._lib.cuEventSynchronize
        self._event_sync.argtypes = [ctypes.c_void_p]

    def address_range(self, pointer: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        status = self._range(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer))
        if status != 0:
            raise CudaEngineError(f"cuMemGetAddressRange({pointer:#x}) failed: CUresult {status}")
        return base.value, size.value

    def device_pointer(self, host: int) -> int:
        """The device address of mapped pinned host memory (the same address under unified addressing)."""
        pointer = ctypes.c_uint64()
        status = self._host_pointer(ctypes.byref(pointer), ctypes.c_void_p(host), 0)
        if status != 0:
            raise CudaEngineError(f"cuMemHostGetDevicePointer failed: CUresult {status}")
        return pointer.value

    def event_synchronize(self, event: int) -> int:
        """Block until `event` completed; the CUresult (0: success)."""
        return int(self._event_sync(ctypes.c_void_p(event)))

    def uuid(self, ordinal: int) -> str:
        device = ctypes.c_int()
        if self._device(ctypes.byref(device), ordinal) != 0:
            raise CudaEngineError(f"cuDeviceGet({ordinal}) failed")
        raw = ctypes.create_string_buffer(16)
        if self._uuid(raw, device.value) != 0:
            raise CudaEngineError(f"cuDeviceGetUuid({ordinal}) failed")
        return raw.raw.hex()


def _function_pointer(kernel: Any) -> int:
    """The CUfunction behind a cupy kernel (RawModule.get_function gives a RawKernel wrapping a Function)."""
    function = getattr(kernel, "kernel", kernel)
    pointer = int(getattr(function, "ptr", 0) or 0)
    if not pointer:
        raise CudaEngineError(f"no CUfunction behind {type(kernel).__name__}")
    return pointer


def normalize_uuid(uuid: str) -> str:
    """'GPU-1a2b…' / '1a2b3c4d-…' / 32 hex digits -> 32 lowercase hex digits."""
    return uuid.lower().removeprefix("gpu-").replace("-", "")


class DeviceEngine:
    """The thread that owns one GPU. `call(fn, *args)` runs fn on it and returns a future for its result."""

    def __init__(
        self, ordinal: int, chunk_bytes: int, staging_bytes: int, wait: CompletionWait = CompletionWait.POLL
    ) -> None:
        self.ordinal = ordinal
        self.completion_wait = wait
        # Completion events: blocking-sync ones let a BLOCK waiter sleep in the driver; others spin in it.
        self._completion_flags = EVENT_DISABLE_TIMING | (EVENT_BLOCKING_SYNC if wait is CompletionWait.BLOCK else 0)
        self.chunk_bytes = chunk_bytes
        self._staging_bytes = staging_bytes
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]]
        self._jobs = queue.SimpleQueue()
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
        self._save_ring: list[_Staging] = []
        self._load_ring: list[_Staging] = []
        self._save_next = self._load_next = 0
        self._waiters: dict[int, _CompletionWaiter] = {}  # completion stream -> its waiter
        self._done_events: list[tuple[int, bytes]] = []
        self._done_next = 0
        self._module: Any = None
        self.gather = self.scatter = 0  # CUfunction handles
        self._driver: _Driver | None = None
        self._gpu: _Enqueue | None = None
        self._events: _EventPool | None = None
        self._mappings: dict[bytes, list[int]] = {}  # IPC handle -> [device pointer, references]
        self.indices: _IndexRing | None = None

    # The driver bindings and the event pool exist once the engine thread has set the device (in _init).

    @property
    def driver(self) -> _Driver:
        return self._started_part(self._driver)

    @property
    def gpu(self) -> _Enqueue:
        return self._started_part(self._gpu)

    @property
    def events(self) -> _EventPool:
        return self._started_part(self._events)

    def _started_part(self, part: _T | None) -> _T:
        if part is None:
            raise CudaEngineError(f"GPU {self.ordinal}: the engine has not started")
        return part

    # -- lifecycle (any thread) ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise CudaEngineError(f"GPU {self.ordinal}: {self._start_error}") from self._start_error

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
        self._jobs.put((lambda: None, (), concurrent.futures.Future()))
        self._thread.join(timeout=30)

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, args, future))
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
        self._driver = driver = _Driver()
        self._gpu = gpu = _Enqueue()
        self._events = events = _EventPool(runtime, gpu, self._completion_flags)
        self.uuid = driver.uuid(self.ordinal)
        self.save_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.d2h_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.h2d_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.load_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        module = cupy.RawModule(code=_KERNELS, options=("--std=c++17",))
        self._module = module  # keeps the kernels loaded
        self.gather = _function_pointer(module.get_function("kvd_gather"))
        self.scatter = _function_pointer(module.get_function("kvd_scatter"))
        per_direction = max(1, (self._staging_bytes // 2) // self.chunk_bytes)
        base = runtime.malloc(per_direction * 2 * self.chunk_bytes)
        self._staging_base = base
        for i in range(per_direction * 2):
            ring = self._save_ring if i < per_direction else self._load_ring
            ring.append(
                _Staging(
                    address=base + i * self.chunk_bytes,
                    nbytes=self.chunk_bytes,
                    free=runtime.eventCreateWithFlags(EVENT_DISABLE_TIMING),
                    filled=runtime.eventCreateWithFlags(EVENT_DISABLE_TIMING),
                )
            )
        self.indices = _IndexRing(runtime, driver, gpu, INDEX_RING_ENTRIES, events)
        for _ in range(DONE_EVENT_RING):
            event = runtime.eventCreateWithFlags(self._completion_flags | EVENT_INTERPROCESS)
            self._done_events.append((event, runtime.ipcGetEventHandle(event)))
        # Saves complete on the D2H stream, loads on the load stream: one waiter each.
        for stream, name in ((self.d2h_stream, "save"), (self.load_stream, "load")):
            self._waiters[stream] = _CompletionWaiter(self, f"kvd-cuda{self.ordinal}-{name}-done")
        log.info(
            "GPU %d (%s): engine thread ready, %d+%d staging buffers of %d MiB",
            self.ordinal,
            self.uuid,
            per_direction,
            per_direction,
            self.chunk_bytes >> 20,
        )

    def _quiesce(self) -> None:
        self._closing = True
        self.runtime.deviceSynchronize()

    def _shutdown(self) -> None:
        runtime = self.runtime
        for pointer, _ in self._mappings.values():
            runtime.ipcCloseMemHandle(pointer)
        self._mappings.clear()
        for staging in (*self._save_ring, *self._load_ring):
            runtime.eventDestroy(staging.free)
            runtime.eventDestroy(staging.filled)
        for event, _ in self._done_events:
            runtime.eventDestroy(event)
        runtime.free(self._staging_base)
        if self.indices is not None:
            self.indices.close()
        self.events.close()
        for stream in (self.save_stream, self.d2h_stream, self.h2d_stream, self.load_stream):
            runtime.streamDestroy(stream)

    def _execute(self, job: tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]) -> None:
        fn, args, future = job
        if not future.set_running_or_notify_cancel():
            return
        if self._closing and fn != self._shutdown:
            future.set_exception(CudaEngineError(f"GPU {self.ordinal}: the engine is stopping"))
            return
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
            return
        if not isinstance(result, Pending):
            future.set_result(result)
            return
        waiter = self._waiters.get(result.stream)
        if waiter is None:
            future.set_exception(CudaEngineError(f"no completion waiter for stream {result.stream:#x}"))
            return
        waiter.put(result, future)

    # -- helpers for jobs (engine thread only) -------------------------------------------------------------------

    def completion(self, stream: int, value: Any) -> Pending:
        """`value` once the work queued on `stream` so far is done (a pooled event)."""
        return Pending(self.events.record(stream), stream, value, recycle=True)

    def done_event(self, stream: int) -> tuple[int, bytes]:
        event, handle = self._done_events[self._done_next]
        self._done_next = (self._done_next + 1) % len(self._done_events)
        self.gpu.record(event, stream)
        return event, handle

    def next_save_staging(self) -> _Staging:
        staging = self._save_ring[self._save_next]
        self._save_next = (self._save_next + 1) % len(self._save_ring)
        return staging

    def next_load_staging(self) -> _Staging:
        staging = self._load_ring[self._load_next]
        self._load_next = (self._load_next + 1) % len(self._load_ring)
        return staging

    def open_allocation(self, handle: bytes, nbytes: int) -> int:
        """Map a worker's allocation (once per daemon and device: CUDA refuses to open a handle twice in a
        process), check that it really spans `nbytes`, and count the reference."""
        mapping = self._mappings.get(handle)
        if mapping is None:
            pointer = self.runtime.ipcOpenMemHandle(handle)
            mapping = [pointer, 0]
            self._mappings[handle] = mapping
        pointer = mapping[0]
        mapping[1] += 1
        base, size = self.driver.address_range(pointer)
        if pointer + nbytes > base + size:
            self.close_allocation(handle)
            raise CudaEngineError(f"the allocation is {base + size - pointer} bytes, the worker claims {nbytes}")
        return pointer

    def close_allocation(self, handle: bytes) -> None:
        mapping = self._mappings.get(handle)
        if mapping is None:
            return
        mapping[1] -= 1
        if mapping[1] == 0:
            del self._mappings[handle]
            self.runtime.ipcCloseMemHandle(mapping[0])

    def register_host(self, address: int, nbytes: int) -> None:
        self.runtime.hostRegister(address, nbytes, HOST_REGISTER_PORTABLE)

    def unregister_host(self, address: int) -> None:
        self.runtime.hostUnregister(address)


def slot_runs(addresses: Sequence[int], block_bytes: int) -> list[tuple[int, int, int]]:
    """(first position in the chunk, host address, bytes) for each run of consecutive host slots: one DMA each."""
    runs: list[tuple[int, int, int]] = []
    for position, address in enumerate(addresses):
        if runs and runs[-1][1] + runs[-1][2] == address:
            first, start, nbytes = runs[-1]
            runs[-1] = (first, start, nbytes + block_bytes)
        else:
            runs.append((position, address, block_bytes))
    return runs
