"""Workers' driver-mapped KV memory, imported by file descriptor and mapped into the daemon (engine thread only).

For an allocation described by chunks (kvd_client.vmm): reserve a virtual range of its size, import each chunk's
descriptor (cuMemImportFromShareableHandle), map it at its offset from the physical allocation's first byte
(cuMemMap), as the worker did, drop the import handle (the mapping keeps the memory alive), and grant this device
read/write access to the whole range (cuMemSetAccess). cuMemMap refuses to map more bytes than the physical
allocation holds, so a worker can never make the daemon reach beyond its own memory. Closing unmaps chunk by chunk
(each cuMemUnmap must match one cuMemMap) and frees the range: from then on the daemon holds no reference, and the
memory is freed as soon as the worker lets go of it too.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvd_client.vmm import (
    ACCESS_READWRITE,
    GRANULARITY_MINIMUM,
    HANDLE_TYPE_POSIX_FD,
    LOCATION_TYPE_DEVICE,
    AccessDesc,
    AllocationProp,
    device_prop,
)

from kvd.logs import Throttled
from kvd.transports.cuda.driver import CudaError
from kvd.types import CudaAllocation

log = logging.getLogger(__name__)
_throttled = Throttled(log)  # repeating errors: one line a minute per kind


class VmmDriver:
    """The cuMem* calls of the import side (ctypes on libcuda, GIL dropped: they run once per registration)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        u64, size_t, vp = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
        self._import = lib.cuMemImportFromShareableHandle
        self._import.argtypes = [ctypes.POINTER(u64), vp, ctypes.c_int]
        self._reserve = lib.cuMemAddressReserve
        self._reserve.argtypes = [ctypes.POINTER(u64), size_t, size_t, u64, ctypes.c_ulonglong]
        self._free = lib.cuMemAddressFree
        self._free.argtypes = [u64, size_t]
        self._map = lib.cuMemMap
        self._map.argtypes = [u64, size_t, size_t, u64, ctypes.c_ulonglong]
        self._unmap = lib.cuMemUnmap
        self._unmap.argtypes = [u64, size_t]
        self._release = lib.cuMemRelease
        self._release.argtypes = [u64]
        self._access = lib.cuMemSetAccess
        self._access.argtypes = [u64, size_t, ctypes.POINTER(AccessDesc), size_t]
        self._granularity = lib.cuMemGetAllocationGranularity
        self._granularity.argtypes = [ctypes.POINTER(size_t), ctypes.POINTER(AllocationProp), ctypes.c_int]

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise CudaError(f"{what} failed: CUresult {status}")

    def granularity(self, ordinal: int) -> int:
        size, prop = ctypes.c_size_t(), device_prop(ordinal)
        self._check(self._granularity(ctypes.byref(size), ctypes.byref(prop), GRANULARITY_MINIMUM), "granularity")
        return int(size.value)

    def import_fd(self, fd: int) -> int:
        handle = ctypes.c_uint64()
        status = self._import(ctypes.byref(handle), ctypes.c_void_p(fd), HANDLE_TYPE_POSIX_FD)
        self._check(status, "cuMemImportFromShareableHandle")
        return handle.value

    def reserve(self, nbytes: int) -> int:
        base = ctypes.c_uint64()
        self._check(self._reserve(ctypes.byref(base), nbytes, 0, 0, 0), "cuMemAddressReserve")
        return base.value

    def free(self, base: int, nbytes: int) -> None:
        self._check(self._free(base, nbytes), "cuMemAddressFree")

    def map(self, address: int, nbytes: int, handle: int) -> None:
        self._check(self._map(address, nbytes, 0, handle, 0), "cuMemMap")

    def unmap(self, address: int, nbytes: int) -> None:
        self._check(self._unmap(address, nbytes), "cuMemUnmap")

    def release(self, handle: int) -> None:
        self._check(self._release(handle), "cuMemRelease")

    def allow(self, address: int, nbytes: int, ordinal: int) -> None:
        desc = AccessDesc()
        desc.location.type, desc.location.id, desc.flags = LOCATION_TYPE_DEVICE, ordinal, ACCESS_READWRITE
        self._check(self._access(address, nbytes, ctypes.byref(desc), 1), "cuMemSetAccess")


@dataclass(eq=False, slots=True)
class VmmRange:
    """One imported allocation: the daemon's range and the chunks mapped in it ((offset, nbytes) each)."""

    base: int
    nbytes: int
    mapped: list[tuple[int, int]] = field(default_factory=list)


class VmmMappings:
    """The driver-mapped ranges one device's engine holds, for the sessions that registered them."""

    def __init__(self, ordinal: int, make_driver: Callable[[], VmmDriver] | None = None) -> None:
        self._ordinal = ordinal
        self._make_driver = make_driver
        self._bound: VmmDriver | None = None  # bound at the first driver-mapped allocation, not before
        self._granularity = 0
        self.live: set[VmmRange] = set()

    @property
    def _driver(self) -> VmmDriver:
        if self._bound is None:
            self._bound = (self._make_driver or VmmDriver)()
            self._granularity = self._bound.granularity(self._ordinal)
        return self._bound

    def open(self, allocation: CudaAllocation, fds: Sequence[int]) -> VmmRange:
        """Map `allocation` (its chunks tile [0, nbytes); checked by the rpc layer) from the passed `fds`."""
        driver = self._driver
        grain = self._granularity
        for chunk in allocation.vmm_chunks:
            if chunk.offset % grain or chunk.nbytes % grain:
                raise CudaError(f"a driver-mapped chunk is not aligned to the {grain}-byte granularity")
            if chunk.fd_index >= len(fds):
                raise CudaError(f"descriptor {chunk.fd_index} of a driver-mapped chunk was not passed")
        mapped = VmmRange(driver.reserve(allocation.nbytes), allocation.nbytes)
        try:
            for chunk in allocation.vmm_chunks:
                self._map_chunk(mapped, chunk.offset, chunk.nbytes, fds[chunk.fd_index])
            driver.allow(mapped.base, mapped.nbytes, self._ordinal)
        except BaseException:
            self._unmap(mapped)
            raise
        self.live.add(mapped)
        log.info(
            "GPU %d: mapped %d driver-mapped chunks (%.1f MiB) of a worker; %d ranges mapped",
            self._ordinal,
            len(mapped.mapped),
            mapped.nbytes / 2**20,
            len(self.live),
        )
        return mapped

    def _map_chunk(self, mapped: VmmRange, offset: int, nbytes: int, fd: int) -> None:
        handle = self._driver.import_fd(fd)
        try:
            self._driver.map(mapped.base + offset, nbytes, handle)
            mapped.mapped.append((offset, nbytes))
        finally:
            self._driver.release(handle)  # the mapping holds the memory from here on

    def close(self, mapped: VmmRange) -> None:
        if mapped not in self.live:
            return
        self.live.discard(mapped)
        self._unmap(mapped)
        log.info("GPU %d: unmapped a worker's driver-mapped range; %d ranges mapped", self._ordinal, len(self.live))

    def _unmap(self, mapped: VmmRange) -> None:
        for offset, nbytes in mapped.mapped:
            try:
                self._driver.unmap(mapped.base + offset, nbytes)
            except CudaError as exc:
                _throttled.log(logging.ERROR, "unmap", "GPU %d: %s", self._ordinal, exc)
        mapped.mapped.clear()
        self._driver.free(mapped.base, mapped.nbytes)

    def close_all(self) -> None:
        for mapped in list(self.live):
            self.close(mapped)
