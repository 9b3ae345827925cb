"""A worker's KV cache as one device sees it: the allocations a session opened and the segment tables the
gather/scatter kernels read (the engine thread maps and unmaps it; copy jobs use it in between)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvd_client.layout import KvLayout

from kvd.transports.base import block_segments
from kvd.transports.cuda.vmm import VmmRange


@dataclass(eq=False, slots=True)
class WorkerMapping:
    """One session's KV cache as this device sees it: its opened allocations, the segment
    tables the kernels read, and the worker's interprocess events opened so far."""

    layout: KvLayout
    chunk_blocks: int  # blocks per chunk: one kernel launch and one staging buffer each
    opened: list[bytes] = field(default_factory=list)  # IPC handles this session holds a reference to
    vmm_ranges: list[VmmRange] = field(default_factory=list)  # its driver-mapped allocations, imported by fd
    worker_events: dict[bytes, int] = field(default_factory=dict)
    tables: Any = None  # (segment bases, lengths, offsets in the stored block) as device arrays
    layer_parts: Any = None  # per layer, its slice of the tables (layered.py; built by the first in-step load)
    progress_pages: dict[int, int] = field(default_factory=dict)  # registered progress pages: host -> device address
    nseg: int = 0
    vec16: int = 0

    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes

    def segment_columns(self, layer_bases: list[int]) -> tuple[list[int], list[int], list[int]]:
        """(device address of block 0's segment, segment length, offset in the stored block) for every (layer,
        segment), given each layer tensor's device address; sets nseg and vec16 (16-byte vector copies are safe
        only when every address, length and offset is 16-byte aligned)."""
        bases, lengths, offsets = [], [], []
        for li, segment_offset, size, stored in block_segments(self.layout):
            bases.append(layer_bases[li] + segment_offset)
            lengths.append(size)
            offsets.append(stored)
        self.nseg = len(bases)
        self.vec16 = int(all(v % 16 == 0 for v in (*bases, *lengths, *offsets, self.block_bytes)))
        return bases, lengths, offsets
