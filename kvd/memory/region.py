"""What a transport needs to know about the host pool: one mapping's address and size, nothing of its bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PinnedRegion:
    """A host mapping to page-lock once for DMA (the CUDA transport registers it with cudaHostRegister)."""

    base_address: int
    nbytes: int
