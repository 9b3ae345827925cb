"""The two copy jobs of a plain (not layer-ordered) save and load: queued on one GPU's streams by whichever thread
queues them (the engine thread, or the event loop: DeviceEngine.call / submit), never waiting for the GPU. The data
paths are drawn in device.py; layered.py holds the layer-ordered load of in-step loads.

A job takes a whole request or one segment of a large one (kvd/service/operations.py), cut into chunks of as many
blocks as a staging buffer holds. Each chunk's host side is one DMA per run of consecutive host slots
(kernels.slot_runs): the host pool places a request's blocks in runs where it can (kvd.memory.placement).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvd.transports.cuda.kernels import launch_chunk, slot_runs
from kvd.transports.cuda.mapping import WorkerMapping
from kvd.transports.cuda.resources import GATHER_PARTS, Pending
from kvd.transports.cuda.trace import ChunkTrace, traced

if TYPE_CHECKING:
    from kvd.transports.cuda.device import DeviceEngine


MIN_PART_BYTES = 4 << 20  # no smaller part: its DMA would run short of the link's rate


def save_job(
    engine: DeviceEngine,
    mapping: WorkerMapping,
    block_indices: Sequence[int],
    addresses: Sequence[int],
    ready_event: bytes,
) -> Pending:
    """Gather each chunk of the worker's blocks into staging (after the worker's ready event), then DMA it to its host
    slots; the Pending completes on the D2H stream once every chunk is in host memory."""
    gpu, ring, d2h = engine.gpu, engine.save_ring(), engine.d2h_stream
    trace = engine.trace("save")
    if ready_event:
        gpu.wait(engine.save_stream, engine.worker_event(mapping, ready_event))
    step = mapping.chunk_blocks
    for start in range(0, len(block_indices), step):
        beside_dma = ring.busy(gpu)  # DMA of this direction in flight (an earlier chunk's) covers this one's gather
        chunk, hosts = block_indices[start : start + step], addresses[start : start + step]
        _save_chunk(engine, mapping, chunk, hosts, beside_dma, trace)
    return Pending(engine.events.record(d2h), d2h, b"", True, trace=traced(trace))


def _save_chunk(
    engine: DeviceEngine,
    mapping: WorkerMapping,
    chunk: Sequence[int],
    hosts: Sequence[int],
    beside_dma: bool,
    trace: ChunkTrace,
) -> None:
    """One staging buffer's worth: gathered in parts (`gather_parts`), each part's DMA queued right behind its
    gather, so the copy engine starts after the first part's gather instead of the whole chunk's. The trace's four
    marks, in the order recorded: gather start, DMA start, gather end, DMA end."""
    gpu, ring, block_bytes = engine.gpu, engine.save_ring(), mapping.block_bytes
    save, d2h = engine.save_stream, engine.d2h_stream
    staging = ring.next()
    gpu.wait(save, staging.free)  # its previous D2H is done
    runs = 0
    parts = gather_parts(len(chunk), block_bytes, alone=not beside_dma)
    for number, (first, end) in enumerate(parts):
        if number == 0:
            trace.mark(save)
        ctas = engine.ctas_beside_dma(beside_dma or number > 0)  # a later part runs beside the earlier parts' DMA
        address = staging.address + first * block_bytes
        launch_chunk(gpu, engine.indices, engine.kernels.gather, save, mapping, chunk[first:end], address, ctas)
        filled = staging.filled if end == len(chunk) else ring.parted[number]
        gpu.record(filled, save)
        gpu.wait(d2h, filled)  # (a part's event is recorded again only after this wait is queued: safe to reuse)
        if number == 0:
            trace.mark(d2h)
        for position, host, nbytes in slot_runs(hosts[first:end], block_bytes):
            gpu.d2h(host, address + position * block_bytes, nbytes, d2h)
            runs += 1
    trace.mark(save)
    trace.mark(d2h)
    trace.chunk(len(chunk), runs)
    gpu.record(staging.free, d2h)


def gather_parts(blocks: int, block_bytes: int, alone: bool) -> list[tuple[int, int]]:
    """(first, end) block positions of a save chunk's gather kernels: one where DMA of its direction is already in
    flight (that DMA covers the gather), else up to GATHER_PARTS of at least MIN_PART_BYTES each (a small request's
    gather is on its critical path: a 32 MiB one takes tens of microseconds before its DMA could start)."""
    parts = min(GATHER_PARTS, blocks * block_bytes // MIN_PART_BYTES) if alone else 1
    if parts <= 1:
        return [(0, blocks)]
    size = -(-blocks // parts)
    return [(first, min(first + size, blocks)) for first in range(0, blocks, size)]


def load_job(
    engine: DeviceEngine,
    mapping: WorkerMapping,
    block_indices: Sequence[int],
    addresses: Sequence[int],
    ready_event: bytes,
) -> Pending:
    """DMA each chunk from its host slots into staging, then scatter it into the worker's blocks (the first chunk after
    the worker's ready event); the Pending's value is the done event's IPC handle, recorded after the last scatter."""
    gpu, block_bytes = engine.gpu, mapping.block_bytes
    ring, done_events, _ = engine.load_parts()
    h2d, load = engine.h2d_stream, engine.load_stream
    worker = engine.worker_event(mapping, ready_event) if ready_event else 0
    trace = engine.trace("load")
    step = mapping.chunk_blocks
    for start in range(0, len(block_indices), step):
        chunk = block_indices[start : start + step]
        # This scatter runs beside the next chunk's H2D (of this job, or of a later one if an earlier one is in flight).
        ctas = engine.chunk_ctas(ring, more_follow=start + step < len(block_indices))
        staging = ring.next()
        gpu.wait(h2d, staging.free)  # its previous scatter is done
        trace.mark(h2d)
        runs = slot_runs(addresses[start : start + step], block_bytes)
        for first, host, nbytes in runs:
            gpu.h2d(staging.address + first * block_bytes, host, nbytes, h2d)
        trace.mark(h2d)
        trace.chunk(len(chunk), len(runs))
        gpu.record(staging.filled, h2d)
        gpu.wait(load, staging.filled)
        if worker and start == 0:
            gpu.wait(load, worker)  # nothing queued before may still read them
        trace.mark(load)
        launch_chunk(gpu, engine.indices, engine.kernels.scatter, load, mapping, chunk, staging.address, ctas)
        trace.mark(load)
        gpu.record(staging.free, load)
    event, handle = done_events.next()
    gpu.record(event, load)
    return Pending(event, load, handle, recycle=False, trace=traced(trace))
