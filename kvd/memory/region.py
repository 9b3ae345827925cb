"""What a transport needs to know about the host pool: one mapping's address and size, nothing of its bookkeeping;
and where the pool's pages may be placed (the CPUs of a NUMA node)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NODES = Path("/sys/devices/system/node")


@dataclass(frozen=True, slots=True)
class PinnedRegion:
    """A host mapping to page-lock once for DMA (the CUDA transport registers it with cudaHostRegister)."""

    base_address: int
    nbytes: int


def node_cpus(node: int, nodes: Path = NODES) -> set[int]:
    """The CPUs of NUMA node `node` (its cpulist, e.g. "0-15,32-47"); empty where the node does not exist."""
    try:
        text = (nodes / f"node{node}" / "cpulist").read_text().strip()
    except OSError:
        return set()
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus
