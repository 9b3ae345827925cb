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
from kvd.transports.cuda.resources import Pending
from kvd.transports.cuda.trace import traced

if TYPE_CHECKING:
    from kvd.transports.cuda.device import DeviceEngine


def save_job(
    engine: DeviceEngine,
    mapping: WorkerMapping,
    block_indices: Sequence[int],
    addresses: Sequence[int],
    ready_event: bytes,
) -> Pending:
    """Gather each chunk of the worker's blocks into staging (after the worker's ready event), then DMA it to its host
    slots; the Pending completes on the D2H stream once every chunk is in host memory."""
    gpu, ring, block_bytes = engine.gpu, engine.save_ring(), mapping.block_bytes
    save, d2h = engine.save_stream, engine.d2h_stream
    trace = engine.trace("save")
    if ready_event:
        gpu.wait(save, engine.worker_event(mapping, ready_event))
    step = mapping.chunk_blocks
    for start in range(0, len(block_indices), step):
        chunk = block_indices[start : start + step]
        ctas = engine.chunk_ctas(ring)  # this gather runs beside an earlier chunk's D2H, if one is in flight
        staging = ring.next()
        gpu.wait(save, staging.free)  # its previous D2H is done
        trace.mark(save)
        launch_chunk(gpu, engine.indices, engine.kernels.gather, save, mapping, chunk, staging.address, ctas)
        trace.mark(save)
        gpu.record(staging.filled, save)
        gpu.wait(d2h, staging.filled)
        trace.mark(d2h)
        runs = slot_runs(addresses[start : start + step], block_bytes)
        for first, host, nbytes in runs:
            gpu.d2h(host, staging.address + first * block_bytes, nbytes, d2h)
        trace.mark(d2h)
        trace.chunk(len(chunk), len(runs))
        gpu.record(staging.free, d2h)
    return Pending(engine.events.record(d2h), d2h, b"", True, trace=traced(trace))


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
