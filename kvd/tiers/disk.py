"""L2: a local directory, one file per block.

    <path>/<namespace digest hex>/<first byte of the hash, hex>/<hash hex>

Every file is a blob (kvd.tiers.base) written to a temporary name in the same directory and renamed over the final
one, so a crash leaves either the whole blob or none of it (and a stray `.tmp-*` file, removed at the next start).
The index (which blocks are here, their sizes, LRU order) lives in memory on the event-loop thread and is rebuilt at
start by scanning the directory in the I/O pool, ordered by modification time (reads bump it, so LRU survives a
restart). Until the scan finishes, a key not in the index yet is looked for on disk.

All file I/O and checksumming run in this tier's thread pool (`io_threads`). A write that fails for any OS reason
(disk full, quota, read-only, permissions) is dropped and counted; a read that fails is a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, TypeVar

from kvd.config import DiskTierConfig, human_bytes
from kvd.memory.index_registry import BlockListener
from kvd.memory.shm_index import Source
from kvd.tiers.base import HEADER_BYTES, Buffer, StorageBackend, blob_header, decode_blob, namespace_digest
from kvd.types import BlockKey, Tier

log = logging.getLogger(__name__)

_IndexKey = tuple[str, str]  # (namespace digest hex, block hash hex): also the file's last two path parts
_TMP_PREFIX = ".tmp-"
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
        self._index: OrderedDict[_IndexKey, int] = OrderedDict()  # blob sizes, least recently used first
        self._stored = 0  # bytes of the blobs in the index
        self._inflight = 0  # bytes of writes in flight: room is made for them before they start
        self._writing: set[_IndexKey] = set()
        self._scan: asyncio.Task[None] | None = None
        self.indexed = asyncio.Event()
        self.listener: BlockListener | None = None  # the published index: told of each block in and out
        self._namespaces: dict[str, str] = {}  # namespace digest hex -> namespace key, for the listener

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._scan is None:
            self._scan = asyncio.get_running_loop().create_task(self._rebuild_index(), name="kvd-disk-scan")

    async def wait_indexed(self) -> None:
        await self.indexed.wait()

    async def close(self) -> None:
        if self._scan is not None and not self._scan.done():
            self._scan.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan
        self._executor.shutdown(wait=True)

    async def _rebuild_index(self) -> None:
        start = time.monotonic()
        try:
            found = await self._run(_scan, self.root)
        except OSError as exc:
            log.warning("disk tier %s: cannot scan %s: %s", self.name, self.root, exc)
            found = []
        # Anything written since start is newer than every file found: keep it at the most-recent end.
        fresh = self._index
        self._index = OrderedDict((k, size) for k, size in found if k not in fresh)
        self._stored += sum(self._index.values())
        self._index.update(fresh)
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
        await self._evict_to(self.capacity_bytes)

    # -- the backend API -----------------------------------------------------------------------------------------

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> list[bool]:
        return list(await asyncio.gather(*(self._put_one(key, payload) for key, payload in items)))

    async def _put_one(self, key: BlockKey, payload: Buffer) -> bool:
        ikey = _index_key(key)
        if ikey in self._index or ikey in self._writing:
            return True  # content-addressed: the same key is the same bytes
        size = HEADER_BYTES + len(key[1]) + len(payload)
        if size > self.capacity_bytes:
            self.counters.dropped_writes += 1
            return False
        self._writing.add(ikey)
        self._inflight += size
        try:
            await self._evict_to(self.capacity_bytes)
            written = await self._run(self._write_file, ikey, key, payload)
        except OSError as exc:
            self.counters.dropped_writes += 1
            self.counters.errors += 1
            log.warning("disk tier %s: write dropped: %s", self.name, exc)
            return False
        finally:
            self._inflight -= size
            self._writing.discard(ikey)
        self._index[ikey] = written
        self._stored += written
        self._namespaces[ikey[0]] = key[0]
        self._tell(ikey, stored=True)
        self.counters.puts += 1
        self.counters.bytes_written += written
        return True

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self._get_one(key) for key in keys)))

    async def _get_one(self, key: BlockKey) -> Buffer | None:
        ikey = _index_key(key)
        self.counters.gets += 1
        if ikey not in self._index and self.indexed.is_set():
            return None
        try:
            payload = await self._run(self._read_file, ikey, key)
        except FileNotFoundError:
            self._forget(ikey)
            return None
        except OSError as exc:
            self.counters.errors += 1
            log.warning("disk tier %s: read failed: %s", self.name, exc)
            return None
        if payload is None:
            self.counters.corrupt += 1
            log.warning("disk tier %s: %s failed verification; deleted", self.name, self._path(ikey))
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
                found = await self._run(_stat_sizes, [self._path(ikeys[i]) for i in missing])
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

    # -- internals -----------------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def path_of(self, key: BlockKey) -> Path:
        """Where `key`'s blob lives (whether or not it is stored)."""
        return self._path(_index_key(key))

    def _path(self, ikey: _IndexKey) -> Path:
        ns_hex, hash_hex = ikey
        return self.root / ns_hex / hash_hex[:2] / hash_hex

    def _forget(self, ikey: _IndexKey) -> None:
        size = self._index.pop(ikey, None)
        if size is not None:
            self._stored -= size
            self._tell(ikey, stored=False)

    def _tell(self, ikey: _IndexKey, *, stored: bool) -> None:
        """Report a block entering or leaving this tier (before its file is removed) to the published index."""
        namespace = self._namespaces.get(ikey[0])
        if self.listener is None or namespace is None:
            return
        key = (namespace, bytes.fromhex(ikey[1]))
        if stored:
            self.listener.stored(key, Source.DISK)
        else:
            self.listener.dropped(key, Source.DISK)

    async def _delete_one(self, ikey: _IndexKey) -> None:
        self._forget(ikey)
        try:
            await self._run(_unlink, self._path(ikey))
        except OSError as exc:
            self.counters.errors += 1
            log.warning("disk tier %s: cannot delete %s: %s", self.name, self._path(ikey), exc)

    async def _evict_to(self, limit: int) -> None:
        """Drop least-recently-used blocks until what is stored plus writes in flight fits `limit`."""
        victims: list[Path] = []
        while self._stored + self._inflight > limit and self._index:
            ikey, size = self._index.popitem(last=False)
            self._stored -= size
            self._tell(ikey, stored=False)
            self.counters.evictions += 1
            victims.append(self._path(ikey))
        if victims:
            try:
                await self._run(_unlink_all, victims)
            except OSError as exc:
                self.counters.errors += 1
                log.warning("disk tier %s: eviction: %s", self.name, exc)

    def _write_file(self, ikey: _IndexKey, key: BlockKey, payload: Buffer) -> int:
        """Runs in the I/O pool: write tmp, (fsync), rename over the final name. Returns the blob size."""
        path = self._path(ikey)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = blob_header(key, payload)
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, [memoryview(header), memoryview(payload).cast("B")])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return len(header) + len(payload)

    def _read_file(self, ikey: _IndexKey, key: BlockKey) -> memoryview | None:
        """Runs in the I/O pool: read and verify. None: the file is not a valid blob of `key`."""
        path = self._path(ikey)
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = bytearray(size)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU order for the index rebuilt after a restart (atime is often off)
        try:
            return decode_blob(key, view[:got])
        except ValueError:
            return None


def _index_key(key: BlockKey) -> _IndexKey:
    namespace, block_hash = key
    return namespace_digest(namespace).hex(), block_hash.hex()


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    while buffers:
        n = os.writev(fd, buffers)
        while buffers and n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers.pop(0)
        if buffers and n:
            buffers[0] = buffers[0][n:]


def _scan(root: Path) -> list[tuple[_IndexKey, int]]:
    """Every blob under `root` as ((namespace hex, hash hex), size), oldest first; removes interrupted writes."""
    found: list[tuple[float, _IndexKey, int]] = []
    if not root.is_dir():
        return []
    for ns_dir in os.scandir(root):
        if not ns_dir.is_dir(follow_symlinks=False):
            continue
        for fan_dir in os.scandir(ns_dir.path):
            if not fan_dir.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(fan_dir.path):
                if entry.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                found.append((st.st_mtime, (ns_dir.name, entry.name), st.st_size))
    found.sort(key=lambda item: item[0])
    return [(ikey, size) for _, ikey, size in found]


def _stat_sizes(paths: list[Path]) -> list[int | None]:
    out: list[int | None] = []
    for path in paths:
        try:
            out.append(path.stat().st_size)
        except OSError:
            out.append(None)
    return out


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
