"""How the daemon reaches a worker's KV memory. One Transport per medium (CPU address space, CUDA IPC); a session
gets an Attachment from the transport that matches its memory, and all its copies go through it.

An attachment copies whole blocks between the worker's cache (by block index) and host-pool slots (by address: a
plain int per block, built once per request, every slot of a request the layout's block size);
every index, offset and size was bounds-checked by the service before it gets here, and each attachment checks its
own memory against the layout once, in `attach`.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence

from kvd_client.layout import KvLayout

from kvd.logs import Throttled
from kvd.memory.progress import LayerProgress
from kvd.types import PeerIdentity, Stamps, TransportKind, WorkerMemory

_throttled = Throttled(logging.getLogger(__name__))


class Attachment(abc.ABC):
    """A session's view of its worker's memory."""

    kind: TransportKind

    @abc.abstractmethod
    async def save(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None,
        while_copying: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """Copy worker blocks into the slots at `addresses`, after the worker's `ready_event` (if any). Raises
        TransferError. Stamps the transport's stages (enqueue_start, enqueue_end, copy_done) on `stamps`, if given.
        `while_copying` runs once the copy is queued, on whichever thread queued it (so it must not touch what only
        the event loop may), at most once: bookkeeping that overlaps the copy instead of following it. An exception
        it raises is logged; the copy goes on."""

    @abc.abstractmethod
    async def load(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None
    ) -> bytes:
        """Copy the slots at `addresses` into worker blocks, after `ready_event`; returns the event the worker must
        wait on (or b""). Stamps `stamps` as save does."""

    async def load_layers(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes,
        progress: LayerProgress, stamps: Stamps = None,
    ) -> bytes:  # fmt: skip
        """A load in layer order (an in-step load): `progress.layer_done(i)` once layer i of every block is in place,
        from any thread, never earlier (a transport may store the counter itself, then it calls `progress.wake()`).
        The caller stores the final counter (`progress.finish`) once this returned: every earlier store must have
        landed by then. This default copies everything, then reports every layer: correct, without the overlap."""
        event = await self.load(block_indices, addresses, ready_event, stamps)
        for layer in range(progress.layers):
            progress.layer_done(layer)
        return event

    def check(self) -> None:  # noqa: B027 - optional hook
        """PermissionDenied if this session may not copy any more (its process changed); checked as every save or
        load is accepted, and again by the copy itself."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Drop every mapping of the worker's memory. Called once, with no copy in flight."""


class Transport(abc.ABC):
    kind: TransportKind

    @abc.abstractmethod
    async def attach(self, memory: WorkerMemory, layout: KvLayout, peer: PeerIdentity) -> Attachment:
        """Check `memory` against `layout` (raise InvalidArgument / PermissionDenied) and map it."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Make the transport ready (devices, streams, pinned registration)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release everything; every attachment is already closed."""


def block_segments(layout: KvLayout) -> list[tuple[int, int, int, int]]:
    """For every (layer, segment) of a block: (layer, offset of the segment in the worker tensor for block 0,
    its stride per block (= its size), offset inside the stored block). Block b's segment is at +b * size."""
    out = []
    stored = 0
    for li, layer in enumerate(layout.layers):
        for seg in range(layer.segments_per_block):
            out.append((li, seg * layer.segment_stride, layer.segment_bytes, stored))
            stored += layer.segment_bytes
    return out


def call_guarded(callback: Callable[[], None], kind: str) -> None:
    """A callback a transport runs beside a copy (`while_copying`, a waiter's `on_done`) never stops the thread it
    runs on nor fails that copy; its failure is logged, once a minute per kind."""
    try:
        callback()
    except Exception:
        _throttled.exception(kind, "%s callback", kind)
