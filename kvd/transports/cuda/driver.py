"""CUDA driver-API bindings (ctypes on libcuda; CuPy's runtime API covers the rest), their constants and errors.

Two kinds of binding: `Enqueue`, the copy jobs' hot path, keeps the GIL (ctypes.PyDLL) because each call only
queues work and takes microseconds; `Driver`, for the few calls that may wait or that the runtime API lacks, drops
it (ctypes.CDLL) so a thread asleep in the driver never holds up the daemon's other threads.
"""

from __future__ import annotations

import ctypes
from typing import Any

STREAM_NON_BLOCKING = 0x1
EVENT_BLOCKING_SYNC = 0x1
EVENT_DISABLE_TIMING = 0x2
EVENT_INTERPROCESS = 0x4
HOST_REGISTER_PORTABLE = 0x1
HOST_REGISTER_DEVICEMAP = 0x2
HOST_ALLOC_MAPPED = 0x2
SUCCESS = 0
NOT_READY = 600
MEMORY_HOST, MEMORY_DEVICE = 1, 2  # CUmemorytype
WRITE_VALUE_DEFAULT = 0  # a memory fence before the store: everything the stream wrote before is visible first


class CudaError(RuntimeError):
    """A CUDA call or a GPU copy failed, or the device's engine is not running."""


class Memcpy2D(ctypes.Structure):
    """CUDA_MEMCPY2D: a strided copy (rows of `WidthInBytes`, `srcPitch` apart at the source)."""

    _fields_ = [
        (name, kind)
        for side in ("src", "dst")
        for name, kind in (
            (f"{side}XInBytes", ctypes.c_size_t),
            (f"{side}Y", ctypes.c_size_t),
            (f"{side}MemoryType", ctypes.c_uint),
            (f"{side}Host", ctypes.c_void_p),
            (f"{side}Device", ctypes.c_uint64),
            (f"{side}Array", ctypes.c_void_p),
            (f"{side}Pitch", ctypes.c_size_t),
        )
    ] + [("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


class Enqueue:
    """The copy jobs' hot path: stream waits, event records, async copies and kernel launches through the
    driver API with the GIL *held* (ctypes.PyDLL). Each call only queues work and takes microseconds; releasing the
    GIL around each (as cupy and ctypes.CDLL do) would make the calling thread queue for the GIL once per call behind
    the daemon's other threads, up to a switch interval each time: a 1 GiB save is ~130 such calls."""

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
        self._copy2d = lib.cuMemcpy2DAsync_v2
        self._copy2d.argtypes = [ctypes.POINTER(Memcpy2D), vp]
        self._rows = Memcpy2D(srcMemoryType=MEMORY_HOST, dstMemoryType=MEMORY_DEVICE)  # copy jobs only (one at a time)
        self._write_value = getattr(lib, "cuStreamWriteValue32_v2", None) or lib.cuStreamWriteValue32
        self._write_value.argtypes = [vp, u64, ctypes.c_uint32, uint]

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise CudaError(f"{what} failed: CUresult {status}")

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

    def h2d_rows(self, device: int, host: int, width: int, pitch: int, rows: int, stream: int) -> None:
        """`rows` rows of `width` bytes, `pitch` apart from `host`, packed at `device` (one DMA)."""
        if rows == 1:
            self.h2d(device, host, width, stream)
            return
        copy = self._rows
        copy.srcHost, copy.srcPitch, copy.dstDevice, copy.dstPitch = host, pitch, device, width
        copy.WidthInBytes, copy.Height = width, rows
        self._check(self._copy2d(ctypes.byref(copy), stream), "cuMemcpy2DAsync")

    def write_value(self, stream: int, address: int, value: int) -> None:
        """Store `value` at device-visible `address` once the work queued before it on `stream` is done, after a
        fence that makes that work's writes visible first."""
        self._check(self._write_value(stream, address, value, WRITE_VALUE_DEFAULT), "cuStreamWriteValue32")

    def launch(self, function: int, grid: tuple[int, int], threads: int, stream: int, *args: Any) -> None:
        """Launch `function` (a CUfunction) with ctypes scalar `args`, in order."""
        params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
        self._check(
            self._launch(function, grid[0], grid[1], 1, threads, 1, 1, 0, stream, params, None), "cuLaunchKernel"
        )


class Driver:
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
            raise CudaError(f"cuMemGetAddressRange({pointer:#x}) failed: CUresult {status}")
        return base.value, size.value

    def device_pointer(self, host: int) -> int:
        """The device address of mapped pinned host memory (the same address under unified addressing)."""
        pointer = ctypes.c_uint64()
        status = self._host_pointer(ctypes.byref(pointer), ctypes.c_void_p(host), 0)
        if status != 0:
            raise CudaError(f"cuMemHostGetDevicePointer failed: CUresult {status}")
        return pointer.value

    def event_synchronize(self, event: int) -> int:
        """Block until `event` completed; the CUresult (0: success)."""
        return int(self._event_sync(ctypes.c_void_p(event)))

    def uuid(self, ordinal: int) -> str:
        device = ctypes.c_int()
        if self._device(ctypes.byref(device), ordinal) != 0:
            raise CudaError(f"cuDeviceGet({ordinal}) failed")
        raw = ctypes.create_string_buffer(16)
        if self._uuid(raw, device.value) != 0:
            raise CudaError(f"cuDeviceGetUuid({ordinal}) failed")
        return raw.raw.hex()


def function_pointer(kernel: Any) -> int:
    """The CUfunction behind a cupy kernel (RawModule.get_function gives a RawKernel wrapping a Function)."""
    function = getattr(kernel, "kernel", kernel)
    pointer = int(getattr(function, "ptr", 0) or 0)
    if not pointer:
        raise CudaError(f"no CUfunction behind {type(kernel).__name__}")
    return pointer


def normalize_uuid(uuid: str) -> str:
    """'GPU-1a2b…' / '1a2b3c4d-…' / 32 hex digits -> 32 lowercase hex digits."""
    return uuid.lower().removeprefix("gpu-").replace("-", "")
