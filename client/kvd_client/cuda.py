"""The worker's CUDA side: export KV tensors by CUDA IPC, and order the model's stream against the daemon's copies
with interprocess events.

Stream safety (the reason kvd exists): nothing here creates a stream, enters `torch.cuda.stream(...)`, or calls
`torch.cuda.set_stream`. Events are *recorded on* the caller's current stream and the current stream *waits on* the
daemon's events; the current stream itself is never changed, so code that tracks it (vLLM's current_stream()) and
collectives issued on it are unaffected.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

import torch

from kvd_client.errors import InvalidArgument
from kvd_client.wire.kvd.v1 import kvd_pb2

IPC_HANDLE_BYTES = 64
READY_EVENT_RING = 64  # per device; a re-recorded event only ever makes the daemon wait for *later* work


def device_uuid(index: int) -> str:
    """The GPU's UUID ('GPU-…'): stable across processes and containers, unlike its ordinal."""
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def describe_cuda_memory(tensors: Sequence[torch.Tensor]) -> tuple[kvd_pb2.CudaMemory, list[int]]:
    """How the daemon reaches the KV tensors, and the file descriptors to pass with the registration (the caller's
    to close). Driver-mapped memory (vLLM's extensible KV cache, PyTorch's expandable segments) goes by descriptor
    (kvd_client.cuda_vmm); cudaMalloc memory by CUDA IPC handle, one per distinct allocation, with each tensor's
    byte offset inside it (the caching allocator rarely places a tensor at an allocation's base)."""
    if not tensors:
        raise InvalidArgument("no KV tensors to export")
    if any(not t.is_contiguous() for t in tensors):
        raise InvalidArgument("kvd needs contiguous KV tensors")
    index = tensors[0].device.index
    if index is None:
        index = torch.cuda.current_device()
    if _shares_by_ipc(tensors[0]):
        return _describe_ipc(tensors, index), []
    from kvd_client import cuda_vmm

    ranges = [(int(t.data_ptr()), int(t.numel()) * t.element_size()) for t in tensors]
    if cuda_vmm.is_driver_mapped(ranges[0][0]):
        allocations, places, fds = cuda_vmm.describe(ranges, index)
        layers = [
            kvd_pb2.CudaLayer(allocation=a, offset=offset, nbytes=nbytes)
            for (a, offset), (_, nbytes) in zip(places, ranges, strict=True)
        ]
        return kvd_pb2.CudaMemory(device_uuid=device_uuid(index), allocations=allocations, layers=layers), fds
    raise InvalidArgument("the KV cache is neither cudaMalloc memory torch can share nor driver-mapped memory")


def _shares_by_ipc(tensor: torch.Tensor) -> bool:
    """Whether torch can export the tensor's allocation as a legacy CUDA IPC handle (a cudaMalloc segment of its
    caching allocator). Expandable segments and memory torch did not allocate (vLLM's extensible KV cache) cannot."""
    try:
        share = tensor.untyped_storage()._share_cuda_()
    except Exception:  # torch refuses memory its allocator did not make (RuntimeError from c10::Error)
        return False
    handle = bytes(share[1])
    return len(handle) == IPC_HANDLE_BYTES or (len(handle) == IPC_HANDLE_BYTES + 2 and handle[1] == _TYPE_CUDA_MALLOC)


def _describe_ipc(tensors: Sequence[torch.Tensor], index: int) -> kvd_pb2.CudaMemory:
    allocations: dict[bytes, int] = {}
    sizes: list[int] = []
    layers = []
    for tensor in tensors:
        try:
            share = tensor.untyped_storage()._share_cuda_()
        except RuntimeError as exc:
            raise InvalidArgument(f"this KV tensor cannot be shared by CUDA IPC ({exc})") from exc
        handle, storage_offset = _cuda_malloc_handle(bytes(share[1])), int(share[3])
        offset = storage_offset + int(tensor.storage_offset()) * tensor.element_size()
        nbytes = int(tensor.numel()) * tensor.element_size()
        slot = allocations.setdefault(handle, len(allocations))
        if slot == len(sizes):
            sizes.append(0)
        sizes[slot] = max(sizes[slot], offset + nbytes)
        layers.append(kvd_pb2.CudaLayer(allocation=slot, offset=offset, nbytes=nbytes))
    return kvd_pb2.CudaMemory(
        device_uuid=device_uuid(index),
        allocations=[kvd_pb2.CudaAllocation(ipc_handle=h, nbytes=sizes[i]) for h, i in allocations.items()],
        layers=layers,
    )


# torch's caching allocator versions its shareable handles: [version][type][payload]. Type 'c' carries the plain
# cudaIpcMemHandle_t of the cudaMalloc segment; 'e' is an expandable segment (cuMem* VMM memory, shared by file
# descriptor), which cudaIpcOpenMemHandle cannot open.
_TYPE_CUDA_MALLOC = ord("c")
_TYPE_EXPANDABLE = ord("e")


def _cuda_malloc_handle(handle: bytes) -> bytes:
    if len(handle) == IPC_HANDLE_BYTES:  # torch before handle versioning
        return handle
    if len(handle) == IPC_HANDLE_BYTES + 2 and handle[1] == _TYPE_CUDA_MALLOC:
        return handle[2:]
    if len(handle) >= 2 and handle[1] == _TYPE_EXPANDABLE:
        # describe_cuda_memory sends driver-mapped memory by descriptor; only a tensor that is partly in one kind
        # of memory and partly in the other gets here.
        raise InvalidArgument("the KV tensors lie partly in an expandable segment and partly in cudaMalloc memory")
    raise InvalidArgument(f"unrecognised CUDA shareable handle ({len(handle)} bytes) from this torch version")


class _StreamOps:
    """cuEventRecord / cuStreamWaitEvent on the caller's current stream, with the GIL held (ctypes.PyDLL). torch's
    Event.record() and Stream.wait_event() release the GIL; getting it back can mean queueing behind the client's
    background thread (building a request) for a whole switch interval, 5 ms by default: the model thread must
    not pay that. Both calls only queue work and return at once."""

    def __init__(self) -> None:
        lib = ctypes.PyDLL("libcuda.so.1")  # loaded already: torch's CUDA runtime sits on it
        self._record = lib.cuEventRecord
        self._record.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._wait = lib.cuStreamWaitEvent
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._current: Any = raw if raw is not None else (lambda device: torch.cuda.current_stream(device).cuda_stream)

    def current_stream(self) -> int:
        """The caller's current stream (read, never changed)."""
        return int(self._current(torch.cuda.current_device()))

    def record(self, event: torch.cuda.Event) -> None:
        status = self._record(event.cuda_event, self.current_stream())
        if status != 0:
            raise RuntimeError(f"cuEventRecord failed: CUresult {status}")

    def wait(self, event: torch.cuda.Event) -> None:
        status = self._wait(self.current_stream(), event.cuda_event, 0)
        if status != 0:
            raise RuntimeError(f"cuStreamWaitEvent failed: CUresult {status}")


_ops: _StreamOps | None = None


def _stream_ops() -> _StreamOps:
    global _ops
    if _ops is None:
        _ops = _StreamOps()
    return _ops


class _EventRing:
    """Interprocess events of the current device, all created up front: a save or load then costs one
    cuEventRecord on the caller's current stream (creating an event and its IPC handle costs far more)."""

    def __init__(self) -> None:
        # An event that was never recorded still has a handle; a stream wait on it is a no-op. (ipc_handle()
        # creates the event on the current device; no stream is touched.)
        self._events: list[tuple[torch.cuda.Event, bytes]] = []
        for _ in range(READY_EVENT_RING):
            event = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
            self._events.append((event, bytes(event.ipc_handle())))
        self._next = 0

    def record(self) -> bytes:
        """Record the next event on the current stream; its IPC handle."""
        event, handle = self._events[self._next]
        self._next = (self._next + 1) % READY_EVENT_RING
        _stream_ops().record(event)
        return handle


_lock = threading.Lock()
_rings: dict[int, _EventRing] = {}
_opened: dict[bytes, Any] = {}


def current_stream() -> int:
    """The caller's current raw CUDA stream (read, never changed)."""
    return _stream_ops().current_stream()


def prepare_ready_events() -> None:
    """Create the current device's ready events now (at registration), not on the first saves."""
    _ring(torch.cuda.current_device())


def _ring(device: int) -> _EventRing:
    ring = _rings.get(device)
    if ring is None:
        with _lock:
            ring = _rings.get(device)
            if ring is None:
                ring = _rings[device] = _EventRing()
    return ring


def record_ready_event() -> bytes:
    """An interprocess event recorded on the caller's current stream: the daemon starts copying after it."""
    return _ring(torch.cuda.current_device()).record()


def wait_done_event(handle: bytes) -> None:
    """Make the caller's current stream wait for the daemon's copy (a wait, never a stream switch)."""
    event = _opened.get(handle)
    if event is None:
        event = torch.cuda.Event.from_ipc_handle(torch.cuda.current_device(), handle)
        _opened[handle] = event
    _stream_ops().wait(event)
