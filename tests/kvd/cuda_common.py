"""GPU KV caches for the CUDA tests: vLLM's layout, placed inside one allocation at a non-zero offset (tensors rarely
start at an allocation's base), with deterministic per-(hash, layer) contents."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tests.helpers.kvdata import CacheSpec, fill, mismatches

SPEC = CacheSpec(num_layers=4, num_blocks=256, block_size=16, kv_heads=8, head_dim=128)


def make_gpu_caches(offset_elements: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Zeroed per-layer views `[2, blocks, 16, 8, 128]` into one bf16 allocation, the first at `offset_elements`."""
    per_layer = 1
    for d in SPEC.layer_shape:
        per_layer *= d
    backing = torch.zeros(offset_elements + SPEC.num_layers * per_layer, dtype=torch.bfloat16, device="cuda")
    caches = {
        name: backing[offset_elements + i * per_layer : offset_elements + (i + 1) * per_layer].view(SPEC.layer_shape)
        for i, name in enumerate(SPEC.layer_names)
    }
    return caches, backing


def write_blocks(caches: dict[str, torch.Tensor], pairs: Iterable[tuple[int, bytes]]) -> None:
    fill(caches, SPEC, pairs)


def mismatched_blocks(caches: dict[str, torch.Tensor], pairs: Iterable[tuple[int, bytes]]) -> list[bytes]:
    return mismatches(caches, SPEC, pairs)


class VmmAllocation:
    """Memory made the way vLLM's extensible KV cache makes it: physical allocations from cuMemCreate (exportable
    as POSIX descriptors unless `shareable` is False), mapped side by side in one reserved range with cuMemMap,
    read/write for this device. Sizes are rounded up to the allocation granularity."""

    def __init__(self, chunk_bytes: Iterable[int], shareable: bool = True) -> None:
        import ctypes

        from kvd_client.vmm import ACCESS_READWRITE, HANDLE_TYPE_POSIX_FD, AccessDesc, device_prop

        torch.zeros(1, device="cuda")  # a current context on this thread
        self.ordinal = torch.cuda.current_device()
        lib = self._lib = _vmm_lib()
        prop = device_prop(self.ordinal)
        prop.requestedHandleTypes = HANDLE_TYPE_POSIX_FD if shareable else 0
        grain = ctypes.c_size_t()
        self._check(lib.cuMemGetAllocationGranularity(ctypes.byref(grain), ctypes.byref(prop), 0), "granularity")
        sizes = [-(-n // grain.value) * grain.value for n in chunk_bytes]
        self.nbytes = sum(sizes)
        base = ctypes.c_uint64()
        self._check(lib.cuMemAddressReserve(ctypes.byref(base), self.nbytes, 0, 0, 0), "reserve")
        self.base, self._chunks = base.value, []
        offset = 0
        for size in sizes:
            handle = ctypes.c_uint64()
            self._check(lib.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(prop), 0), "create")
            self._check(lib.cuMemMap(self.base + offset, size, 0, handle.value, 0), "map")
            self._chunks.append((offset, size, handle.value))
            offset += size
        desc = AccessDesc()
        desc.location.type, desc.location.id, desc.flags = 1, self.ordinal, ACCESS_READWRITE
        self._check(lib.cuMemSetAccess(self.base, self.nbytes, ctypes.byref(desc), 1), "access")

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"cuMem {what} failed: CUresult {status}")

    def tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over [offset, offset + nbytes) of the range (no copy; torch reads the CUDA array
        interface)."""
        owner = self

        class _View:
            __cuda_array_interface__ = {
                "shape": (nbytes,),
                "typestr": "|u1",
                "data": (self.base + offset, False),
                "version": 3,
                "strides": None,
            }
            keep = owner

        return torch.as_tensor(_View(), device="cuda")

    def close(self) -> None:
        torch.cuda.synchronize()
        for offset, size, handle in self._chunks:
            self._lib.cuMemUnmap(self.base + offset, size)
            self._lib.cuMemRelease(handle)
        self._chunks = []
        self._lib.cuMemAddressFree(self.base, self.nbytes)


def _vmm_lib() -> Any:
    """libcuda with the signatures of the cuMem* calls VmmAllocation makes (cuda.h)."""
    import ctypes

    from kvd_client.vmm import AccessDesc, AllocationProp

    lib = ctypes.CDLL("libcuda.so.1")
    u64, size_t, ull = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_ulonglong
    prop_p = ctypes.POINTER(AllocationProp)
    lib.cuMemGetAllocationGranularity.argtypes = [ctypes.POINTER(size_t), prop_p, ctypes.c_int]
    lib.cuMemAddressReserve.argtypes = [ctypes.POINTER(u64), size_t, size_t, u64, ull]
    lib.cuMemCreate.argtypes = [ctypes.POINTER(u64), size_t, prop_p, ull]
    lib.cuMemMap.argtypes = [u64, size_t, size_t, u64, ull]
    lib.cuMemSetAccess.argtypes = [u64, size_t, ctypes.POINTER(AccessDesc), size_t]
    lib.cuMemUnmap.argtypes = [u64, size_t]
    lib.cuMemRelease.argtypes = [u64]
    lib.cuMemAddressFree.argtypes = [u64, size_t]
    return lib


def make_vmm_caches(
    offset_elements: int, chunk_mib: Iterable[int] = (22, 20, 24), shareable: bool = True
) -> tuple[dict[str, torch.Tensor], VmmAllocation]:
    """The caches of make_gpu_caches, in cuMemCreate'd memory of several physical allocations (the default sizes
    make layers cross from one allocation into the next)."""
    per_layer = 2
    for d in SPEC.layer_shape:
        per_layer *= d  # bytes (bf16)
    memory = VmmAllocation([m << 20 for m in chunk_mib], shareable=shareable)
    start = 2 * offset_elements
    if start + SPEC.num_layers * per_layer > memory.nbytes:
        raise ValueError("the VMM allocation is too small for the caches")
    caches = {
        name: memory.tensor(start + i * per_layer, per_layer).view(torch.bfloat16).view(SPEC.layer_shape)
        for i, name in enumerate(SPEC.layer_names)
    }
    for tensor in caches.values():
        tensor.zero_()
    return caches, memory
