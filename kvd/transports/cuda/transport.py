"""CUDA IPC transport: workers share their GPU KV caches by cudaIpcMemHandle; the daemon's per-GPU engine thread
gathers blocks into staging buffers and DMAs them to pinned host slots (save), or the reverse (load).

Ordering with the worker's model stream is by interprocess events only: the daemon waits on the worker's ready event
before reading blocks (save) and before writing them (load), and hands back a done event the worker's stream waits on
before attention reads loaded blocks. The worker never creates, enters or sets a stream for kvd.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from kvd_client.layout import KvLayout

from kvd.config import TransportsConfig, human_bytes
from kvd.errors import FailureReason, InvalidArgument, TransferError
from kvd.memory.progress import LayerProgress
from kvd.memory.region import PinnedRegion
from kvd.transports.base import Attachment, Transport
from kvd.transports.cuda.copies import load_job, save_job
from kvd.transports.cuda.device import DeviceEngine
from kvd.transports.cuda.driver import CudaError, normalize_uuid
from kvd.transports.cuda.layered import load_layers_job
from kvd.transports.cuda.mapping import WorkerMapping
from kvd.types import CudaMemory, PeerIdentity, Stamps, TransportKind, WorkerMemory

log = logging.getLogger(__name__)


class CudaAttachment(Attachment):
    """A session's mapping on its GPU. Copies are queued from the event loop (DeviceEngine.submit; with
    transports.cuda_queue_on_loop off, on the engine thread: DeviceEngine.call), and completed by the engine's
    waiters; mapping and unmapping run on the engine thread."""

    kind = TransportKind.CUDA_IPC

    def __init__(self, engine: DeviceEngine, mapping: WorkerMapping, on_loop: bool = False) -> None:
        self._engine = engine
        self._mapping = mapping
        self._queue = engine.submit if on_loop else engine.call  # transports.cuda_queue_on_loop

    async def _run(
        self, job: Callable[..., Any], stamps: Stamps, *args: Any, then: Callable[[], None] | None = None
    ) -> Any:
        try:
            return await asyncio.wrap_future(self._queue(job, self._mapping, *args, stages=stamps, then=then))
        except (CudaError, RuntimeError, ValueError) as exc:
            raise TransferError(f"CUDA: {exc}", FailureReason.CUDA) from exc

    async def save(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None,
        while_copying: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        job = functools.partial(save_job, self._engine)
        await self._run(job, stamps, block_indices, addresses, ready_event, then=while_copying)

    async def load(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None
    ) -> bytes:
        job = functools.partial(load_job, self._engine)
        handle: bytes = await self._run(job, stamps, block_indices, addresses, ready_event)
        return handle

    async def load_layers(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes,
        progress: LayerProgress, stamps: Stamps = None,
    ) -> bytes:  # fmt: skip
        """In layer order (layered.py): the load stream stores each layer's counter in the progress page itself, right
        after that layer's last scatter, and the load waiter wakes CPU waiters after each."""
        job = functools.partial(load_layers_job, self._engine)
        future = self._queue(job, self._mapping, block_indices, addresses, ready_event, progress, stages=stamps)
        try:
            handle: bytes = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Its stream may still store layer counters; the caller's final store (LayerProgress.finish) must come
            # after them, or a later layer's wait would never be satisfied.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wrap_future(future)
            raise
        except (CudaError, RuntimeError, ValueError) as exc:
            raise TransferError(f"CUDA: {exc}", FailureReason.CUDA) from exc
        return handle

    async def close(self) -> None:
        await asyncio.wrap_future(self._engine.call(self._engine.close_worker, self._mapping))


class CudaTransport(Transport):
    kind = TransportKind.CUDA_IPC

    def __init__(self, config: TransportsConfig, pinned: PinnedRegion | None) -> None:
        """`pinned`: host memory to page-lock for DMA (the host pool), or None to leave it pageable."""
        self._config = config
        self._pinned = pinned
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
                self._config.cuda_trace_path,
                self._config.cuda_kernel_ctas,
            )
            engine.start()
            self._engines[engine.uuid] = engine
        if self._pinned is not None and self._engines:
            # One portable registration page-locks the pool for every device's DMA engines.
            first = next(iter(self._engines.values()))
            first.call(first.register_host, self._pinned.base_address, self._pinned.nbytes).result()
            self._pinned_by = first
            log.info("host pool page-locked (%s)", human_bytes(self._pinned.nbytes))

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
        try:
            mapping = await asyncio.wrap_future(engine.call(engine.open_worker, memory, layout))
        except Exception as exc:
            raise InvalidArgument(f"cannot map the worker's CUDA memory: {exc}") from exc
        return CudaAttachment(engine, mapping, self._config.cuda_queue_on_loop)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._stop_engines)

    def _stop_engines(self) -> None:
        if self._pinned_by is not None and self._pinned is not None:
            self._pinned_by.call(self._pinned_by.unregister_host, self._pinned.base_address).result()
            self._pinned_by = None
        for engine in self._engines.values():
            engine.stop()
        self._engines.clear()
