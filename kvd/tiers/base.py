"""What a tier below L1 is: a small batched, async backend API, and the one blob format every backend stores.

A backend stores opaque blobs under a block key and knows nothing of sessions, layouts or vLLM: the store hands it a
block's bytes and the key (whose namespace string carries the model, the layout fingerprint and the TP rank), and
asks for them back. Adding a backend means subclassing `StorageBackend` and composing it in
`kvd.tiers.build.build_store`; nothing else changes.

Blob format (little-endian), so that nothing read back is ever taken for a block it is not:

    magic      4s   b"KVDB"
    version    u16  FORMAT_VERSION
    hash_len   u16  length of the block hash that follows the header
    length     u64  payload length
    namespace  16s  xxh3-128 of the namespace key (model | layout fingerprint | TP rank)
    checksum   u64  xxh3-64 over the header fields above, the block hash and the payload
    block hash (hash_len bytes), then the payload

A blob that fails any check (truncated, another key's, another format, a flipped bit) is a miss: the backend counts
it in `corrupt` and deletes it.
"""

from __future__ import annotations

import abc
import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import xxhash

from kvd.memory.index_registry import BlockListener
from kvd.types import BlockKey, Tier, TierSnapshot

Buffer = bytes | bytearray | memoryview

MAGIC = b"KVDB"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHQ16s")  # the checksummed part of the header
_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = _PREFIX.size + _CHECKSUM.size


class BlobError(ValueError):
    """A stored blob that does not verify: treated as a miss, never as data."""


def namespace_digest(namespace_key: str) -> bytes:
    """16 bytes naming a namespace (model + layout fingerprint + TP rank) in headers, file names and Redis keys."""
    return xxhash.xxh3_128_digest(namespace_key.encode())


def blob_header(key: BlockKey, payload: Buffer) -> bytes:
    """Header + block hash for `payload`; the blob is this followed by the payload (written without joining them
    where the backend can, e.g. os.writev)."""
    namespace, block_hash = key
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(block_hash), len(payload), namespace_digest(namespace))
    digest = xxhash.xxh3_64()
    digest.update(prefix)
    digest.update(block_hash)
    digest.update(payload)
    return prefix + _CHECKSUM.pack(digest.intdigest()) + block_hash


def encode_blob(key: BlockKey, payload: Buffer) -> bytes:
    return b"".join((blob_header(key, payload), payload))


def decode_blob(key: BlockKey, blob: Buffer) -> memoryview:
    """The payload of `blob` (a view into it) if it is a well-formed blob of `key`; BlobError otherwise."""
    view = memoryview(blob).cast("B")
    if len(view) < HEADER_BYTES:
        raise BlobError(f"blob of {len(view)} bytes is shorter than a header")
    magic, version, hash_len, length, ns = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise BlobError("bad magic")
    if version != FORMAT_VERSION:
        raise BlobError(f"format version {version}, expected {FORMAT_VERSION}")
    namespace, block_hash = key
    if ns != namespace_digest(namespace):
        raise BlobError("blob belongs to another namespace (model, layout fingerprint or rank)")
    start = HEADER_BYTES + hash_len
    if len(view) != start + length:
        raise BlobError(f"blob is {len(view)} bytes, header says {start + length}")
    if view[HEADER_BYTES:start] != block_hash:
        raise BlobError("blob belongs to another block")
    (checksum,) = _CHECKSUM.unpack_from(view, _PREFIX.size)
    digest = xxhash.xxh3_64()
    digest.update(view[: _PREFIX.size])
    digest.update(view[HEADER_BYTES:])
    if digest.intdigest() != checksum:
        raise BlobError("checksum mismatch")
    return view[start:]


@dataclass(slots=True)
class BackendCounters:
    """What every backend counts (mutable; read through `StorageBackend.snapshot`)."""

    gets: int = 0
    get_hits: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    dropped_writes: int = 0  # a put that failed (disk full, store down...): the block is simply not in this tier
    corrupt: int = 0  # blobs that failed verification (each one deleted)
    evictions: int = 0
    errors: int = 0  # I/O or connection errors, whatever they cost


async def stop_task(task: asyncio.Task[Any] | None, poll_s: float = 0.05) -> None:
    """Cancel a backend's background task and wait until it has ended. The cancel is repeated until it takes: a
    library awaited inside the task (a store client cleaning up a connection) may swallow one, and the task would
    then carry on into its next sleep and hold up the daemon's shutdown."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=poll_s)
    if not task.cancelled():
        task.exception()  # retrieved: an error of a task being stopped is of no interest any more


class StorageBackend(abc.ABC):
    """One tier below L1. Every method is batched and async, never raises for I/O trouble (a failed read is a
    miss, a failed write is dropped and counted) and never blocks the event loop."""

    tier: ClassVar[Tier]

    def __init__(self, name: str, capacity_bytes: int) -> None:
        self.name = name
        self.capacity_bytes = capacity_bytes  # 0: unbounded here (the store behind it decides)
        self.counters = BackendCounters()

    async def start(self) -> None:  # noqa: B027 (optional hook: most backends need no set-up)
        """Begin serving (open clients, start rebuilding an index). Must return quickly."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release clients and threads."""

    @abc.abstractmethod
    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> list[bool]:
        """Store each payload; True where it is now stored."""

    @abc.abstractmethod
    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        """The verified payload of each key, or None (absent, unreachable, or failed verification: deleted)."""

    @abc.abstractmethod
    async def sizes(self, keys: Sequence[BlockKey]) -> list[int | None]:
        """The stored blob size of each key, None where absent. (Lookups use the size for the cost model.)"""

    @abc.abstractmethod
    async def delete(self, keys: Sequence[BlockKey]) -> None: ...

    async def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        return [size is not None for size in await self.sizes(keys)]

    def publish_to(self, listener: BlockListener) -> bool:
        """Report blocks in and out to the published index from now on; False: not a local tier (not published)."""
        return False

    def resident(self, namespace_key: str) -> list[bytes]:
        """The hashes of `namespace_key`'s blocks held here, for a local tier that publishes (else none)."""
        return []

    @property
    def healthy(self) -> bool:
        """False while the backend cannot serve (its store is down); it keeps trying to come back by itself."""
        return True

    @abc.abstractmethod
    def used(self) -> tuple[int, int]:
        """(bytes, blocks) stored now, as far as this daemon knows."""

    def extra_counters(self) -> dict[str, int]:
        """Backend-specific figures for stats (exported as `tier_<name>_<key>`)."""
        return {}

    def snapshot(self, hits: int, misses: int) -> TierSnapshot:
        used_bytes, blocks = self.used()
        return TierSnapshot(
            tier=self.tier,
            name=self.name,
            capacity_bytes=self.capacity_bytes,
            used_bytes=used_bytes,
            blocks=blocks,
            hits=hits,
            misses=misses,
            evictions=self.counters.evictions,
            corrupt=self.counters.corrupt,
            healthy=self.healthy,
        )
