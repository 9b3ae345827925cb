"""Fixtures for the tier tests: a real redis-server on loopback and a real 3-shard Redis Cluster (each skipped only
when redis-server / redis-cli is not installed), a real host pool, and real backends in temporary directories."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kvd.config import DiskTierConfig, HostPoolConfig, RedisTierConfig
from kvd.memory.host_pool import HostPool
from tests.helpers.redis_servers import REDIS_CLI, REDIS_SERVER, RedisClusterServers, RedisServer
from tests.helpers.small_fs import fill_up, mount_tmpfs, unmount

__all__ = ["RedisClusterServers", "RedisServer", "fill_up"]

KiB = 1 << 10
MiB = 1 << 20
SMALL_FS_BYTES = 8 * MiB


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def _cluster_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli is not installed")
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"), shards=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(_cluster_servers: RedisClusterServers) -> RedisClusterServers:
    """A real Redis Cluster: 3 cluster-enabled redis-servers joined by redis-cli (started once per session, ~2 s),
    handed to each test with every shard running and empty."""
    _cluster_servers.revive()
    return _cluster_servers


@pytest.fixture
async def pool() -> AsyncIterator[HostPool]:
    """4 MiB of 64 KiB slabs: small enough that a test fills it. Plain LRU (a slot is reused the moment its block
    is evicted): these tests count evictions and write-downs exactly; the grace period has its own tests."""
    config = HostPoolConfig(capacity_bytes=4 * MiB, slab_bytes=64 * KiB, pin=False, populate_threads=1)
    host = HostPool(config.model_copy(update={"reuse_grace_ms": 0}))
    yield host
    with contextlib.suppress(BufferError):
        host.close()


def disk_config(path: Path, capacity_bytes: int = 64 * MiB) -> DiskTierConfig:
    return DiskTierConfig(path=path, capacity_bytes=capacity_bytes, io_threads=2)


def redis_config(server: RedisServer | RedisClusterServers, **kwargs: object) -> RedisTierConfig:
    fields: dict[str, object] = {
        "url": server.url,
        "cluster": isinstance(server, RedisClusterServers),
        "timeout_ms": 300,
        "reconnect_backoff_ms": 50,
        **kwargs,
    }
    return RedisTierConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB filesystem (tmpfs) mounted on a fresh directory; unmounted after the test. Skipped, saying why,
    where mounting is not permitted (not root, no CAP_SYS_ADMIN, a container without it)."""
    mountpoint = tmp_path / "small-fs"
    why_not = mount_tmpfs(mountpoint, SMALL_FS_BYTES)
    if why_not is not None:
        pytest.skip(f"no small filesystem for the ENOSPC tests: {why_not}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
