"""The worker's half of sharing driver-mapped KV memory (see kvd_client.vmm): find the physical allocations behind
the KV tensors and export each as a POSIX file descriptor.

Runs once per registration, on the thread that registers the KV caches (a CUDA context is current there). The
descriptors belong to the caller, which passes them to the daemon at every registration and closes them when the
memory is released.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

from kvd_client.errors import InvalidArgument
from kvd_client.vmm import (
    GRANULARITY_MINIMUM,
    HANDLE_TYPE_POSIX_FD,
    AllocationProp,
    Mapping,
    device_prop,
    find_mapping,
    plan_ranges,
)
from kvd_client.wire.kvd.v1 import kvd_pb2

NO_SHAREABLE_HANDLE = (
    "the KV cache is driver-mapped memory allocated without the POSIX file-descriptor handle type, so kvd can "
    "neither import it by descriptor nor open it by CUDA IPC. With vLLM 0.34 keep kv_connector_extra_config "
    'kv_cache_access at "auto" or "fd" (vLLM then allocates it exportable), or set it to "legacy_ipc" (vLLM then '
    "allocates a plain cudaMalloc cache)"
)


class _Driver:
    """cuMem* calls on the worker's side (ctypes on libcuda; torch loaded it already)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        u64, vp = ctypes.c_uint64, ctypes.c_void_p
        self._retain = lib.cuMemRetainAllocationHandle
        self._retain.argtypes = [ctypes.POINTER(u64), vp]
        self._release = lib.cuMemRelease
        self._release.argtypes = [u64]
        self._props = lib.cuMemGetAllocationPropertiesFromHandle
        self._props.argtypes = [ctypes.POINTER(AllocationProp), u64]
        self._granularity = lib.cuMemGetAllocationGranularity
        self._granularity.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(AllocationProp), ctypes.c_int]
        self._export = lib.cuMemExportToShareableHandle
        self._export.argtypes = [vp, u64, ctypes.c_int, ctypes.c_ulonglong]
        self.retained: list[int] = []

    def handle_at(self, address: int) -> int | None:
        """The allocation handle mapped at `address` (one more reference, dropped by `release_all`), or None."""
        handle = ctypes.c_uint64()
        if self._retain(ctypes.byref(handle), ctypes.c_void_p(address)) != 0:
            return None
        self.retained.append(handle.value)
        return handle.value

    def release_all(self) -> None:
        for handle in self.retained:
            self._release(handle)
        self.retained.clear()

    def requested_types(self, handle: int) -> int:
        prop = AllocationProp()
        status = self._props(ctypes.byref(prop), handle)
        if status != 0:
            raise InvalidArgument(f"cuMemGetAllocationPropertiesFromHandle failed: CUresult {status}")
        return int(prop.requestedHandleTypes)

    def granularity(self, ordinal: int) -> int:
        size = ctypes.c_size_t()
        prop = device_prop(ordinal)
        status = self._granularity(ctypes.byref(size), ctypes.byref(prop), GRANULARITY_MINIMUM)
        if status != 0 or size.value <= 0:
            raise InvalidArgument(f"cuMemGetAllocationGranularity failed: CUresult {status}")
        return int(size.value)

    def export_fd(self, handle: int) -> int:
        fd = ctypes.c_int(-1)
        status = self._export(ctypes.byref(fd), handle, HANDLE_TYPE_POSIX_FD, 0)
        if status != 0:
            raise InvalidArgument(f"cuMemExportToShareableHandle failed: CUresult {status}; {NO_SHAREABLE_HANDLE}")
        return int(fd.value)


_driver: _Driver | None = None


def _get_driver() -> _Driver:
    global _driver
    if _driver is None:
        _driver = _Driver()
    return _driver


def is_driver_mapped(address: int) -> bool:
    """Whether `address` lies in cuMemMap'd memory (cudaMalloc memory has no allocation handle)."""
    driver = _get_driver()
    try:
        return driver.handle_at(address) is not None
    finally:
        driver.release_all()


def describe(ranges: Sequence[tuple[int, int]], ordinal: int) -> tuple[list[Any], list[tuple[int, int]], list[int]]:
    """For KV tensors at (address, nbytes): the CudaAllocation messages, each tensor's (allocation, offset), and the
    exported descriptors (the caller's to close), in the order `fd_index` counts them."""
    driver = _get_driver()
    fds: list[int] = []
    try:
        granularity = driver.granularity(ordinal)
        mappings: dict[int, Mapping] = {}
        for address, nbytes in ranges:
            at = address
            while at < address + nbytes:
                mapping = _mapping_at(driver, at, granularity, mappings)
                at = mapping.base + mapping.size
        planned = plan_ranges(ranges, list(mappings.values()))
        fd_of: dict[int, int] = {}
        allocations = []
        for r in planned:
            chunks = [_chunk(driver, m, r.start, fd_of, fds) for m in r.mappings]
            allocations.append(kvd_pb2.CudaAllocation(nbytes=r.end - r.start, vmm_chunks=chunks))
        layers = [_locate(planned, address) for address, _ in ranges]
        return allocations, layers, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        driver.release_all()


def _mapping_at(driver: _Driver, address: int, granularity: int, known: dict[int, Mapping]) -> Mapping:
    for mapping in known.values():
        if mapping.base <= address < mapping.base + mapping.size:
            return mapping
    mapping = find_mapping(address, granularity, driver.handle_at)
    if not driver.requested_types(mapping.handle) & HANDLE_TYPE_POSIX_FD:
        raise InvalidArgument(NO_SHAREABLE_HANDLE)
    known[mapping.base] = mapping
    return mapping


def _chunk(driver: _Driver, mapping: Mapping, start: int, fd_of: dict[int, int], fds: list[int]) -> Any:
    index = fd_of.get(mapping.handle)
    if index is None:
        fds.append(driver.export_fd(mapping.handle))
        index = fd_of[mapping.handle] = len(fds) - 1
    return kvd_pb2.CudaVmmChunk(offset=mapping.base - start, nbytes=mapping.size, fd_index=index)


def _locate(planned: Sequence[Any], address: int) -> tuple[int, int]:
    for i, r in enumerate(planned):
        if r.start <= address < r.end:
            return i, address - r.start
    raise InvalidArgument(f"KV tensor at {address:#x} lies in no planned range")
