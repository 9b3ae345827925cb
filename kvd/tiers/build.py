"""Composing the configured tiers into the block store the service uses (L1 always; disk and Redis when set).

Adding a backend: subclass `StorageBackend` in its own module, give it a config section, and add one line below.
"""

from __future__ import annotations

from kvd.config import KvdConfig
from kvd.memory.host_pool import HostPool
from kvd.tiers.store import BlockStore, HostStore


def build_store(config: KvdConfig, pool: HostPool) -> BlockStore:
    """The block store with every configured tier, fastest first: the L1 host store alone when no backend is set."""
    from kvd.tiers.base import StorageBackend
    from kvd.tiers.chain import TieredBlockStore
    from kvd.tiers.disk import DiskBackend
    from kvd.tiers.kvstore import RedisBackend

    backends: list[StorageBackend] = []
    if config.disk.path is not None:
        backends.append(DiskBackend(config.disk, fsync=config.disk.fsync))
    if config.redis.url:
        backends.append(RedisBackend(config.redis))
    l1 = HostStore(pool)
    if not backends:
        return l1
    return TieredBlockStore(l1, backends, config.tiers)
