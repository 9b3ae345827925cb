"""L3: a global kvstore shared by every node: Redis or Valkey, one node or a cluster (kvd.tiers.redis_topology).

Keys are `<key_prefix><namespace digest hex>:<hash hex>`, values are blobs (kvd.tiers.base), so two daemons sharing
one store share blocks and neither can take another model's block (or a damaged one) for its own.

Every batch is split by shard and sent as one pipeline per shard, all shards at once. Faults never reach the caller
as errors: every command has a socket timeout (`timeout_ms`), and a shard that fails is marked down. While a shard
is down its keys answer at once (misses, dropped writes) and a background task probes it with backoff
(`reconnect_backoff_ms`, doubling up to 16x) until it answers; the other shards keep serving. The tier is healthy
when every shard is. Capacity and eviction are the store's own (`maxmemory` + `maxmemory-policy allkeys-lru`): a
block evicted there is just a miss here.

Accounting: writes are `SET NX` (content-addressed: the same key is the same bytes), so the daemon knows which keys
it created. The tier's bytes and blocks are those keys that the store still holds: a miss on one (get, lookup)
forgets it at once, and a background sweep checks them all with EXISTS every `accounting_interval_s`. So the figure
never exceeds this daemon's writes nor what the store holds; with one daemon it is the store's content under the
prefix. What the whole store holds (every prefix and user) is exported next to it, per the store (DBSIZE, INFO).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from redis.exceptions import ConnectionError as RedisConnectionError

from kvd.config import RedisTierConfig
from kvd.logs import Throttled
from kvd.tiers.base import BlobError, Buffer, StorageBackend, decode_blob, encode_blob, namespace_digest, stop_task
from kvd.tiers.redis_topology import FAULTS, LOST_SHARD, STORE, ShardHealth, Topology, build_topology
from kvd.types import BlockKey, Tier

log = logging.getLogger(__name__)

SWEEP_BATCH_KEYS = 1024  # EXISTS per pipeline round of the accounting sweep


class _Down:
    """A key whose shard is down or failed: a miss, a dropped write."""


DOWN = _Down()
Command = Callable[[Any, bytes, int], object]  # (pipeline, store key, position in the batch): queue one command


class RedisBackend(StorageBackend):
    tier: ClassVar[Tier] = Tier.REMOTE

    def __init__(self, config: RedisTierConfig, *, name: str = "redis") -> None:
        super().__init__(name, config.capacity_bytes)
        self.topology: Topology = build_topology(config)
        self.url = config.url or ",".join(config.cluster_nodes)
        self.prefix = config.key_prefix.encode()
        self.timeout_s = config.timeout_ms / 1000
        self.accounting_interval_s = config.accounting_interval_s
        self.health = ShardHealth(name, self._probe, config.reconnect_backoff_ms / 1000, self.timeout_s)
        self._live: dict[bytes, int] = {}  # keys this daemon created that the store holds, as far as it knows
        self._live_bytes = 0
        self.store_keys = 0  # the whole store, every prefix: DBSIZE summed over the shards
        self.store_used_bytes = 0  # INFO used_memory summed over the shards
        self._totals: dict[str, tuple[int, int]] = {}  # per shard, as last read
        self._connected = False
        self._started = False
        self._sweeper: asyncio.Task[None] | None = None
        self._warn = Throttled(log)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.health.mark_down(STORE, ConnectionError("not connected yet"), first=True)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop(), name=f"kvd-{self.name}-sweep")

    async def close(self) -> None:
        await stop_task(self._sweeper)
        await self.health.close()
        with contextlib.suppress(*FAULTS):
            await self.topology.close()

    @property
    def healthy(self) -> bool:
        return self._connected and not self.health.down

    @property
    def disconnects(self) -> int:
        """Times a shard (or the store) went from up to down."""
        return self.health.transitions

    async def wait_healthy(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.healthy

    def _reachable(self) -> bool:
        """Whether any shard may answer now (else a write is not worth encoding)."""
        return self._connected and any(not self.health.is_down(s) for s in self.topology.shards())

    async def _probe(self, shard: str) -> None:
        if shard == STORE:
            await self.topology.connect()
            self._connected = True
        elif shard in self.topology.shards():  # a shard that left the cluster (failover) needs no probing
            await self.topology.ping(shard)

    # -- one pipeline per shard ----------------------------------------------------------------------------------

    async def _pipelined(self, keys: Sequence[bytes], command: Command) -> list[object]:
        """One command per key, batched into one pipeline per shard, every shard at once. A key whose shard is down
        (or fails now: it is marked down) answers DOWN; a command the store refused answers its exception."""
        out: list[object] = [DOWN] * len(keys)
        if not self._connected:
            return out
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            try:
                shard = self.topology.shard_of(key)
            except FAULTS:
                continue  # a slot no shard covers: a miss
            if not self.health.is_down(shard):
                groups.setdefault(shard, []).append(i)

        async def run(shard: str, positions: list[int]) -> None:
            # A broken connection is tried once more at once: after a shard restarts, every pooled connection to
            # it is dead and the retry reconnects. A timeout is not retried: a hung shard costs one timeout.
            for attempt in (1, 2):
                replies, failure = await self._execute(positions, lambda pipe, i: command(pipe, keys[i], i))
                if failure is None:
                    for i, reply in zip(positions, replies, strict=True):
                        out[i] = reply
                    return
                if attempt == 2 or not isinstance(failure, RedisConnectionError):
                    self.counters.errors += 1
                    self.health.mark_down(shard, failure)
                    return

        await asyncio.gather(*(run(shard, positions) for shard, positions in groups.items()))
        return out

    async def _execute(
        self, positions: list[int], queue: Callable[[Any, int], object]
    ) -> tuple[list[object], BaseException | None]:
        """One pipeline: the replies, or the failure that says the shard (not a command) failed."""
        try:
            async with self.topology.pipeline() as pipe:
                for i in positions:
                    queue(pipe, i)
                replies = await pipe.execute(raise_on_error=False)
        except FAULTS as exc:
            return [], exc
        # A connection that broke or timed out mid-pipeline shows up as some commands' replies.
        return replies, next((r for r in replies if isinstance(r, LOST_SHARD)), None)

    def _refused(self, what: str, replies: Sequence[object]) -> None:
        errors = [r for r in replies if isinstance(r, BaseException)]
        if errors:
            self.counters.errors += len(errors)
            self._warn.warning(f"refused-{what}", "%s tier: the store refused %d %s: %s", self.name, len(errors),
                               what, errors[0])  # fmt: skip

    # -- the backend API -----------------------------------------------------------------------------------------

    def _key(self, key: BlockKey) -> bytes:
        namespace, block_hash = key
        return b"%s%s:%s" % (self.prefix, namespace_digest(namespace).hex().encode(), block_hash.hex().encode())

    async def put(self, items: Sequence[tuple[BlockKey, Buffer]]) -> list[bool]:
        if not items:
            return []
        if not self._reachable():
            self.counters.dropped_writes += len(items)
            return [False] * len(items)
        loop = asyncio.get_running_loop()
        # Header + checksum + one contiguous value per block: CPU work, off the event loop.
        blobs = await loop.run_in_executor(None, _encode_all, list(items))
        keys = [self._key(key) for key, _ in items]
        replies = await self._pipelined(keys, lambda pipe, k, i: pipe.set(k, blobs[i], nx=True))
        self._refused("writes", replies)
        out: list[bool] = []
        for store_key, blob, reply in zip(keys, blobs, replies, strict=True):
            stored = reply is not DOWN and not isinstance(reply, BaseException)
            out.append(stored)
            if not stored:
                self.counters.dropped_writes += 1
                continue
            self.counters.puts += 1
            self.counters.bytes_written += len(blob)
            if reply:  # created now (not there before): this daemon's
                self._track(store_key, len(blob))
        return out

    async def get(self, keys: Sequence[BlockKey]) -> list[Buffer | None]:
        if not keys:
            return []
        self.counters.gets += len(keys)
        store_keys = [self._key(k) for k in keys]
        replies = await self._pipelined(store_keys, lambda pipe, k, i: pipe.get(k))
        self._refused("reads", replies)
        blobs = [r if isinstance(r, bytes) else None for r in replies]
        for store_key, reply in zip(store_keys, replies, strict=True):
            if reply is None:
                self._forget(store_key)
        loop = asyncio.get_running_loop()
        out: list[Buffer | None] = list(await loop.run_in_executor(None, _verify_all, list(keys), blobs))
        bad = [key for key, blob, payload in zip(keys, blobs, out, strict=True) if blob is not None and payload is None]
        if bad:
            self.counters.corrupt += len(bad)
            self._warn.warning("corrupt", "%s tier: %d blobs failed verification; deleted", self.name, len(bad))
            await self.delete(bad)
        for payload in out:
            if payload is not None:
                self.counters.get_hits += 1
                self.counters.bytes_read += len(payload)
        return out

    async def sizes(self, keys: Sequence[BlockKey]) -> list[int | None]:
        if not keys:
            return []
        store_keys = [self._key(k) for k in keys]
        replies = await self._pipelined(store_keys, lambda pipe, k, i: pipe.strlen(k))
        out: list[int | None] = []
        for store_key, reply in zip(store_keys, replies, strict=True):
            size = reply if isinstance(reply, int) and reply > 0 else None
            if reply == 0:
                self._forget(store_key)
            out.append(size)
        return out

    async def delete(self, keys: Sequence[BlockKey]) -> None:
        if not keys:
            return
        store_keys = [self._key(k) for k in keys]
        replies = await self._pipelined(store_keys, lambda pipe, k, i: pipe.delete(k))
        for store_key, reply in zip(store_keys, replies, strict=True):
            if isinstance(reply, int):  # gone now, whoever wrote it
                self._forget(store_key)

    def used(self) -> tuple[int, int]:
        """Bytes and blocks this daemon wrote that the store still holds (see the module docstring)."""
        return self._live_bytes, len(self._live)

    def extra_counters(self) -> dict[str, int]:
        return {
            "store_keys": self.store_keys,
            "store_used_bytes": self.store_used_bytes,
            "shards": len(self.topology.shards()),
            "shards_down": len(self.health.down),
        }

    # -- accounting ----------------------------------------------------------------------------------------------

    def _track(self, store_key: bytes, size: int) -> None:
        old = self._live.get(store_key)
        self._live[store_key] = size
        self._live_bytes += size - (old or 0)

    def _forget(self, store_key: bytes) -> None:
        size = self._live.pop(store_key, None)
        if size is not None:
            self._live_bytes -= size

    async def _sweep_loop(self) -> None:
        while True:
            # Every interval, and as soon as a shard comes back: a restarted shard may have lost every key.
            # (asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that lands as the
            # event is set, and close() would then wait a whole interval.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.accounting_interval_s):
                    await self.health.recovered.wait()
            self.health.recovered.clear()
            try:
                await self.sweep()
            except Exception:
                self._warn.exception("sweep", "%s tier: accounting sweep failed", self.name)

    async def sweep(self) -> None:
        """Forget the keys this daemon created that the store no longer holds, and read the store's totals."""
        tracked = list(self._live)
        for start in range(0, len(tracked), SWEEP_BATCH_KEYS):
            batch = tracked[start : start + SWEEP_BATCH_KEYS]
            replies = await self._pipelined(batch, lambda pipe, k, i: pipe.exists(k))
            for store_key, reply in zip(batch, replies, strict=True):
                if reply == 0:
                    self._forget(store_key)
        shards = self.topology.shards()
        for shard in shards:
            if not self.health.is_down(shard):  # a shard that does not answer keeps its last figures
                with contextlib.suppress(*FAULTS):
                    async with asyncio.timeout(self.timeout_s * 4):
                        self._totals[shard] = await self.topology.totals(shard)
        self._totals = {shard: self._totals[shard] for shard in shards if shard in self._totals}
        self.store_keys = sum(keys for keys, _ in self._totals.values())
        self.store_used_bytes = sum(used for _, used in self._totals.values())


def _verify_all(keys: list[BlockKey], blobs: list[bytes | None]) -> list[Buffer | None]:
    out: list[Buffer | None] = []
    for key, blob in zip(keys, blobs, strict=True):
        try:
            out.append(None if blob is None else decode_blob(key, blob))
        except BlobError:
            out.append(None)
    return out


def _encode_all(items: list[tuple[BlockKey, Buffer]]) -> list[bytes]:
    return [encode_blob(key, payload) for key, payload in items]
