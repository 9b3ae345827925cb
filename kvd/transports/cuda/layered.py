"""Layer-ordered loads into a worker's GPU cache (in-step loads, issue #16): layer 0 of every block first, then
layer 1, and so on; after each layer the daemon's load stream stores that layer's progress counter itself
(cuStreamWriteValue32, behind a fence), so the worker's stream, waiting on the counter with cuStreamWaitValue32
(kvd_client.cuda_progress), runs that layer's attention as soon as its bytes are in place. No host hop lies between
a layer's copy and the worker: neither the completion waiter's naps nor the GIL can delay a layer. A pooled event
after each store lets the load waiter wake the page's CPU waiters (eventfd) as well. The status and the final
counter stay with the service (LayerProgress.finish), which stores them once the load's done event has completed,
that is after every store this load queued.

Per layer i, per chunk of blocks (as many as a staging buffer holds of that layer's bytes):
    [h2d stream]   wait(buffer free) -> one strided DMA per run of consecutive host slots: layer i's bytes of each
                   block (at the same offset in every stored block), packed into the buffer -> filled
    [load stream]  wait(filled) -> (first chunk only: wait(worker's ready event)) -> scatter of layer i's segments
                   -> buffer free
    then           [load stream] counter = base + i + 1 (every layer but the last) -> event -> the waiter wakes
The load's block indices go into the index ring once; every layer's kernels read them there. All of this is one
copy job, queued where load_job is (the engine thread, or the event loop: transports.cuda_queue_on_loop); the plain
load path is untouched. Its one-time set-up per session (page-locking the progress page, slicing the segment tables)
runs there too, on the first in-step load.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvd.memory.progress import LayerProgress
from kvd.transports.base import block_segments
from kvd.transports.cuda.driver import HOST_REGISTER_DEVICEMAP, HOST_REGISTER_PORTABLE, CudaError
from kvd.transports.cuda.kernels import MAX_GRID_Y, launch_indexed, slot_runs
from kvd.transports.cuda.mapping import WorkerMapping
from kvd.transports.cuda.resources import Pending

if TYPE_CHECKING:
    from kvd.transports.cuda.device import DeviceEngine

Chunk = tuple[int, int, list[tuple[int, int, int]]]  # (first block, blocks, runs: (position, host address, slots))


@dataclass(frozen=True, slots=True)
class LayerPart:
    """One layer's slice of a mapping's segment tables, shaped as kernels.SegmentTables for its scatter: the
    offsets are relative to the layer's part of a stored block, which staging holds packed, `block_bytes` apart."""

    tables: tuple[Any, Any, Any]  # device arrays (views): segment bases, lengths, offsets within the layer's part
    nseg: int
    vec16: int
    block_bytes: int  # the layer's bytes of one block
    offset: int  # where they start in a stored block


def load_layers_job(
    engine: DeviceEngine,
    mapping: WorkerMapping,
    block_indices: Sequence[int],
    addresses: Sequence[int],
    ready_event: bytes,
    progress: LayerProgress,
) -> Pending:
    """Queue the whole load in layer order; the Pending's value is the done event's IPC handle."""
    counter = progress_counter(engine, mapping, progress)
    parts = layer_parts(engine, mapping)
    indices, start, end = engine.indices.put(block_indices)
    try:
        _enqueue_layers(engine, mapping, parts, indices, addresses, ready_event, progress, counter)
    except BaseException:
        # Counters of earlier layers may be queued: they must land before the caller stores the final one.
        with contextlib.suppress(Exception):
            engine.runtime.streamSynchronize(engine.load_stream)
        raise
    engine.indices.guard(start, end, engine.load_stream)
    _, done_events, _ = engine.load_parts()
    event, handle = done_events.next()
    engine.gpu.record(event, engine.load_stream)
    return Pending(event, engine.load_stream, handle, recycle=False)


def _enqueue_layers(
    engine: DeviceEngine,
    mapping: WorkerMapping,
    parts: Sequence[LayerPart],
    indices: int,
    addresses: Sequence[int],
    ready_event: bytes,
    progress: LayerProgress,
    counter: int,
) -> None:
    gpu, stream = engine.gpu, engine.load_stream
    _, _, waiter = engine.load_parts()
    worker = engine.worker_event(mapping, ready_event) if ready_event else 0
    plans: dict[int, list[Chunk]] = {}  # chunk plans by blocks per chunk: layers of one size share one
    for layer, part in enumerate(parts):
        step = max(1, min(MAX_GRID_Y, engine.chunk_bytes // part.block_bytes))
        chunks = plans.get(step)
        if chunks is None:
            chunks = plans[step] = plan_chunks(addresses, step, mapping.block_bytes)
        _copy_layer(engine, mapping, part, chunks, indices, worker)
        worker = 0  # waited on before the first scatter; everything after it follows on the same stream
        if layer + 1 < len(parts):  # the last layer's counter is the final one: the caller stores it
            gpu.write_value(stream, counter, progress.target(layer))
            wake = Pending(engine.events.record(stream), stream, None, recycle=True, on_done=progress.wake)
            waiter.put(wake, concurrent.futures.Future())  # before the load's own Pending: the waiter keeps order


def _copy_layer(
    engine: DeviceEngine, mapping: WorkerMapping, part: LayerPart, chunks: Sequence[Chunk], indices: int, worker: int
) -> None:
    """Layer `part` of every block: staged chunk by chunk, then scattered into the worker's cache."""
    gpu, h2d, load = engine.gpu, engine.h2d_stream, engine.load_stream
    ring, _, _ = engine.load_parts()
    width, pitch = part.block_bytes, mapping.block_bytes
    for first, count, runs in chunks:
        ctas = engine.chunk_ctas(ring)
        staging = ring.next()
        gpu.wait(h2d, staging.free)  # its previous scatter is done
        for position, host, slots in runs:
            gpu.h2d_rows(staging.address + position * width, host + part.offset, width, pitch, slots, h2d)
        gpu.record(staging.filled, h2d)
        gpu.wait(load, staging.filled)
        if worker:
            gpu.wait(load, worker)  # nothing the worker queued before may still read these blocks
            worker = 0
        scatter = engine.kernels.scatter
        launch_indexed(gpu, scatter, load, part, indices + 8 * first, count, staging.address, ctas)
        gpu.record(staging.free, load)


def plan_chunks(addresses: Sequence[int], step: int, block_bytes: int) -> list[Chunk]:
    """The load's chunks of `step` blocks, each with its runs of consecutive host slots (one strided DMA each)."""
    chunks: list[Chunk] = []
    for start in range(0, len(addresses), step):
        runs = slot_runs(addresses[start : start + step], block_bytes)
        count = min(step, len(addresses) - start)
        chunks.append((start, count, [(position, host, nbytes // block_bytes) for position, host, nbytes in runs]))
    return chunks


def layer_parts(engine: DeviceEngine, mapping: WorkerMapping) -> list[LayerPart]:
    """Each layer's slice of the segment tables, built on the mapping's first in-step load and kept."""
    if mapping.layer_parts is not None:
        parts: list[LayerPart] = mapping.layer_parts
        return parts
    segments = block_segments(mapping.layout)
    spans: list[tuple[int, int, int, int]] = []  # per layer: first segment, segments, offset, bytes
    relative: list[int] = []
    for index, (layer, _, size, stored) in enumerate(segments):
        if layer == len(spans):
            spans.append((index, 0, stored, 0))
        first, count, offset, nbytes = spans[layer]
        spans[layer] = (first, count + 1, offset, nbytes + size)
        relative.append(stored - offset)
    if any(nbytes > engine.chunk_bytes for _, _, _, nbytes in spans):
        raise CudaError("a layer of one block is larger than a staging buffer (transports.cuda_chunk_bytes)")
    cupy = engine.cupy
    offsets = cupy.asarray(relative, dtype=cupy.uint64)  # on the legacy default stream, as open_worker's tables
    engine.runtime.streamSynchronize(0)
    bases, lengths, _ = mapping.tables
    parts = [
        LayerPart(
            (bases[first : first + n], lengths[first : first + n], offsets[first : first + n]), n, mapping.vec16, b, o
        )
        for first, n, o, b in spans
    ]
    mapping.layer_parts = parts
    return parts


def progress_counter(engine: DeviceEngine, mapping: WorkerMapping, progress: LayerProgress) -> int:
    """The device address of `progress`'s counter; the session's page is registered with the driver on its first
    in-step load (unregistered by close_worker, before the service unmaps the page)."""
    page = progress.writer
    device = mapping.progress_pages.get(page.address)
    if device is None:
        engine.runtime.hostRegister(page.address, page.nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_DEVICEMAP)
        try:
            device = engine.driver.device_pointer(page.address)
        except Exception:
            engine.runtime.hostUnregister(page.address)
            raise
        mapping.progress_pages[page.address] = device
    return device + progress.counter_offset
