"""CUDA IPC transport: workers share their GPU KV caches by cudaIpcMemHandle; the daemon's per-GPU engine thread
gathers blocks into staging buffers and DMAs them to pinned host slots (save), or the reverse (load).

Ordering with the worker's model stream is by interprocess events only: the daemon waits on the worker's ready event
before reading blocks (save) and before writing them (load), and hands back a done event the worker's stream waits on
before attention reads loaded blocks. The worker never creates, enters or sets a stream for kvd.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Sequence
from typing import Any

from kvd_client.layout import KvLayout

from kvd.config import EngineConfig
from kvd.engine.cuda_device import (
    MAX_GRID_Y,
    THREADS_PER_BLOCK,
    CudaEngineError,
    DeviceEngine,
    Pending,
    normalize_uuid,
    slot_runs,
)
from kvd.errors import InvalidArgument, TransferError
from kvd.tiers.host import HostPool
from kvd.transports.base import Attachment, SlotRef, Transport, block_segments
from kvd.types import CudaMemory, PeerIdentity, TransportKind, WorkerMemory

log = logging.getLogger(__name__)


class CudaAttachment(Attachment):
    kind = TransportKind.CUDA_IPC

    def __init__(self, engine: DeviceEngine, memory: CudaMemory, layout: KvLayout) -> None:
        self._engine = engine
        self._memory = memory
        self._layout = layout
        self.block_bytes = layout.block_bytes
        self._chunk_blocks = max(1, min(MAX_GRID_Y, engine.chunk_bytes // self.block_bytes))
        self._opened: list[bytes] = []
        self._worker_events: dict[bytes, int] = {}
        self._tables: Any = None
        self._nseg = 0
        self._vec16 = 0

    # -- engine-thread jobs --------------------------------------------------------------------------------------

    def _open(self) -> None:
        engine, memory = self._engine, self._memory
        cupy = engine.cupy
        pointers = []
        try:
            for allocation in memory.allocations:
                pointers.append(engine.open_allocation(allocation.ipc_handle, allocation.nbytes))
                self._opened.append(allocation.ipc_handle)
        except Exception:
            self._close()
            raise
        bases, lengths, offsets = [], [], []
        layer_base = [pointers[layer.allocation] + layer.offset for layer in memory.layers]
        for li, segment_offset, size, stored in block_segments(self._layout):
            bases.append(layer_base[li] + segment_offset)
            lengths.append(size)
            offsets.append(stored)
        self._nseg = len(bases)
        self._vec16 = int(all(v % 16 == 0 for v in (*bases, *lengths, *offsets, self.block_bytes)))
        # Uploaded on the legacy default stream, which our non-blocking streams never wait for or block.
        self._tables = (
            cupy.asarray(bases, dtype=cupy.uint64),
            cupy.asarray(lengths, dtype=cupy.uint64),
            cupy.asarray(offsets, dtype=cupy.uint64),
        )
        engine.runtime.streamSynchronize(0)

    def _close(self) -> None:
        runtime = self._engine.runtime
        for stream in (self._engine.save_stream, self._engine.load_stream):
            runtime.streamSynchronize(stream)  # nothing of ours may still touch the mapping
        for event in self._worker_events.values():
            runtime.eventDestroy(event)
        self._worker_events.clear()
        for handle in self._opened:
            self._engine.close_allocation(handle)
        self._opened.clear()
        self._tables = None

    def _worker_event(self, handle: bytes) -> int:
        event = self._worker_events.get(handle)
        if event is None:
            event = self._engine.runtime.ipcOpenEventHandle(handle)
            self._worker_events[handle] = event
        return event

    def _launch(self, kernel: int, stream: int, block_indices: Sequence[int], staging: int) -> None:
        """One gather/scatter kernel for a whole chunk: every block, every layer, K and V."""
        engine = self._engine
        ring, gpu = engine.indices, engine.gpu
        if ring is None:
            raise CudaEngineError("engine not started")
        pointer, start, end = ring.put(block_indices)
        bases, lengths, offsets = self._tables
        u64 = ctypes.c_uint64
        gpu.launch(
            kernel,
            (self._nseg, len(block_indices)),
            THREADS_PER_BLOCK,
            stream,
            u64(bases.data.ptr),
            u64(lengths.data.ptr),
            u64(offsets.data.ptr),
            u64(pointer),
            u64(self.block_bytes),
            u64(staging),
            ctypes.c_int32(self._vec16),
        )
        ring.guard(start, end, stream)

    def _save_job(self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes) -> Pending:
        engine = self._engine
        gpu = engine.gpu
        if ready_event:
            gpu.wait(engine.save_stream, self._worker_event(ready_event))
        step = self._chunk_blocks
        for start in range(0, len(block_indices), step):
            chunk = block_indices[start : start + step]
            staging = engine.next_save_staging()
            gpu.wait(engine.save_stream, staging.free)  # its previous D2H is done
            self._launch(engine.gather, engine.save_stream, chunk, staging.address)
            gpu.record(staging.filled, engine.save_stream)
            gpu.wait(engine.d2h_stream, staging.filled)
            for first, host, nbytes in slot_runs(addresses[start : start + step], self.block_bytes):
                gpu.d2h(host, staging.address + first * self.block_bytes, nbytes, engine.d2h_stream)
            gpu.record(staging.free, engine.d2h_stream)
        return engine.completion(engine.d2h_stream, b"")

    def _load_job(self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes) -> Pending:
        engine = self._engine
        gpu = engine.gpu
        worker = self._worker_event(ready_event) if ready_event else 0
        step = self._chunk_blocks
        for start in range(0, len(block_indices), step):
            chunk = block_indices[start : start + step]
            staging = engine.next_load_staging()
            gpu.wait(engine.h2d_stream, staging.free)  # its previous scatter is done
            for first, host, nbytes in slot_runs(addresses[start : start + step], self.block_bytes):
                gpu.h2d(staging.address + first * self.block_bytes, host, nbytes, engine.h2d_stream)
            gpu.record(staging.filled, engine.h2d_stream)
            gpu.wait(engine.load_stream, staging.filled)
            if worker and start == 0:
                gpu.wait(engine.load_stream, worker)  # nothing queued before may still read them
            self._launch(engine.scatter, engine.load_stream, chunk, staging.address)
            gpu.record(staging.free, engine.load_stream)
        event, handle = engine.done_event(engine.load_stream)
        return Pending(event, engine.load_stream, handle, recycle=False)

    # -- Attachment ----------------------------------------------------------------------------------------------

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.wrap_future(self._engine.call(fn, *args))
        except (CudaEngineError, RuntimeError, ValueError) as exc:
            raise TransferError(f"CUDA: {exc}") from exc

    async def save(self, block_indices: Sequence[int], slots: Sequence[SlotRef], ready_event: bytes) -> None:
        await self._run(self._save_job, list(block_indices), [s.address for s in slots], ready_event)

    async def load(self, block_indices: Sequence[int], slots: Sequence[SlotRef], ready_event: bytes) -> bytes:
        handle: bytes = await self._run(self._load_job, list(block_indices), [s.address for s in slots], ready_event)
        return handle

    async def close(self) -> None:
        await asyncio.wrap_future(self._engine.call(self._close))


class CudaTransport(Transport):
    kind = TransportKind.CUDA_IPC

    def __init__(self, config: EngineConfig, pool: HostPool, pin: bool) -> None:
        self._config = config
        self._pool = pool
        self._pin = pin
        self._engines: dict[str, DeviceEngine] = {}  # normalized device UUID -> its engine
        self._pinned_by: DeviceEngine | None = None

    @staticmethod
    def available() -> bool:
        try:
            from cupy.cuda import runtime

            return bool(runtime.getDeviceCount() > 0)
        except Exception:
            return False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._start_engines)

    def _start_engines(self) -> None:
        from cupy.cuda import runtime

        for ordinal in range(runtime.getDeviceCount()):
            engine = DeviceEngine(
                ordinal,
                self._config.cuda_chunk_bytes,
                self._config.cuda_staging_bytes,
                self._config.cuda_completion_wait,
            )
            engine.start()
            self._engines[engine.uuid] = engine
        if self._pin and self._engines:
            # One portable registration page-locks the pool for every device's DMA engines.
            first = next(iter(self._engines.values()))
            first.call(first.register_host, self._pool.base_address, self._pool.capacity_bytes).result()
            self._pinned_by = first
            log.info("host pool page-locked (%.2f GiB)", self._pool.capacity_bytes / 2**30)

    async def attach(self, memory: WorkerMemory, layout: KvLayout, peer: PeerIdentity) -> Attachment:
        if not isinstance(memory, CudaMemory):
            raise InvalidArgument("the CUDA IPC transport takes CUDA memory")
        engine = self._engines.get(normalize_uuid(memory.device_uuid))
        if engine is None:
            raise InvalidArgument(
                f"GPU {memory.device_uuid} is not visible to kvd (it sees {', '.join(self._engines) or 'none'})"
            )
        if len(memory.layers) != len(layout.layers):
            raise InvalidArgument(f"{len(memory.layers)} CUDA layers for {len(layout.layers)} layout layers")
        for region, layer in zip(memory.layers, layout.layers, strict=True):
            if region.nbytes != layer.nbytes:
                raise InvalidArgument(f"layer {layer.name!r}: {region.nbytes} bytes shared, layout says {layer.nbytes}")
        attachment = CudaAttachment(engine, memory, layout)
        try:
            await asyncio.wrap_future(engine.call(attachment._open))
        except Exception as exc:
            raise InvalidArgument(f"cannot map the worker's CUDA memory: {exc}") from exc
        return attachment

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._stop_engines)

    def _stop_engines(self) -> None:
        if self._pinned_by is not None:
            self._pinned_by.call(self._pinned_by.unregister_host, self._pool.base_address).result()
            self._pinned_by = None
        for engine in self._engines.values():
            engine.stop()
        self._engines.clear()
