"""The transports by medium: one Transport per kind of worker memory (CPU address space, CUDA IPC), each with its own
threads (and, for CUDA, per-device streams and events). The service asks the router for an attachment per session
and never touches a device itself.

A new medium is a new module with its Transport and one entry in `MEDIA`: the memory type it takes, and a factory
that returns the transport, or None where it cannot run here (no device, a library missing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kvd_client.layout import KvLayout

from kvd.config import TransportsConfig
from kvd.errors import InvalidArgument, Unimplemented
from kvd.memory.region import PinnedRegion
from kvd.transports.base import Attachment, Transport
from kvd.transports.cpu import CpuTransport
from kvd.types import CpuMemory, CudaMemory, PeerIdentity, TransportKind, WorkerMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Medium:
    kind: TransportKind
    build: Callable[[TransportsConfig, PinnedRegion | None], Transport | None]


def _cpu_transport(config: TransportsConfig, pinned: PinnedRegion | None) -> Transport:
    return CpuTransport(config.cpu_copy_threads)


def _cuda_transport(config: TransportsConfig, pinned: PinnedRegion | None) -> Transport | None:
    """The CUDA IPC transport when CuPy with a CUDA device is importable; else None (a CPU-only daemon)."""
    try:
        import cupy  # noqa: F401 - only to tell "not installed" apart from "no device"

        from kvd.transports.cuda.transport import CudaTransport
    except ImportError as exc:
        log.info("CUDA IPC transport unavailable (%s): install kvd[cuda] on GPU nodes", exc)
        return None
    if not CudaTransport.available():
        log.info("CUDA IPC transport unavailable: no CUDA device")
        return None
    return CudaTransport(config, pinned)


# Worker memory type -> the medium that reaches it. Transports start in this order.
MEDIA: dict[type, Medium] = {
    CpuMemory: Medium(TransportKind.CPU, _cpu_transport),
    CudaMemory: Medium(TransportKind.CUDA_IPC, _cuda_transport),
}


class TransportRouter:
    def __init__(self, config: TransportsConfig, pinned: PinnedRegion | None) -> None:
        """`pinned`: the host pool's region, for transports that page-lock it (None: leave it pageable)."""
        self._config = config
        self._pinned = pinned
        self._transports: dict[TransportKind, Transport] = {}

    @property
    def kinds(self) -> tuple[TransportKind, ...]:
        return tuple(self._transports)

    async def start(self) -> None:
        """Bring up every transport that can run here; the CUDA one page-locks the pinned region."""
        for medium in MEDIA.values():
            transport = medium.build(self._config, self._pinned)
            if transport is not None:
                self._transports[medium.kind] = transport
        for transport in self._transports.values():
            await transport.start()
        log.info("transports ready: %s", ", ".join(self._transports))

    def block_limit(self, memory: WorkerMemory) -> tuple[int, str] | None:
        """The largest block the medium of `memory` moves, and the setting behind it (None: no limit of its own).
        From the configuration alone, so a layout is refused at registration even where the transport cannot run:
        a GPU copy stages each block whole in one chunk-sized device buffer."""
        if isinstance(memory, CudaMemory):
            return self._config.cuda_chunk_bytes, "transports.cuda_chunk_bytes"
        return None

    async def attach(self, memory: WorkerMemory, layout: KvLayout, peer: PeerIdentity) -> Attachment:
        medium = MEDIA.get(type(memory))
        if medium is None:
            raise InvalidArgument("unknown worker memory kind")
        transport = self._transports.get(medium.kind)
        if transport is None:
            raise Unimplemented(f"this daemon has no {medium.kind} transport (no CUDA device or no CuPy)")
        return await transport.attach(memory, layout, peer)

    async def stop(self) -> None:
        for transport in self._transports.values():
            await transport.stop()
        self._transports.clear()
