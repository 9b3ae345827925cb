"""The client's value types."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OpKind(enum.StrEnum):
    SAVE = "save"
    LOAD = "load"


class Tier(enum.IntEnum):
    """Numbered as kvd.v1.Tier."""

    UNSPECIFIED = 0
    HOST_MEMORY = 1
    DISK = 2
    REMOTE = 3


@dataclass(frozen=True, slots=True)
class LookupResult:
    hit_blocks: int
    tiers: tuple[Tier, ...]


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished save or load. `failed_hashes` lists the blocks that did not make it (all of them when the daemon
    was unreachable); for a load those blocks must be recomputed."""

    op_id: int
    kind: OpKind
    ok: bool
    failed_hashes: frozenset[bytes]
    error: str = ""
    nbytes: int = 0
    duration_s: float = 0.0
    done_event: bytes = b""  # CUDA loads: wait on this before reading the blocks (KvdClient.wait_loaded does)
