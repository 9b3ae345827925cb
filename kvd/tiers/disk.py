"""L2: a local directory, one file per block (layout and atomic writes: kvd.tiers.disk_files).

The index (which blocks are here, their sizes, LRU order) lives in memory on the event-loop thread and is rebuilt at
start by scanning the directory in the I/O pool, ordered by modification time (reads bump it, so LRU survives a
restart). Until the scan finishes, a key not in the index yet is looked for on disk. The tier's bytes are the sizes
of its files.

All file I/O and checksumming run in this tier's thread pool (`io_threads`). Before each write the tier evicts
least-recently-used blocks to fit its room: `capacity_bytes`, or less when the filesystem has less to give
(kvd.tiers.disk_space). A write that fails for lack of space makes room and is tried once more; a filesystem that
still refuses writes degrades the tier until a probe write succeeds. Any other failed write is dropped and counted;
a read that fails is a miss. Repeating warnings are rate-limited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, TypeVar

from kvd.config import DiskTierConfig, human_bytes
from kvd.logs import Throttled
from kvd.memory.index_registry import BlockListener
from kvd.memory.shm_index import Source
from kvd.tiers import disk_files
from kvd.tiers.base import HEADER_BYTES, Buffer, StorageBackend, namespace_digest, stop_task
from kvd.tiers.disk_files import IndexKey
from kvd.tiers.disk_space import DEVICE, NO_SPACE, Room, Writability
from kvd.types import BlockKey, Tier

log = logging.getLogger(__name__)

T = TypeVar("T")


class DiskBackend(StorageBackend):
    tier: ClassVar[Tier] = Tier.DISK

    def __init__(self, config: DiskTierConfig, *, fsync: bool = False, name: str = "disk") -> None:
        if config.path is None:
            raise ValueError("the disk tier needs disk.path")
        super().__init__(name, config.capacity_bytes)
        self.root = Path(config.path)
        self.fsync = fsync  # durability across power loss; atomicity (rename) holds either way
        self._executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvd-disk")
        self._index: OrderedDict[IndexKey, int] = OrderedDict()  # blob sizes, least recently used first
        self._stored = 0  # bytes of the blobs in the index
        self._inflight = 0  # bytes of writes in flight: room is made for them before they start
        self._writing: set[IndexKey] = set()
        self._gone: set[IndexKey] = set()  # removed before the scan ended: not to be indexed from its listing
        self._scan: asyncio.Task[None] | None = None
        self.indexed = asyncio.Event()
        self.listener: BlockListener | None = None  # the published index: told of each block in and out
        self._namespaces: dict[str, str] = {}  # namespace digest hex -> namespace key, for the listener
        self.room = Room(self.root, config.capacity_bytes, config.reserve_bytes)
        self.writability = Writability(name, self.root, config.retry_ms / 1000, self._run)
        self.dropped = {"too_big": 0, "degraded": 0, "failed": 0}
        self.space_evictions = 0  # blocks evicted because the filesystem (not the capacity) ran out of room
        self._warn = Throttled(log)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._scan is None:
            self._scan = asyncio.get_running_loop().create_task(self._rebuild_index(), name="kvd-disk-scan")

    async def wait_indexed(self) -> None:
        await self.indexed.wait()

    async def close(self) -> None:
        await stop_task(self._scan)
        await self.writability.close()
        self._executor.shutdown(wait=True)

    @property
    def healthy(self) -> bool:
        """False while the filesystem refuses writes (reads still work)."""
        return not self.writability.degraded

    async def _rebuild_index(self) -> None:
        start = time.monotonic()
        try:
            found = await self._run(disk_files.scan, self.root)
        except OSError as exc:
            log.warning("disk tier %s: cannot scan %s: %s", self.name, self.root, exc)
            found = []
        # Anything written since start is newer than every file found: keep it at the most-recent end.
        fresh = self._index
        self._index = OrderedDict((k, size) for k, size in found if k not in fresh and k not in self._gone)
        self._stored += sum(self._index.values())
        self._index.update(fresh)
        self._gone.clear()
        self.indexed.set()
        for ikey in self._index:
            if ikey not in fresh:
                self._tell(ikey, stored=True)  # found by the scan, of a namespace already published
        log.info(
            "disk tier %s: %d blocks, %s indexed in %.2f s",
            self.name,
            len(self._index),
            human_bytes(self._stored),
            time.monotonic() - start,
        )
        await self._run(self.room.sample, self._stored)
        await self._evict_to(self.room.limit())

    # -- the backend API -----------------------------------------------------------------------------------------

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> list[bool]:
        return list(await asyncio.gather(*(self._put_one(key, payload) for key, payload in items)))

    async def _put_one(self, key: BlockKey, payload: Buffer) -> bool:
        ikey = _index_key(key)
        if ikey in self._index or ikey in self._writing:
            return True  # content-addressed: the same key is the same bytes
        size = HEADER_BYTES + len(key[1]) + len(payload)
        if size > self.capacity_bytes or self.writability.degraded:
            self._drop("too_big" if size > self.capacity_bytes else "degraded")
            return False
        self._writing.add(ikey)
        self._inflight += size
        try:
            written = await self._write_with_room(ikey, key, payload, size)
        finally:
            self._inflight -= size
            self._writing.discard(ikey)
        if written is None:
            return False
        self._index[ikey] = written
        self._stored += written
        self._gone.discard(ikey)
        self._namespaces[ikey[0]] = key[0]
        self._tell(ikey, stored=True)
        self.counters.puts += 1
        self.counters.bytes_written += written
        return True

    async def _write_with_room(self, ikey: IndexKey, key: BlockKey, payload: Buffer, size: int) -> int | None:
        """Evict to fit the room, write; on ENOSPC/EDQUOT make `size` more room and try once more."""
        if self.room.due():
            await self._run(self.room.sample, self._stored)
        await self._evict_to(self.room.limit())
        path = self._path(ikey)
        for retry in (False, True):
            try:
                written = await self._run(disk_files.write_blob, path, key, payload, self.fsync)
            except OSError as exc:
                if not retry and exc.errno in NO_SPACE and self._index:
                    await self._run(self.room.sample, self._stored)
                    before = self.counters.evictions
                    await self._evict_to(min(self.room.limit(), self._stored + self._inflight - size))
                    self.space_evictions += self.counters.evictions - before
                    continue
                self._write_failed(exc, size)
                return None
            self.writability.recovered()
            return written
        return None

    def _write_failed(self, exc: OSError, size: int) -> None:
        self.counters.errors += 1
        self._drop("failed")
        if exc.errno in DEVICE:
            self.writability.failed(exc, size)  # logs once, until a probe write succeeds
        else:
            self._warn.warning(f"write-{exc.errno}", "disk tier %s: write dropped: %s", self.name, exc)

    def _drop(self, reason: str) -> None:
        self.counters.dropped_writes += 1
        self.dropped[reason] += 1

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self._get_one(key) for key in keys)))

    async def _get_one(self, key: BlockKey) -> Buffer | None:
        ikey = _index_key(key)
        self.counters.gets += 1
        if ikey not in self._index and self.indexed.is_set():
            return None
        try:
            payload = await self._run(disk_files.read_blob, self._path(ikey), key)
        except FileNotFoundError:
            self._forget(ikey)
            return None
        except OSError as exc:
            self.counters.errors += 1
            self._warn.warning("read", "disk tier %s: read failed: %s", self.name, exc)
            return None
        if payload is None:
            self.counters.corrupt += 1
            self._warn.warning("corrupt", "disk tier %s: %s failed verification; deleted", self.name, self._path(ikey))
            await self._delete_one(ikey)
            return None
        if ikey not in self._index:  # found on disk before the scan reached it
            size = HEADER_BYTES + len(key[1]) + len(payload)
            self._index[ikey] = size
            self._stored += size
            self._tell(ikey, stored=True)
        self._index.move_to_end(ikey)
        self.counters.get_hits += 1
        self.counters.bytes_read += len(payload)
        return payload

    async def sizes(self, keys: Sequence[BlockKey]) -> list[int | None]:
        ikeys = [_index_key(key) for key in keys]
        out = [self._index.get(ikey) for ikey in ikeys]
        if not self.indexed.is_set():
            missing = [i for i, size in enumerate(out) if size is None]
            if missing:
                found = await self._run(disk_files.stat_sizes, [self._path(ikeys[i]) for i in missing])
                for i, size in zip(missing, found, strict=True):
                    out[i] = size
        return out

    async def delete(self, keys: Sequence[BlockKey]) -> None:
        await asyncio.gather(*(self._delete_one(_index_key(key)) for key in keys))

    def used(self) -> tuple[int, int]:
        return self._stored, len(self._index)

    def publish_to(self, listener: BlockListener) -> bool:
        self.listener = listener
        return True

    def resident(self, namespace_key: str) -> list[bytes]:
        """The hashes of `namespace_key`'s blocks indexed here; from now on the listener hears of this namespace."""
        digest = namespace_digest(namespace_key).hex()
        self._namespaces[digest] = namespace_key
        return [bytes.fromhex(hash_hex) for ns_hex, hash_hex in self._index if ns_hex == digest]

    def extra_counters(self) -> dict[str, int]:
        out = {f"dropped_{reason}": n for reason, n in self.dropped.items()}
        out["degraded"] = int(self.writability.degraded)
        out["space_evictions"] = self.space_evictions
        out["room_bytes"] = self.room.limit()
        out["fs_free_bytes"] = self.room.free_bytes
        return out

    # -- internals -----------------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def path_of(self, key: BlockKey) -> Path:
        """Where `key`'s blob lives (whether or not it is stored)."""
        return self._path(_index_key(key))

    def _path(self, ikey: IndexKey) -> Path:
        return disk_files.blob_path(self.root, ikey)

    def _forget(self, ikey: IndexKey) -> None:
        size = self._index.pop(ikey, None)
        if size is not None:
            self._stored -= size
            self._tell(ikey, stored=False)
        if not self.indexed.is_set():
            self._gone.add(ikey)

    def _tell(self, ikey: IndexKey, *, stored: bool) -> None:
        """Report a block entering or leaving this tier (before its file is removed) to the published index."""
        namespace = self._namespaces.get(ikey[0])
        if self.listener is None or namespace is None:
            return
        key = (namespace, bytes.fromhex(ikey[1]))
        if stored:
            self.listener.stored(key, Source.DISK)
        else:
            self.listener.dropped(key, Source.DISK)

    async def _delete_one(self, ikey: IndexKey) -> None:
        self._forget(ikey)
        try:
            await self._run(disk_files.unlink, self._path(ikey))
        except OSError as exc:
            self.counters.errors += 1
            self._warn.warning("delete", "disk tier %s: cannot delete %s: %s", self.name, self._path(ikey), exc)

    async def _evict_to(self, limit: int) -> None:
        """Drop least-recently-used blocks until what is stored plus writes in flight fits `limit`."""
        victims: list[Path] = []
        while self._stored + self._inflight > limit and self._index:
            ikey, _ = next(iter(self._index.items()))
            self._forget(ikey)
            self.counters.evictions += 1
            victims.append(self._path(ikey))
        if victims:
            try:
                await self._run(disk_files.unlink_all, victims)
            except OSError as exc:
                self.counters.errors += 1
                self._warn.warning("evict", "disk tier %s: eviction: %s", self.name, exc)


def _index_key(key: BlockKey) -> IndexKey:
    namespace, block_hash = key
    return namespace_digest(namespace).hex(), block_hash.hex()
