"""Value types that cross below the rpc layer. Protobuf never goes further than kvd.rpc."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvd_client.layout import KvLayout, Namespace

# Shared with the client: Tier is numbered as kvd.v1.Tier; DaemonStages is what a notice's stages say.
from kvd_client.types import DaemonStages, LookupResult, OpKind, Tier

from kvd.errors import InvalidArgument
from kvd.process import PeerProcess

BlockHash = bytes
BlockKey = tuple[str, BlockHash]  # (namespace key, block hash): different models never share a key


class TransportKind(enum.StrEnum):
    CPU = "cpu"
    CUDA_IPC = "cuda_ipc"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who registered, as the kernel says: the process (held by a pidfd since it connected to the credential socket),
    the uid and gid it connected with, and the tenant whose blocks it sees. Never a pid or uid a request claims."""

    process: PeerProcess
    tenant: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def uid(self) -> int:
        return self.process.uid

    @property
    def gid(self) -> int:
        return self.process.gid


@dataclass(frozen=True, slots=True)
class InStep:
    """An in-step load's entry in its session's progress page, and the entry's counter before it."""

    slot: int
    base: int


@dataclass(frozen=True, slots=True)
class SharedGrant:
    """What a session may map (kvd_client.fdpass.GRANT_* bits, one new descriptor each, in bit order: the receiver
    closes them) and the event set when the session ends (the rpc layer then drops the connection it holds open)."""

    what: int
    fds: tuple[int, ...]
    ended: asyncio.Event


@dataclass(frozen=True, slots=True)
class CpuRegion:
    address: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class CpuMemory:
    layers: tuple[CpuRegion, ...]


class PassedFds:
    """File descriptors a worker passed with its credential token (driver-mapped KV memory). Whoever imports them
    takes them (`take`); whatever is left is closed by `close`, so each is closed exactly once, by one owner."""

    def __init__(self, fds: Sequence[int] = ()) -> None:
        self._fds: list[int] | None = list(fds)
        self._lock = threading.Lock()
        self.count = len(self._fds)

    def take(self) -> list[int]:
        """All of them, now the caller's to close; [] once taken or closed."""
        with self._lock:
            fds, self._fds = self._fds or [], None
        return fds

    def close(self) -> None:
        for fd in self.take():
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True, slots=True)
class VmmChunk:
    """One physical allocation of a driver-mapped range: mapped at `offset`, `nbytes` long, passed as descriptor
    number `fd_index` of the registration's PassedFds."""

    offset: int
    nbytes: int
    fd_index: int


@dataclass(frozen=True, slots=True)
class CudaAllocation:
    ipc_handle: bytes  # empty for driver-mapped memory
    nbytes: int
    vmm_chunks: tuple[VmmChunk, ...] = ()


@dataclass(frozen=True, slots=True)
class CudaLayer:
    allocation: int
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class CudaMemory:
    device_uuid: str
    allocations: tuple[CudaAllocation, ...]
    layers: tuple[CudaLayer, ...]
    fds: PassedFds = field(default_factory=PassedFds, compare=False)  # for allocations with vmm_chunks


WorkerMemory = CpuMemory | CudaMemory


@dataclass(frozen=True, slots=True)
class Registration:
    namespace: Namespace
    layout: KvLayout | None  # None: a lookup-only session (vLLM's scheduler side)
    memory: WorkerMemory | None
    peer: PeerIdentity
    worker_name: str


@dataclass(frozen=True, slots=True)
class BlockBatch:
    """The blocks of one save or load, column by column: `hashes[i]` is the key of worker block `indices[i]`. Two
    lists per request instead of an object per block (a large request has hundreds)."""

    indices: Sequence[int]
    hashes: Sequence[BlockHash]

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.hashes):
            raise InvalidArgument(f"{len(self.indices)} block indices for {len(self.hashes)} block hashes")

    def __len__(self) -> int:
        return len(self.hashes)


Stamps = DaemonStages | None  # an operation's stage times, where it keeps them (every layer stamps its own stages)


@dataclass(frozen=True, slots=True)
class SessionRef:
    """What a session-scoped call names: the session's id and the key RegisterSession handed its owner. The key is
    secret: never logged, never shown (its repr hides it)."""

    id: str
    key: bytes

    def __repr__(self) -> str:
        return f"SessionRef({self.id[:12]!r}, key=<{len(self.key)} bytes>)"


@dataclass(frozen=True, slots=True)
class Notice:
    """An operation's end, as the daemon records it; the servicer sends it as a kvd.v1.CompletionNotice on the
    session's Watch stream (the client turns that into a kvd_client.Completion)."""

    operation_id: int
    kind: OpKind
    ok: bool
    failed_hashes: tuple[BlockHash, ...] = ()
    error: str = ""
    client_tag: int = 0
    bytes_moved: int = 0
    duration_us: int = 0
    done_event: bytes = b""
    stages: DaemonStages | None = None  # complete once queued but for `sent`, which the servicer stamps
    refused_status: int = 0  # a request refused before it became an operation: the gRPC status code it got


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    label: str  # kvd_client.types.session_label of the id: Stats never shows ids or keys
    tenant: str
    worker_name: str
    namespace: Namespace
    pid: int
    transport: str
    saves: int
    loads: int
    in_flight: int
    ring: bool = False


@dataclass(frozen=True, slots=True)
class TierSnapshot:
    tier: Tier
    name: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt: int = 0
    healthy: bool = True


@dataclass(slots=True)
class ServiceCounters:
    """What the service counts since the daemon started (the same names as kvd.v1.StatsResponse's fields)."""

    lookups: int = 0
    lookup_blocks: int = 0
    lookup_hit_blocks: int = 0
    saves_ok: int = 0
    saves_failed: int = 0
    loads_ok: int = 0
    loads_failed: int = 0
    bytes_saved: int = 0
    bytes_loaded: int = 0
    load_hit_blocks: int = 0
    load_miss_blocks: int = 0
    ring_records: int = 0  # saves and loads submitted through sessions' rings
    ring_refused: int = 0  # ring records refused (malformed, or what the RPC would have refused)

    def count_operation(self, kind: OpKind, ok: bool, moved: int) -> None:
        if kind is OpKind.SAVE:
            self.bytes_saved += moved
            if ok:
                self.saves_ok += 1
            else:
                self.saves_failed += 1
        else:
            self.bytes_loaded += moved
            if ok:
                self.loads_ok += 1
            else:
                self.loads_failed += 1


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    boot_id: str
    version: str
    uptime_s: int
    sessions: tuple[SessionSnapshot, ...]
    tiers: tuple[TierSnapshot, ...]
    counters: ServiceCounters = field(default_factory=ServiceCounters)  # a copy, never the live one
    tier_counters: dict[str, float] = field(default_factory=dict)


__all__ = [
    "BlockBatch",
    "BlockHash",
    "BlockKey",
    "CpuMemory",
    "CpuRegion",
    "CudaAllocation",
    "CudaLayer",
    "CudaMemory",
    "DaemonStages",
    "LookupResult",
    "Notice",
    "OpKind",
    "PeerIdentity",
    "Registration",
    "ServiceCounters",
    "SessionRef",
    "SessionSnapshot",
    "Stamps",
    "StatsSnapshot",
    "Tier",
    "TierSnapshot",
    "TransportKind",
    "WorkerMemory",
]


def namespace_key(tenant: str, namespace: Namespace) -> str:
    """Where a namespace's blocks live: inside the tenant of the peer that registered it. Two peers share blocks
    iff they have the same tenant and the same namespace; a client cannot name another tenant."""
    return f"{tenant}|{namespace.key}"
