"""The engine owns everything that moves bytes: the host pool's memory, and one transport per medium, each with its
own threads (and, for CUDA, per-device streams and events). The service asks it for an attachment per session and
never touches a device itself.
"""

from __future__ import annotations

import asyncio
import logging

from kvd_client.layout import KvLayout

from kvd.config import KvdConfig
from kvd.errors import InvalidArgument, Unimplemented
from kvd.tiers.host import HostPool
from kvd.transports.base import Attachment, Transport
from kvd.transports.cpu import CpuTransport
from kvd.types import CpuMemory, CudaMemory, PeerIdentity, TransportKind, WorkerMemory

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: KvdConfig, pool: HostPool) -> None:
        self._config = config
        self._pool = pool
        self._transports: dict[TransportKind, Transport] = {}

    @property
    def transports(self) -> tuple[TransportKind, ...]:
        return tuple(self._transports)

    async def start(self) -> None:
        """Populate the pool (parallel first touch), then bring up transports; the CUDA one page-locks the pool."""
        await asyncio.get_running_loop().run_in_executor(None, self._pool.populate)
        self._transports[TransportKind.CPU] = CpuTransport(self._config.engine.cpu_copy_threads)
        cuda = _load_cuda_transport(self._config, self._pool)
        if cuda is not None:
            self._transports[TransportKind.CUDA_IPC] = cuda
        for transport in self._transports.values():
            await transport.start()
        log.info("engine ready: transports %s", ", ".join(self._transports))

    async def attach(self, memory: WorkerMemory, layout: KvLayout, peer: PeerIdentity) -> Attachment:
        if isinstance(memory, CpuMemory):
            kind = TransportKind.CPU
        elif isinstance(memory, CudaMemory):
            kind = TransportKind.CUDA_IPC
        else:
            raise InvalidArgument("unknown worker memory kind")
        transport = self._transports.get(kind)
        if transport is None:
            raise Unimplemented(f"this daemon has no {kind} transport (no CUDA device or no torch)")
        return await transport.attach(memory, layout, peer)

    async def stop(self) -> None:
        for transport in self._transports.values():
            await transport.stop()
        self._transports.clear()


def _load_cuda_transport(config: KvdConfig, pool: HostPool) -> Transport | None:
    """The CUDA IPC transport, when torch with a CUDA device is importable; else None (a CPU-only daemon)."""
    try:
        import cupy  # noqa: F401 - only to tell "not installed" apart from "no device"

        from kvd.transports.cuda_ipc import CudaTransport
    except ImportError as exc:
        log.info("CUDA IPC transport unavailable (%s): install kvd[cuda] on GPU nodes", exc)
        return None
    if not CudaTransport.available():
        log.info("CUDA IPC transport unavailable: no CUDA device")
        return None
    return CudaTransport(config.engine, pool, pin=config.host_pool.pin)
