"""Two real daemons ("nodes") sharing a real 3-shard Redis Cluster: node B loads what node A saved, byte-identical;
a shard killed mid-run costs only its own blocks (recompute, never a wrong byte), the tier reports degraded, and
comes back by itself when the shard does."""

from __future__ import annotations

from tests.conftest import DaemonFactory, WorkerFactory
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.kvd.tiers.conftest import MiB, RedisClusterServers
from tests.kvd.tiers.test_daemon import MODEL, tier_env, tier_stats

SPEC = CacheSpec()  # 8 KiB blocks
REMOTE = 3  # kvd_pb2.TIER_REMOTE


def stored_hashes(cluster: RedisClusterServers) -> dict[str, int]:
    """Block hash (hex) -> the shard that holds it, as the shards say."""
    out: dict[str, int] = {}
    for i, node in enumerate(cluster.nodes):
        client = node.client()
        try:
            for name in client.scan_iter(match="kvd:*"):
                out[name.decode().rsplit(":", 1)[1]] = i
        finally:
            client.close()
    return out


def at_least(found: dict[str, int], n: int) -> dict[str, int] | None:
    return found if len(found) >= n else None


def remote_healthy(daemon: Daemon) -> bool:
    return bool(tier_stats(daemon)[REMOTE].healthy)


def test_two_nodes_share_a_cluster_and_survive_a_lost_shard(
    redis_cluster: RedisClusterServers, daemon_factory: DaemonFactory, worker_factory: WorkerFactory
) -> None:
    env = tier_env(None, redis_cluster.url, KVD_REDIS__CLUSTER="true", KVD_TIERS__WRITE_POLICY="write_through")
    node_a = daemon_factory(capacity_bytes=4 * MiB, env=env)
    node_b = daemon_factory(capacity_bytes=4 * MiB, env=env)
    a = worker_factory(node_a.socket, SPEC, MODEL, name="node-a")
    b = worker_factory(node_b.socket, SPEC, MODEL, name="node-b")
    a.wait_ready()
    b.wait_ready()
    hashes = [block_hash(i, "cluster") for i in range(48)]
    saved = list(enumerate(hashes))
    a.fill(saved)
    assert a.save(saved)["ok"]
    where = wait_for(lambda: at_least(stored_hashes(redis_cluster), 48), 10, what="the write-through")
    assert sorted(set(where.values())) == [0, 1, 2]  # the blocks are spread over every shard

    # Node B loads what node A saved, through the cluster, byte-identical.
    first = [(i, h) for i, h in enumerate(hashes[:24])]
    result = b.load(first)
    assert result["ok"], result
    assert b.verify(first) == []

    # A shard dies: its blocks are misses (the load reports exactly those failed), the others load intact.
    redis_cluster.kill_shard(1)
    second = [(24 + i, h) for i, h in enumerate(hashes[24:])]
    result = b.load(second)
    lost = {h.hex() for _, h in second if where[h.hex()] == 1}
    assert lost and set(result["failed"]) == lost, result
    intact = [(i, h) for i, h in second if h.hex() not in lost]
    assert b.verify(intact) == []  # no wrong byte in what did load
    wait_for(lambda: not remote_healthy(node_b), 10, what="node B's remote tier degraded")

    # The shard comes back (empty): the tier recovers by itself and new saves reach every shard again.
    redis_cluster.restart_shard(1)
    wait_for(lambda: remote_healthy(node_a) and remote_healthy(node_b), 15, what="the remote tier back")
    fresh = [(i, block_hash(100 + i, "cluster")) for i in range(16)]
    a.fill(fresh)
    assert a.save(fresh)["ok"]
    kept = sum(shard != 1 for shard in where.values())  # the restarted shard came back empty
    wait_for(lambda: at_least(stored_hashes(redis_cluster), kept + len(fresh)), 10, what="the fresh write-through")
    loaded = [(48 + i, h) for i, (_, h) in enumerate(fresh)]
    result = b.load(loaded)
    assert result["ok"], result
    assert b.verify(loaded) == []
    degraded_lines = [line for line in node_b.log_text().splitlines() if "tier degraded" in line]
    assert len(degraded_lines) == 1, degraded_lines
