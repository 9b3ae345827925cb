"""Driver-mapped (VMM) KV memory: what both sides need to share it by POSIX file descriptor.

vLLM 0.34's extensible KV cache and PyTorch's expandable segments build a virtual address range with cuMemMap
from physical allocations made by cuMemCreate. Legacy CUDA IPC (cudaIpcGetMemHandle) cannot export such memory.
Instead the worker finds the physical allocation mapped at each part of its KV tensors
(cuMemRetainAllocationHandle), exports each once as a file descriptor (cuMemExportToShareableHandle), and describes
where each lies in a range; the daemon imports the descriptors and maps them side by side in a range of its own
(kvd/transports/cuda/vmm.py). That works only for allocations made with the POSIX file-descriptor handle type
requested (vLLM does so when the connector asks for it through `kv_cache_access()`, PyTorch does by default).

The ctypes structures here are CUDA's (cuda.h, CUDA 12 and 13); both sides use them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvd_client.errors import InvalidArgument

HANDLE_TYPE_POSIX_FD = 0x1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
ALLOCATION_TYPE_PINNED = 0x1  # CU_MEM_ALLOCATION_TYPE_PINNED
LOCATION_TYPE_DEVICE = 0x1  # CU_MEM_LOCATION_TYPE_DEVICE
ACCESS_READWRITE = 0x3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
GRANULARITY_MINIMUM = 0x0  # CU_MEM_ALLOC_GRANULARITY_MINIMUM


class MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class AllocationProp(ctypes.Structure):
    """CUmemAllocationProp."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", MemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", AllocFlags),
    ]


class AccessDesc(ctypes.Structure):
    """CUmemAccessDesc."""

    _fields_ = [("location", MemLocation), ("flags", ctypes.c_int)]


def device_prop(ordinal: int) -> AllocationProp:
    """The properties of a plain device allocation on `ordinal` (for the granularity query)."""
    prop = AllocationProp()
    prop.type = ALLOCATION_TYPE_PINNED
    prop.location.type = LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    return prop


# -- planning (pure: the driver calls are passed in) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mapping:
    """One physical allocation as mapped in the worker: VA [base, base + size), identified by its handle."""

    base: int
    size: int
    handle: int


@dataclass(slots=True)
class Range:
    """Adjacent mappings that together hold one or more KV tensors: one CudaAllocation on the wire."""

    start: int
    end: int
    mappings: list[Mapping] = field(default_factory=list)


def find_mapping(address: int, granularity: int, handle_at: Callable[[int], int | None]) -> Mapping:
    """The whole mapping around `address`: the run of granules backed by the same allocation handle as it.

    `handle_at(va)` is the handle mapped at va, or None where nothing is mapped. A mapping always starts at its
    allocation's first byte (cuMemMap takes offset 0), so the run's first granule is the allocation's first byte.
    """
    first = address - address % granularity
    handle = handle_at(first)
    if handle is None:
        raise InvalidArgument(f"no driver-mapped memory at {address:#x}")
    base = first
    while base >= granularity and handle_at(base - granularity) == handle:
        base -= granularity
    end = first + granularity
    while handle_at(end) == handle:
        end += granularity
    return Mapping(base, end - base, handle)


def plan_ranges(tensors: Sequence[tuple[int, int]], mappings: Sequence[Mapping]) -> list[Range]:
    """Group the mappings that hold `tensors` ((address, nbytes) each) into ranges of adjacent mappings, each range
    covering whole tensors; every tensor byte must lie in some mapping."""
    ordered = sorted(set(mappings), key=lambda m: m.base)
    ranges: list[Range] = []
    for mapping in ordered:
        if ranges and mapping.base < ranges[-1].end:
            raise InvalidArgument(f"driver mappings overlap at {mapping.base:#x}")
        if ranges and mapping.base == ranges[-1].end and _needed_together(ranges[-1], mapping, tensors):
            ranges[-1].mappings.append(mapping)
            ranges[-1].end = mapping.base + mapping.size
        else:
            ranges.append(Range(mapping.base, mapping.base + mapping.size, [mapping]))
    for address, nbytes in tensors:
        if not any(r.start <= address and address + nbytes <= r.end for r in ranges):
            raise InvalidArgument(f"KV tensor at {address:#x} (+{nbytes}) is not covered by one run of mappings")
    return ranges


def _needed_together(current: Range, mapping: Mapping, tensors: Sequence[tuple[int, int]]) -> bool:
    """A tensor crosses from the current range into `mapping`: they must be one range."""
    boundary = mapping.base
    return any(address < boundary < address + nbytes for address, nbytes in tensors if address >= current.start)
