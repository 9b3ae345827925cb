"""The gather/scatter kernels (one launch per chunk copies every block's K and V segments of every layer, with
16-byte vector loads when everything is aligned) and the planning of a chunk's DMA runs."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvd.transports.cuda.driver import Enqueue, function_pointer
from kvd.transports.cuda.resources import IndexRing

MAX_GRID_Y = 65_535  # blocks per chunk: one kernel grid row per block
THREADS_PER_BLOCK = 256

KERNEL_SOURCE = r"""
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

// x: one (layer, segment) of a block; y: one block of the chunk. One CTA per (x, y) by default (each loop below then
// runs once); a launch capped to fewer CTAs (transports.cuda_kernel_ctas) strides over them.
extern "C" __global__ void kvd_gather(const unsigned long long* seg_base, const unsigned long long* seg_len,
                                      const unsigned long long* seg_off, const long long* blocks,
                                      unsigned long long block_bytes, unsigned char* staging, int vec16,
                                      unsigned int nseg, unsigned int nblocks) {
    for (unsigned int y = blockIdx.y; y < nblocks; y += gridDim.y) {
        for (unsigned int x = blockIdx.x; x < nseg; x += gridDim.x) {
            const unsigned long long len = seg_len[x];
            const unsigned char* src = reinterpret_cast<const unsigned char*>(
                seg_base[x] + static_cast<unsigned long long>(blocks[y]) * len);
            unsigned char* dst = staging + static_cast<unsigned long long>(y) * block_bytes + seg_off[x];
            kvd_copy(dst, src, len, vec16);
        }
    }
}

extern "C" __global__ void kvd_scatter(const unsigned long long* seg_base, const unsigned long long* seg_len,
                                       const unsigned long long* seg_off, const long long* blocks,
                                       unsigned long long block_bytes, const unsigned char* staging, int vec16,
                                       unsigned int nseg, unsigned int nblocks) {
    for (unsigned int y = blockIdx.y; y < nblocks; y += gridDim.y) {
        for (unsigned int x = blockIdx.x; x < nseg; x += gridDim.x) {
            const unsigned long long len = seg_len[x];
            unsigned char* dst = reinterpret_cast<unsigned char*>(
                seg_base[x] + static_cast<unsigned long long>(blocks[y]) * len);
            const unsigned char* src = staging + static_cast<unsigned long long>(y) * block_bytes + seg_off[x];
            kvd_copy(dst, src, len, vec16);
        }
    }
}
"""


@dataclass(frozen=True, slots=True)
class Kernels:
    module: Any  # the cupy RawModule; kept referenced so the kernels stay loaded
    gather: int  # CUfunction handles
    scatter: int


def load_kernels(cupy: Any) -> Kernels:
    """Compile the kernels (NVRTC) on the current device."""
    module = cupy.RawModule(code=KERNEL_SOURCE, options=("--std=c++17",))
    return Kernels(
        module=module,
        gather=function_pointer(module.get_function("kvd_gather")),
        scatter=function_pointer(module.get_function("kvd_scatter")),
    )


class SegmentTables(Protocol):
    """What a launch needs of a worker's mapping (mapping.WorkerMapping) or of one layer of it
    (layered.LayerPart): segment tables on the device, read-only here."""

    @property
    def tables(self) -> Any: ...  # (segment bases, lengths, offsets in the stored block) as device arrays

    @property
    def nseg(self) -> int: ...

    @property
    def vec16(self) -> int: ...

    @property
    def block_bytes(self) -> int: ...


def chunk_grid(nseg: int, nblocks: int, max_ctas: int = 0) -> tuple[int, int]:
    """A chunk's launch grid: one CTA per (segment, block), or with `max_ctas` > 0 at most that many (at least one
    row of segments), striding over the rest, so a chunk's kernel leaves SMs to the other direction's and the
    model's kernels."""
    if max_ctas <= 0 or nseg * nblocks <= max_ctas:
        return nseg, nblocks
    x = min(nseg, max_ctas)
    return x, max(1, min(nblocks, max_ctas // x))


def launch_chunk(
    gpu: Enqueue,
    ring: IndexRing,
    kernel: int,
    stream: int,
    mapping: SegmentTables,
    block_indices: Sequence[int],
    staging: int,
    max_ctas: int = 0,
) -> None:
    """One gather/scatter kernel for a whole chunk: every block, every layer, K and V. Its block indices go through
    the index ring, guarded until the kernel has read them."""
    pointer, start, end = ring.put(block_indices)
    launch_indexed(gpu, kernel, stream, mapping, pointer, len(block_indices), staging, max_ctas)
    ring.guard(start, end, stream)


def launch_indexed(
    gpu: Enqueue,
    kernel: int,
    stream: int,
    mapping: SegmentTables,
    indices: int,
    nblocks: int,
    staging: int,
    max_ctas: int = 0,
) -> None:
    """The kernel over `nblocks` block indices already in the index ring at device address `indices`."""
    bases, lengths, offsets = mapping.tables
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    gpu.launch(
        kernel,
        chunk_grid(mapping.nseg, nblocks, max_ctas),
        THREADS_PER_BLOCK,
        stream,
        u64(bases.data.ptr),
        u64(lengths.data.ptr),
        u64(offsets.data.ptr),
        u64(indices),
        u64(mapping.block_bytes),
        u64(staging),
        ctypes.c_int32(mapping.vec16),
        u32(mapping.nseg),
        u32(nblocks),
    )


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
