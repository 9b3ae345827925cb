"""End to end through real daemons (`python -m kvd serve`) and real worker processes: two nodes sharing one Redis,
the kvstore killed and restarted under a serving daemon, and a daemon restart that keeps its disk tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kvd_client import KvdClient
from kvd_client.types import Tier
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.conftest import DaemonFactory, WorkerFactory
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.rpc import fingerprint
from tests.kvd.tiers.conftest import MiB, RedisServer

SPEC = CacheSpec()  # 8 KiB blocks
MODEL = "model-tiers"


def tier_env(disk: Path | None, redis_url: str | None, **extra: str) -> dict[str, str]:
    env = {
        "KVD_TIERS__RECOMPUTE_US_PER_TOKEN": "1000",  # a big model: any tier here beats recomputing
        "KVD_REDIS__TIMEOUT_MS": "300",
        "KVD_REDIS__RECONNECT_BACKOFF_MS": "50",
        **extra,
    }
    if disk is not None:
        env["KVD_DISK__PATH"] = str(disk)
    if redis_url is not None:
        env["KVD_REDIS__URL"] = redis_url
    return env


@pytest.fixture
def lookups() -> Iterator[list[KvdClient]]:
    made: list[KvdClient] = []
    yield made
    for client in made:
        client.close()


def lookup_client(daemon: Daemon, made: list[KvdClient]) -> KvdClient:
    """A lookup-only session (vLLM's scheduler side): it sees which tier each hit is in."""
    client = KvdClient(daemon.socket, model_id=MODEL, layout_fingerprint=fingerprint(SPEC), worker_name="sched")
    made.append(client)
    client.start()
    assert client.wait_ready(20)
    return client


def tiers_of(client: KvdClient, hashes: list[bytes]) -> tuple[Tier, ...]:
    return client.lookup(hashes).result(timeout=10).tiers


def tier_stats(daemon: Daemon) -> dict[int, kvd_pb2.TierStats]:
    return {t.tier: t for t in daemon.stats().tiers}


def test_l3_hit_on_a_second_node(
    tmp_path: Path,
    redis_server: RedisServer,
    daemon_factory: DaemonFactory,
    worker_factory: WorkerFactory,
    lookups: list[KvdClient],
) -> None:
    env = {"KVD_TIERS__WRITE_POLICY": "write_through"}
    node1 = daemon_factory(capacity_bytes=4 * MiB, env=tier_env(tmp_path / "disk1", redis_server.url, **env))
    node2 = daemon_factory(capacity_bytes=4 * MiB, env=tier_env(tmp_path / "disk2", redis_server.url, **env))
    a = worker_factory(node1.socket, SPEC, MODEL, name="node1-worker")
    b = worker_factory(node2.socket, SPEC, MODEL, name="node2-worker")
    a.wait_ready()
    b.wait_ready()
    hashes = [block_hash(i, "l3") for i in range(12)]
    saved = [(i, h) for i, h in enumerate(hashes)]
    a.fill(saved)
    assert a.save(saved)["ok"]

    # Written through to Redis in the background. Node 2 is asked only once node 1 has stored all of them there: a
    # lookup that found only the first few would start promoting those into node 2's L1 (promote_on_hit), and the
    # full hit after it would rightly show them in host memory. The first lookup is the one to look at.
    wait_for(
        lambda: tier_stats(node1)[kvd_pb2.TIER_REMOTE].blocks >= len(hashes), 10, what="the write-through to Redis"
    )
    scheduler = lookup_client(node2, lookups)
    assert tiers_of(scheduler, hashes) == (Tier.REMOTE,) * len(hashes)

    loaded = [(40 + i, h) for i, h in enumerate(hashes)]
    result = b.load(loaded)
    assert result["ok"], result
    assert b.verify(loaded) == []  # identical bytes, through another daemon
    assert tiers_of(scheduler, hashes) == (Tier.HOST_MEMORY,) * len(hashes)  # promoted into node 2's L1
    stats = tier_stats(node2)
    assert stats[kvd_pb2.TIER_REMOTE].healthy and stats[kvd_pb2.TIER_REMOTE].hits >= len(hashes)


def test_redis_restart_and_daemon_restart(
    tmp_path: Path,
    redis_server: RedisServer,
    daemon_factory: DaemonFactory,
    worker_factory: WorkerFactory,
    lookups: list[KvdClient],
) -> None:
    env = tier_env(tmp_path / "disk", redis_server.url, KVD_TIERS__WRITE_POLICY="write_through")
    daemon = daemon_factory(capacity_bytes=4 * MiB, env=env)
    w = worker_factory(daemon.socket, SPEC, MODEL, name="worker")
    w.wait_ready()
    first = [(i, block_hash(i, "restart")) for i in range(8)]
    w.fill(first)
    assert w.save(first)["ok"]

    # The kvstore dies mid-run: the daemon keeps serving saves and loads, and reports the tier degraded.
    redis_server.kill()
    second = [(8 + i, block_hash(8 + i, "restart")) for i in range(8)]
    w.fill(second)
    assert w.save(second)["ok"]
    wait_for(lambda: not tier_stats(daemon)[kvd_pb2.TIER_REMOTE].healthy, 10, what="the remote tier degraded")
    result = w.load([(32 + i, h) for i, (_, h) in enumerate(first + second)])
    assert result["ok"], result
    assert w.verify([(32 + i, h) for i, (_, h) in enumerate(first + second)]) == []

    redis_server.start()  # comes back empty; the daemon reconnects by itself
    wait_for(lambda: tier_stats(daemon)[kvd_pb2.TIER_REMOTE].healthy, 10, what="the remote tier back")

    # The daemon restarts (SIGTERM: queued write-downs are flushed); its disk tier survives, L1 does not.
    daemon.restart()
    wait_for(lambda: w.request("info").get("registrations", 0) >= 2, 20, what="the worker to re-register")
    scheduler = lookup_client(daemon, lookups)
    hashes = [h for _, h in first + second]
    assert tiers_of(scheduler, hashes) == (Tier.DISK,) * len(hashes)
    loaded = [(48 + i, h) for i, h in enumerate(hashes)]
    result = w.load(loaded)
    assert result["ok"], result
    assert w.verify(loaded) == []
    assert tier_stats(daemon)[kvd_pb2.TIER_DISK].blocks == len(hashes)
