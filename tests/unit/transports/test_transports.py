"""Pure parts of the transports: where each segment of a block lives, how host slots merge into DMA runs, and the
router's registry of media."""

from __future__ import annotations

import pytest
from kvd_client.layout import DType, KvLayout, LayerLayout

from kvd.config import TransportsConfig
from kvd.errors import Unimplemented
from kvd.process import PeerProcess
from kvd.transports.base import block_segments
from kvd.transports.cuda.kernels import slot_runs
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
