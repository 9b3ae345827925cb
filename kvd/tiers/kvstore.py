"""L3: a global kvstore shared by every node, Redis or Valkey, through redis-py's asyncio client.

Keys are `<key_prefix><namespace digest hex>:<hash hex>`, values are blobs (kvd.tiers.base), so two daemons sharing
one store share blocks and neither can take another model's block (or a damaged one) for its own.

Faults never reach the caller as errors: every command has a socket timeout (`timeout_ms`), and the first error
marks the tier unhealthy. While unhealthy, operations answer at once (misses, dropped writes) instead of each one
waiting out a timeout, and a background task pings the store with backoff (`reconnect_backoff_ms`, doubling up to
16x) until it answers; redis-py re-opens the pool's connections by itself. Capacity and eviction are the store's
own (`maxmemory` + `maxmemory-policy allkeys-lru`): a block evicted there is just a miss here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from kvd.config import RedisTierConfig
from kvd.tiers.base import BlobError, Buffer, StorageBackend, decode_blob, encode_blob, namespace_digest
from kvd.types import BlockKey, Tier

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_BACKOFF_FACTOR = 16


class _Down(Exception):
    """The store is marked down: answer without trying."""


class RedisBackend(StorageBackend):
    tier: ClassVar[Tier] = Tier.REMOTE

    def __init__(self, config: RedisTierConfig, *, name: str = "redis") -> None:
        if not config.url:
            raise ValueError("the remote tier needs redis.url")
        super().__init__(name, config.capacity_bytes)
        self.url = config.url
        self.prefix = config.key_prefix.encode()
        self.timeout_s = config.timeout_ms / 1000
        self.backoff_s = config.reconnect_backoff_ms / 1000
        self._client: aioredis.Redis | None = None
        self._healthy = False
        self._reconnect: asyncio.Task[None] | None = None
        self._blocks = 0  # blocks this daemon stored (an estimate: other nodes write too, the store evicts)
        self._bytes = 0
        self.disconnects = 0

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            # One immediate retry on a broken connection only: after a store restart every pooled connection is
            # dead, and the retry reconnects. A timeout is not retried, so a slow store costs one timeout at most.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        self._start_reconnect(first=True)

    async def close(self) -> None:
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        if self._client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
            self._client = None

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self._healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self._healthy

    def _start_reconnect(self, first: bool = False) -> None:
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(
                self._reconnect_loop(first), name=f"kvd-{self.name}-reconnect"
            )

    async def _reconnect_loop(self, first: bool) -> None:
        delay = self.backoff_s
        if not first:
            await asyncio.sleep(delay)
        while True:
            client = self._client
            if client is None:
                return
            try:
                await asyncio.wait_for(client.ping(), self.timeout_s)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("%s: still unreachable: %s", self.name, exc)
                delay = min(delay * 2, self.backoff_s * _MAX_BACKOFF_FACTOR)
                await asyncio.sleep(delay)
                continue
            if not self._healthy:
                log.info("%s tier: %s reachable", self.name, self.url)
            self._healthy = True
            return

    def _mark_down(self, exc: BaseException) -> None:
        self.counters.errors += 1
        if self._healthy:
            self.disconnects += 1
            log.warning("%s tier degraded (%s): %s; serving from the other tiers", self.name, self.url, exc)
        self._healthy = False
        self._start_reconnect()

    async def _call(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        client = self._client
        if client is None or not self._healthy:
            raise _Down
        try:
            return await op(client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._mark_down(exc)
            raise _Down from exc

    # -- the backend API -----------------------------------------------------------------------------------------

    def _key(self, key: BlockKey) -> bytes:
        namespace, block_hash = key
        return b"%s%s:%s" % (self.prefix, namespace_digest(namespace).hex().encode(), block_hash.hex().encode())

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> list[bool]:
        if not items:
            return []
        if not self._healthy:
            self.counters.dropped_writes += len(items)
            return [False] * len(items)
        loop = asyncio.get_running_loop()
        # Header + checksum + one contiguous value per block: CPU work, off the event loop.
        blobs = await loop.run_in_executor(None, _encode_all, list(items))

        async def op(client: aioredis.Redis) -> list[object]:
            async with client.pipeline(transaction=False) as pipe:
                for (key, _), blob in zip(items, blobs, strict=True):
                    pipe.set(self._key(key), blob)
                return await pipe.execute()

        try:
            replies = await self._call(op)
        except _Down:
            self.counters.dropped_writes += len(items)
            return [False] * len(items)
        out = [bool(r) for r in replies]
        for ok, blob in zip(out, blobs, strict=True):
            if ok:
                self.counters.puts += 1
                self.counters.bytes_written += len(blob)
                self._blocks += 1
                self._bytes += len(blob)
            else:
                self.counters.dropped_writes += 1
        return out

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        if not keys:
            return []
        self.counters.gets += len(keys)
        try:
            blobs = await self._call(lambda client: client.mget([self._key(k) for k in keys]))
        except _Down:
            return [None] * len(keys)
        loop = asyncio.get_running_loop()
        out: list[Buffer | None] = list(
            await loop.run_in_executor(None, self._verify_all, list(keys), [_as_bytes(b) for b in blobs])
        )
        bad = [key for key, blob, payload in zip(keys, blobs, out, strict=True) if blob is not None and payload is None]
        if bad:
            self.counters.corrupt += len(bad)
            log.warning("%s tier: %d blobs failed verification; deleted", self.name, len(bad))
            await self.delete(bad)
        for payload in out:
            if payload is not None:
                self.counters.get_hits += 1
                self.counters.bytes_read += len(payload)
        return out

    @staticmethod
    def _verify_all(keys: list[BlockKey], blobs: list[bytes | None]) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        for key, blob in zip(keys, blobs, strict=True):
            try:
                out.append(None if blob is None else decode_blob(key, blob))
            except BlobError:
                out.append(None)
        return out

    async def sizes(self, keys: Sequence[BlockKey]) -> list[int | None]:
        if not keys:
            return []

        async def op(client: aioredis.Redis) -> list[object]:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.strlen(self._key(key))
                return await pipe.execute()

        try:
            lengths = await self._call(op)
        except _Down:
            return [None] * len(keys)
        return [int(n) if n else None for n in lengths]  # type: ignore[call-overload]

    async def delete(self, keys: Sequence[BlockKey]) -> None:
        if not keys:
            return
        with contextlib.suppress(_Down):
            await self._call(lambda client: client.delete(*(self._key(k) for k in keys)))

    def used(self) -> tuple[int, int]:
        return self._bytes, self._blocks


def _as_bytes(value: object) -> bytes | None:
    return value if isinstance(value, bytes) else None


def _encode_all(items: list[tuple[BlockKey, Buffer]]) -> list[bytes]:
    return [encode_blob(key, payload) for key, payload in items]
