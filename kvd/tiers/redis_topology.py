"""Where a kvstore key lives and whether that node answers: one Redis/Valkey node, or a Redis Cluster.

The backend (kvd.tiers.kvstore) sees a store as shards: it groups each batch by shard, sends one pipeline per shard,
all shards at once, and keeps each shard's health apart, so a shard that is down costs only its own keys. A single
node is the one-shard case. A cluster is reached through redis-py's `redis.asyncio.cluster.RedisCluster`, which
learns the slot map from the seed nodes, routes each key by its hash slot, follows MOVED/ASK redirections and
refreshes the map after errors; its own retries are off (a timeout must cost one timeout, not several), the backend
decides what a failure means.

`ShardHealth` is the part both share: which shards are down, and a task per down shard that probes it with backoff
until it answers. One log line per change of state.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvd.config import RedisTierConfig
from kvd.tiers.base import stop_task

log = logging.getLogger(__name__)

_MAX_BACKOFF_FACTOR = 16
STORE = "*"  # the shard name that stands for the whole store while its topology is unknown
FAULTS = (RedisError, OSError, TimeoutError)
# A reply that says the shard (not the command) failed: the connection broke or a read timed out.
LOST_SHARD = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


class Topology(abc.ABC):
    """A store as a set of shards, each reached through pipelines of the underlying redis-py client."""

    def __init__(self, config: RedisTierConfig) -> None:
        self.timeout_s = config.timeout_ms / 1000
        self.client_kwargs: dict[str, Any] = {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            "health_check_interval": 0,
        }

    @abc.abstractmethod
    async def connect(self) -> None:
        """Reach the store and learn its shards; raises one of FAULTS when it cannot."""

    @abc.abstractmethod
    def shard_of(self, key: bytes) -> str:
        """The shard (node name) that holds `key`; raises RedisError when no shard covers it."""

    @abc.abstractmethod
    def pipeline(self) -> Any:
        """A non-transactional pipeline (an async context manager) whose commands go to their keys' shards."""

    @abc.abstractmethod
    def shards(self) -> list[str]:
        """The shards (primaries) the store has now."""

    @abc.abstractmethod
    async def command(self, shard: str, *args: Any) -> Any:
        """Run one keyless command (PING, DBSIZE, INFO) on `shard`."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def ping(self, shard: str) -> None:
        await self.command(shard, "PING")

    async def totals(self, shard: str) -> tuple[int, int]:
        """(keys, used memory in bytes) of the whole of `shard`, every user's keys included."""
        keys = await self.command(shard, "DBSIZE")
        info = await self.command(shard, "INFO", "memory")
        return int(keys), int(info.get("used_memory", 0)) if isinstance(info, dict) else 0


class SingleNode(Topology):
    """One node (`redis.url`): the one shard, named after its address."""

    def __init__(self, config: RedisTierConfig) -> None:
        super().__init__(config)
        if not config.url:
            raise ValueError("the remote tier needs redis.url")
        self.client = aioredis.Redis.from_url(
            config.url,
            # One immediate retry on a broken connection only: after a store restart every pooled connection is
            # dead, and the retry reconnects. A timeout is not retried, so a slow store costs one timeout at most.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            **self.client_kwargs,
        )
        parts = urlsplit(config.url)
        self.name = f"{parts.hostname}:{parts.port or 6379}"

    async def connect(self) -> None:
        await self.client.ping()

    def shard_of(self, key: bytes) -> str:
        return self.name

    def pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    def shards(self) -> list[str]:
        return [self.name]

    async def command(self, shard: str, *args: Any) -> Any:
        return await self.client.execute_command(*args)

    async def close(self) -> None:
        await self.client.aclose()


class Cluster(Topology):
    """A Redis Cluster / Valkey cluster, discovered from `redis.url` and `redis.cluster_nodes`."""

    def __init__(self, config: RedisTierConfig) -> None:
        super().__init__(config)
        seeds = [_host_port(config.url)] if config.url else []
        seeds += [_host_port(node) for node in config.cluster_nodes]
        if not seeds:
            raise ValueError("the remote tier in cluster mode needs redis.url or redis.cluster_nodes")
        self.client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            retry=Retry(NoBackoff(), 0),  # no retries: the backend marks the shard down and answers at once
            require_full_coverage=False,  # a slot map with a shard missing still serves the other shards
            **self.client_kwargs,
        )
        self._connected = False

    async def connect(self) -> None:
        await self.client.initialize()
        if not self.client.get_primaries():
            raise RedisConnectionError("the cluster reported no primaries")
        self._connected = True

    def shard_of(self, key: bytes) -> str:
        node = self.client.get_node_from_key(key)  # type: ignore[arg-type]
        if node is None:
            raise RedisConnectionError("no node covers the key's slot")
        return node.name

    def pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    def shards(self) -> list[str]:
        return [node.name for node in self.client.get_primaries()] if self._connected else []

    async def command(self, shard: str, *args: Any) -> Any:
        node = self.client.get_node(node_name=shard)
        if node is None:
            raise RedisConnectionError(f"{shard} is no longer part of the cluster")
        return await self.client.execute_command(*args, target_nodes=node)

    async def close(self) -> None:
        await self.client.aclose()


def build_topology(config: RedisTierConfig) -> Topology:
    return Cluster(config) if config.cluster else SingleNode(config)


def _host_port(address: str) -> tuple[str, int]:
    """ "host:port", "redis://host:port[/db]" or "[v6]:port" -> (host, port)."""
    parts = urlsplit(address if "://" in address else f"redis://{address}")
    if not parts.hostname:
        raise ValueError(f"not a node address: {address!r}")
    return parts.hostname, parts.port or 6379


class ShardHealth:
    """Which shards are down, and one task per down shard probing it with backoff until it answers.

    While a shard is down its keys answer at once (misses, dropped writes) instead of each waiting out a timeout.
    Probes start after `backoff_s` and double up to 16x."""

    def __init__(self, tier: str, probe: Callable[[str], Awaitable[object]], backoff_s: float, timeout_s: float):
        self.tier = tier
        self.probe = probe
        self.recovered = asyncio.Event()  # set each time a shard comes back (it may have come back empty)
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._down: dict[str, asyncio.Task[None]] = {}
        self._since: dict[str, float] = {}
        self.transitions = 0  # times a shard went down

    def is_down(self, shard: str) -> bool:
        return shard in self._down

    @property
    def down(self) -> list[str]:
        return list(self._down)

    def mark_down(self, shard: str, exc: BaseException, *, first: bool = False) -> None:
        """Take `shard` out of service until a probe reaches it. `first`: probe at once (start-up)."""
        if shard in self._down:
            return
        if not first:
            self.transitions += 1
            what = "the store" if shard == STORE else f"shard {shard}"
            log.warning("%s tier degraded: %s unreachable (%s); serving from the other tiers", self.tier, what, exc)
        self._since[shard] = time.monotonic()
        self._down[shard] = asyncio.get_running_loop().create_task(
            self._probe_loop(shard, first), name=f"kvd-{self.tier}-probe-{shard}"
        )

    async def _probe_loop(self, shard: str, first: bool) -> None:
        delay = self.backoff_s
        if not first:
            await asyncio.sleep(delay)
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):  # not wait_for: it can swallow a cancel on 3.11
                    await self.probe(shard)
            except FAULTS as exc:
                log.debug("%s tier: %s still unreachable: %s", self.tier, shard, exc)
                delay = min(delay * 2, self.backoff_s * _MAX_BACKOFF_FACTOR)
                await asyncio.sleep(delay)
                continue
            break
        self._down.pop(shard, None)
        self.recovered.set()
        down_for = time.monotonic() - self._since.pop(shard, time.monotonic())
        what = "the store" if shard == STORE else f"shard {shard}"
        log.info("%s tier: %s reachable (after %.1f s)", self.tier, what, down_for)

    async def close(self) -> None:
        for task in list(self._down.values()):
            await stop_task(task)
        self._down.clear()
