"""One engine thread per GPU. It sets its device before any CUDA call and owns everything of that device: streams,
events, staging buffers, gather/scatter kernels and the IPC mappings of workers' KV caches. Nothing here is shared
across devices, and no other thread makes a CUDA call on this device.

The thread never waits for the GPU: a job only *enqueues* work (stream waits, a gather kernel, DMA copies, an event
record) and returns a pending completion; between jobs the thread polls those completions' events. So many
operations are in flight at once: saves pipeline on one copy engine (D2H) while loads use the other (H2D), and
small requests keep the link busy instead of queueing behind each other.

Data path of a save chunk:  [save stream]  wait(worker's ready event) -> wait(staging slot free) -> gather kernel
                            [d2h stream]   wait(gathered) -> cudaMemcpyAsync runs into pinned host slots -> free slot
Load chunk:                 [h2d stream]   wait(slot free) -> cudaMemcpyAsync runs from pinned slots -> loaded
                            [load stream]  wait(loaded) -> wait(worker's ready event) -> scatter kernel -> free slot
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

STREAM_NON_BLOCKING = 0x1
EVENT_DISABLE_TIMING = 0x2
EVENT_INTERPROCESS = 0x4
HOST_REGISTER_PORTABLE = 0x1
MEMCPY_H2D = 1
MEMCPY_D2H = 2
SUCCESS = 0
NOT_READY = 600
MAX_GRID_Y = 65_535
THREADS_PER_BLOCK = 256
DONE_EVENT_RING = 128  # interprocess events handed to workers; reuse only makes a late waiter wait longer
INDEX_RING_ENTRIES = 1 << 20  # block indices in flight to the kernels (8 MiB pinned + 8 MiB on the device)

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
    """A job's result that is valid once `event` has completed on the GPU."""

    event: int
    value: Any
    recycle: bool  # the event is ours to reuse afterwards


@dataclass(slots=True)
class _Staging:
    address: int
    nbytes: int
    free: int  # event: recorded when the last reader/writer of this buffer finished
    filled: int  # event: recorded when the buffer holds a chunk ready for its next stage


class _IndexRing:
    """Block indices reach the gather/scatter kernels through a pinned ring buffer. (Uploading them from pageable
    memory would let the driver synchronize with the stream, i.e. stall this thread on a worker's forward pass.)
    A region is rewritten only after the kernel that read it has finished."""

    def __init__(self, runtime: Any, entries: int) -> None:
        self._runtime = runtime
        self.entries = entries
        self.host = runtime.hostAlloc(entries * 8, 0)
        self.device = runtime.malloc(entries * 8)
        self._head = 0
        self._guards: deque[tuple[int, int, int]] = deque()  # (start, end, event recorded after the reader)

    def put(self, values: Sequence[int], stream: int) -> tuple[int, int, int]:
        """Upload `values` on `stream`; (device pointer, start, end) of their region."""
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
                self._runtime.eventDestroy(event)
                self._guards.remove(guard)
        (ctypes.c_int64 * n).from_address(self.host + start * 8)[:] = list(values)
        self._runtime.memcpyAsync(self.device + start * 8, self.host + start * 8, n * 8, MEMCPY_H2D, stream)
        return self.device + start * 8, start, end

    def guard(self, start: int, end: int, stream: int) -> None:
        """Protect [start, end) until the work queued on `stream` so far (the kernel that reads it) is done."""
        event = self._runtime.eventCreateWithFlags(EVENT_DISABLE_TIMING)
        self._runtime.eventRecord(event, stream)
        self._guards.append((start, end, event))
        while self._guards and self._runtime.eventQuery(self._guards[0][2]) == SUCCESS:
            self._runtime.eventDestroy(self._guards.popleft()[2])

    def close(self) -> None:
        for _, _, event in self._guards:
            self._runtime.eventDestroy(event)
        self._guards.clear()
        self._runtime.freeHost(self.host)
        self._runtime.free(self.device)


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

    def address_range(self, pointer: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        status = self._range(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer))
        if status != 0:
            raise CudaEngineError(f"cuMemGetAddressRange({pointer:#x}) failed: CUresult {status}")
        return base.value, size.value

    def uuid(self, ordinal: int) -> str:
        device = ctypes.c_int()
        if self._device(ctypes.byref(device), ordinal) != 0:
            raise CudaEngineError(f"cuDeviceGet({ordinal}) failed")
        raw = ctypes.create_string_buffer(16)
        if self._uuid(raw, device.value) != 0:
            raise CudaEngineError(f"cuDeviceGetUuid({ordinal}) failed")
        return raw.raw.hex()


def normalize_uuid(uuid: str) -> str:
    """'GPU-1a2b…' / '1a2b3c4d-…' / 32 hex digits -> 32 lowercase hex digits."""
    return uuid.lower().removeprefix("gpu-").replace("-", "")


class DeviceEngine:
    """The thread that owns one GPU. `call(fn, *args)` runs fn on it and returns a future for its result."""

    def __init__(self, ordinal: int, chunk_bytes: int, staging_bytes: int) -> None:
        self.ordinal = ordinal
        self.chunk_bytes = chunk_bytes
        self._staging_bytes = staging_bytes
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]]
        self._jobs = queue.SimpleQueue()
        self._outstanding: list[tuple[Pending, concurrent.futures.Future[Any]]] = []
        self._thread = threading.Thread(target=self._main, name=f"kvd-cuda{ordinal}", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self.uuid = ""
        # Set on the engine thread in _init:
        self.runtime: Any = None
        self.cupy: Any = None
        self.save_stream = self.d2h_stream = self.h2d_stream = self.load_stream = 0
        self._save_ring: list[_Staging] = []
        self._load_ring: list[_Staging] = []
        self._save_next = self._load_next = 0
        self._spare_events: list[int] = []
        self._done_events: list[tuple[int, bytes]] = []
        self._done_next = 0
        self.gather: Any = None
        self.scatter: Any = None
        self.driver: _Driver | None = None
        self._mappings: dict[bytes, list[int]] = {}  # IPC handle -> [device pointer, references]
        self.indices: _IndexRing | None = None

    # -- lifecycle (any thread) ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise CudaEngineError(f"GPU {self.ordinal}: {self._start_error}") from self._start_error

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        done = self.call(self._shutdown)
        done.result(timeout=30)
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
            if self._outstanding:
                self._drain_jobs()
                self._poll()
                if self._outstanding and self._jobs.empty():
                    time.sleep(0.00002)  # a short nap: the copies take hundreds of microseconds at least
                continue
            try:
                job = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            self._execute(job)

    def _init(self) -> None:
        import cupy
        from cupy.cuda import runtime

        runtime.setDevice(self.ordinal)  # first, before any other CUDA call on this thread
        self.runtime, self.cupy = runtime, cupy
        self.driver = _Driver()
        self.uuid = self.driver.uuid(self.ordinal)
        self.save_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.d2h_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.h2d_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        self.load_stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)
        module = cupy.RawModule(code=_KERNELS, options=("--std=c++17",))
        self.gather = module.get_function("kvd_gather")
        self.scatter = module.get_function("kvd_scatter")
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
        self.indices = _IndexRing(runtime, INDEX_RING_ENTRIES)
        for _ in range(DONE_EVENT_RING):
            event = runtime.eventCreateWithFlags(EVENT_DISABLE_TIMING | EVENT_INTERPROCESS)
            self._done_events.append((event, runtime.ipcGetEventHandle(event)))
        log.info(
            "GPU %d (%s): engine thread ready, %d+%d staging buffers of %d MiB",
            self.ordinal,
            self.uuid,
            per_direction,
            per_direction,
            self.chunk_bytes >> 20,
        )

    def _shutdown(self) -> None:
        runtime = self.runtime
        runtime.deviceSynchronize()
        for pointer, _ in self._mappings.values():
            runtime.ipcCloseMemHandle(pointer)
        self._mappings.clear()
        for staging in (*self._save_ring, *self._load_ring):
            runtime.eventDestroy(staging.free)
            runtime.eventDestroy(staging.filled)
        for event, _ in self._done_events:
            runtime.eventDestroy(event)
        for event in self._spare_events:
            runtime.eventDestroy(event)
        runtime.free(self._staging_base)
        if self.indices is not None:
            self.indices.close()
        for stream in (self.save_stream, self.d2h_stream, self.h2d_stream, self.load_stream):
            runtime.streamDestroy(stream)

    def _drain_jobs(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._execute(job)

    def _execute(self, job: tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]) -> None:
        fn, args, future = job
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
            return
        if isinstance(result, Pending):
            self._outstanding.append((result, future))
        else:
            future.set_result(result)

    def _poll(self) -> None:
        still: list[tuple[Pending, concurrent.futures.Future[Any]]] = []
        for pending, future in self._outstanding:
            status = self.runtime.eventQuery(pending.event)
            if status == NOT_READY:
                still.append((pending, future))
                continue
            if pending.recycle:
                self._spare_events.append(pending.event)
            if status == SUCCESS:
                future.set_result(pending.value)
            else:
                future.set_exception(CudaEngineError(f"GPU {self.ordinal}: copy failed with cudaError {status}"))
        self._outstanding = still

    # -- helpers for jobs (engine thread only) -------------------------------------------------------------------

    def completion_event(self, stream: int) -> int:
        event = (
            self._spare_events.pop() if self._spare_events else self.runtime.eventCreateWithFlags(EVENT_DISABLE_TIMING)
        )
        self.runtime.eventRecord(event, stream)
        return event

    def done_event(self, stream: int) -> tuple[int, bytes]:
        event, handle = self._done_events[self._done_next]
        self._done_next = (self._done_next + 1) % len(self._done_events)
        self.runtime.eventRecord(event, stream)
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
        if self.driver is None:
            raise CudaEngineError("driver API not loaded")
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
