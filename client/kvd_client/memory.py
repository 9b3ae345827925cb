"""The worker's KV memory as the client tells the daemon about it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvd_client import messages
from kvd_client.fdpass import close_fds
from kvd_client.layout import KvLayout
from kvd_client.wire.kvd.v1 import kvd_pb2


class KvMemory:
    """Its layout, its description on the wire, the file descriptors of driver-mapped memory (passed again at every
    registration, so kept open while registered), and the tensors, kept alive while the daemon may copy into
    them."""

    def __init__(self) -> None:
        self.layout: KvLayout | None = None
        self.message: kvd_pb2.CpuMemory | Any | None = None  # CpuMemory or CudaMemory message; None: lookup-only
        self.cuda = False
        self.fds: list[int] = []
        self._tensors: dict[str, Any] = {}

    def describe(self, kv_caches: Mapping[str, Any], *, block_dim: int, block_size_tokens: int) -> None:
        tensors = dict(kv_caches)
        layout = KvLayout.from_tensors(tensors, block_dim=block_dim, block_size_tokens=block_size_tokens)
        message, cuda, fds = messages.worker_memory(list(tensors.values()))
        close_fds(self.release())
        self.layout, self.message, self.cuda, self.fds, self._tensors = layout, message, cuda, fds, tensors

    def release(self) -> list[int]:
        """Forget the memory; its descriptors, for the caller to close once the daemon has let go of it."""
        fds = self.fds
        self.layout, self.message, self.cuda, self.fds, self._tensors = None, None, False, [], {}
        return fds

    def ready_event(self, blocks: Sequence[tuple[int, bytes]], given: bytes = b"") -> bytes:
        """For a CUDA cache, unless one is given: an event recorded on the caller's current stream, after which the
        daemon copies (nothing queued before it still writes or reads those blocks)."""
        if given or not self.cuda or not blocks:
            return given
        from kvd_client.cuda import record_ready_event

        return record_ready_event()
