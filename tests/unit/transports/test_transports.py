"""Pure parts of the transports: where each segment of a block lives, how host slots merge into DMA runs, a chunk's
launch grid and the kernels' parameters, and the router's registry of media."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from kvd_client.layout import DType, KvLayout, LayerLayout

from kvd.config import TransportsConfig
from kvd.errors import Unimplemented
from kvd.process import PeerProcess
from kvd.transports.base import block_segments
from kvd.transports.cuda.kernels import KERNEL_SOURCE, chunk_grid, slot_runs
from kvd.transports.router import MEDIA, TransportRouter
from kvd.types import CpuMemory, CudaAllocation, CudaLayer, CudaMemory, PeerIdentity, TransportKind


def test_block_segments_walk_every_layer_and_k_v_segment_in_stored_order() -> None:
    # Layer 0: K and V planes ([2, blocks, ...], block_dim 1): two segments per block. Layer 1: one plane.
    layout = KvLayout(
        layers=(
            LayerLayout("a", (2, 10, 4, 8), DType.FLOAT16, 1),  # 64 bytes per segment
            LayerLayout("b", (10, 2, 4, 8), DType.FLOAT16, 0),  # 128 bytes per block, one segment
        ),
        block_size_tokens=4,
    )
    segments = block_segments(layout)
    # (layer, offset of block 0's segment, size = stride per block, offset in the stored block)
    assert segments == [(0, 0, 64, 0), (0, 10 * 64, 64, 64), (1, 0, 128, 128)]
    assert sum(size for _, _, size, _ in segments) == layout.block_bytes


def test_slot_runs_merge_consecutive_slots_into_one_dma_each() -> None:
    size = 100
    addresses = [1000, 1100, 1200, 5000, 900, 1000]
    assert slot_runs(addresses, size) == [(0, 1000, 300), (3, 5000, 100), (4, 900, 200)]
    assert slot_runs([], size) == []


def test_every_kind_of_worker_memory_has_a_medium() -> None:
    assert MEDIA[CpuMemory].kind is TransportKind.CPU and MEDIA[CudaMemory].kind is TransportKind.CUDA_IPC


async def test_a_medium_this_daemon_cannot_reach_is_unimplemented() -> None:
    router = TransportRouter(TransportsConfig(cpu_copy_threads=1), None)
    await router.start()
    try:
        if TransportKind.CUDA_IPC in router.kinds:
            pytest.skip("this machine has a CUDA transport")
        memory = CudaMemory("GPU-0", (CudaAllocation(b"\0" * 64, 64),), (CudaLayer(0, 0, 64),))
        layout = KvLayout(layers=(LayerLayout("a", (2, 1, 4, 8), DType.FLOAT16, 1),), block_size_tokens=4)
        with pytest.raises(Unimplemented, match="no cuda_ipc transport"):
            await router.attach(memory, layout, PeerIdentity(PeerProcess(1, 0, 0, None, None), "uid:0"))
    finally:
        await router.stop()


def test_a_gpu_block_must_fit_the_staging_chunk_and_the_limit_is_known_without_a_gpu() -> None:
    router = TransportRouter(TransportsConfig(cpu_copy_threads=1, cuda_chunk_bytes=2 << 20), None)  # not started
    cuda = CudaMemory("GPU-0", (CudaAllocation(b"\0" * 64, 64),), (CudaLayer(0, 0, 64),))
    assert router.block_limit(cuda) == (2 << 20, "transports.cuda_chunk_bytes")
    assert router.block_limit(CpuMemory(())) is None


@pytest.mark.parametrize(
    ("nseg", "nblocks", "cap"), [(64, 32, 0), (64, 32, 132), (6, 5, 4), (3, 1000, 264), (500, 2, 100)]
)
def test_a_capped_chunk_grid_covers_every_block_segment_once(nseg: int, nblocks: int, cap: int) -> None:
    """The kernels' loops (kernels.KERNEL_SOURCE) over the launch grid: each (segment, block) exactly once."""
    gx, gy = chunk_grid(nseg, nblocks, cap)
    assert (gx, gy) == (nseg, nblocks) if cap == 0 else 0 < gx * gy <= max(cap, nseg)
    covered = Counter(
        (x, y) for bx in range(gx) for by in range(gy) for y in range(by, nblocks, gy) for x in range(bx, nseg, gx)
    )
    assert set(covered.values()) == {1} and len(covered) == nseg * nblocks


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit; no GPU)")
def test_the_kernels_compile_and_take_the_arguments_a_launch_passes(tmp_path: Path) -> None:
    """nvcc compiles the kernel source as NVRTC will; each kernel's parameters match launch_chunk's arguments."""
    source = tmp_path / "kernels.cu"
    source.write_text(KERNEL_SOURCE)
    ptx = tmp_path / "kernels.ptx"
    subprocess.run(["nvcc", "-ptx", "-arch=sm_90", "-std=c++17", str(source), "-o", str(ptx)], check=True, timeout=120)
    text = ptx.read_text()
    for name in ("kvd_gather", "kvd_scatter"):
        params = text.split(f".entry {name}(")[1].split(")")[0]
        kinds = [line.split()[1] for line in params.strip().splitlines()]
        assert kinds == [".u64"] * 6 + [".u32"] * 3, kinds  # 6 pointers and sizes, vec16, nseg, nblocks
