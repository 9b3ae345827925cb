"""The published index through a real daemon: lookups answered in-process agree with what is stored, a save's notice
means every process on the node sees the blocks, evictions and restarts, the disk tier, and who may map it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvd_client import KvdClient
from kvd_client.credentials import TOKEN_BYTES, credential_socket_path, fetch_grant
from kvd_client.fdpass import GRANT_SHARED, GrantRefused
from kvd_client.types import Tier

from tests.conftest import DaemonFactory, WorkerFactory
from tests.helpers.daemon import Daemon, MiB, wait_for
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.rpc import fingerprint

SPEC = CacheSpec(num_layers=2, num_blocks=128, block_size=16, kv_heads=8, head_dim=64)  # 64 KiB blocks


@pytest.fixture
def schedulers() -> Iterator[list[KvdClient]]:
    made: list[KvdClient] = []
    yield made
    for client in made:
        client.close()


def scheduler(daemon: Daemon, model: str, made: list[KvdClient]) -> KvdClient:
    """A lookup-only client in this process (vLLM's scheduler side), another process than the workers."""
    client = KvdClient(daemon.socket, model_id=model, layout_fingerprint=fingerprint(SPEC), worker_name="sched")
    made.append(client)
    client.start()
    assert client.wait_ready(20)
    return client


def local(client: KvdClient, hashes: list[bytes]) -> int:
    """A lookup that must be answered from the mapped index."""
    before = client.index.answered
    hits = client.lookup(hashes).result(timeout=0)  # resolved already: no round trip
    assert client.index.answered == before + 1, "the lookup went over RPC"
    return hits.hit_blocks


def test_a_save_notice_means_every_process_sees_the_blocks(
    daemon_factory: DaemonFactory, worker_factory: WorkerFactory, schedulers: list[KvdClient]
) -> None:
    daemon = daemon_factory(capacity_bytes=16 * MiB, slab_bytes=1 * MiB)
    worker = worker_factory(daemon.socket, SPEC, "ryw")
    assert worker.wait_ready()["index_mapped"]
    sched = scheduler(daemon, "ryw", schedulers)
    wait_for(lambda: sched.index.mapped, 10, what="the index")
    for round_ in range(20):
        blocks = [(i, block_hash(i, f"ryw{round_}")) for i in range(6)]
        worker.fill(blocks)
        assert worker.save(blocks)["ok"]  # returns once the notice arrived
        hashes = [h for _, h in blocks]
        assert local(sched, hashes) == 6, f"round {round_}: a notified save was not in the index"
        assert worker.lookup(hashes)["hit_blocks"] == 6
        assert sched.lookup(hashes).result(0).tiers == (Tier.HOST_MEMORY,) * 6
    assert worker.request("info")["index_answered"] >= 20


def test_the_index_agrees_with_the_store_through_evictions(
    daemon_factory: DaemonFactory, worker_factory: WorkerFactory, schedulers: list[KvdClient]
) -> None:
    daemon = daemon_factory(capacity_bytes=4 * MiB, slab_bytes=1 * MiB)  # 64 blocks
    worker = worker_factory(daemon.socket, SPEC, "evict")
    worker.wait_ready()
    sched = scheduler(daemon, "evict", schedulers)
    wait_for(lambda: sched.index.mapped, 10, what="the index")
    hashes = [block_hash(i, "evict") for i in range(160)]
    for start in range(0, 160, 32):
        blocks = [(i - start, hashes[i]) for i in range(start, start + 32)]
        worker.fill(blocks)
        assert worker.save(blocks)["ok"]
        for i in range(start + 32):
            sched.index.enabled = False  # this lookup over RPC: the store's answer
            rpc = sched.lookup([hashes[i]]).result(timeout=10).hit_blocks
            sched.index.enabled = True
            assert local(sched, [hashes[i]]) == rpc, f"block {i}: index and store disagree"
    assert daemon.host_tier().evictions >= 96


def test_a_restart_maps_the_new_index_and_never_the_old(
    daemon_factory: DaemonFactory, worker_factory: WorkerFactory, schedulers: list[KvdClient]
) -> None:
    daemon = daemon_factory(capacity_bytes=8 * MiB, slab_bytes=1 * MiB, lease_ms=600)
    worker = worker_factory(daemon.socket, SPEC, "restart")
    worker.wait_ready()
    sched = scheduler(daemon, "restart", schedulers)
    wait_for(lambda: sched.index.mapped, 10, what="the index")
    blocks = [(i, block_hash(i, "restart")) for i in range(8)]
    worker.fill(blocks)
    assert worker.save(blocks)["ok"]
    hashes = [h for _, h in blocks]
    assert local(sched, hashes) == 8
    old_boot = sched.boot_id
    daemon.kill()
    # The lease hangs up the moment the daemon dies: the mapping stops answering at once, not at the next heartbeat.
    wait_for(lambda: not sched.index.mapped, 2, what="the mapping dropped after the daemon died")
    daemon.start()
    wait_for(lambda: sched.ready and sched.boot_id != old_boot and sched.index.mapped, 20, what="the new index")
    assert local(sched, hashes) == 0, "the new daemon holds nothing: the old mapping answered"
    assert sched.index.boot_id == sched.boot_id[:16]


def test_a_scheduler_that_registered_first_maps_the_index_later(
    daemon_factory: DaemonFactory, worker_factory: WorkerFactory, schedulers: list[KvdClient]
) -> None:
    daemon = daemon_factory(capacity_bytes=8 * MiB, slab_bytes=1 * MiB, lease_ms=600)
    sched = scheduler(daemon, "late", schedulers)
    assert not sched.index.mapped  # no memory session in its group yet: nothing published
    assert sched.lookup([block_hash(0, "late")]).result(5).hit_blocks == 0  # over RPC meanwhile
    worker = worker_factory(daemon.socket, SPEC, "late")
    worker.wait_ready()
    wait_for(lambda: sched.index.mapped, 10, what="the scheduler's index after the worker registered")
    blocks = [(i, block_hash(i, "late")) for i in range(4)]
    worker.fill(blocks)
    assert worker.save(blocks)["ok"]
    assert local(sched, [h for _, h in blocks]) == 4


def test_only_the_sessions_process_gets_its_index(daemon: Daemon, worker_factory: WorkerFactory) -> None:
    worker = worker_factory(daemon.socket, SPEC, "owner")
    info = worker.wait_ready()
    session, key = info["session_id"], bytes.fromhex(info["session_key"])
    # Without the session's key: refused.
    with pytest.raises(GrantRefused, match="wrong or missing session key"):
        fetch_grant(Path(daemon.socket), session, b"", GRANT_SHARED, timeout_s=5)
    with pytest.raises(GrantRefused):
        fetch_grant(Path(daemon.socket), "no-such-session", key, GRANT_SHARED, timeout_s=5)
    # With the key, but from another process than the one that registered (a leaked key): refused.
    with pytest.raises(GrantRefused, match="belongs to another process"):
        fetch_grant(Path(daemon.socket), session, key, GRANT_SHARED, timeout_s=5)
    # A client that only wanted its token (every client before this feature) still gets it and nothing else.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(credential_socket_path(Path(daemon.socket))))
        assert len(sock.recv(TOKEN_BYTES)) == TOKEN_BYTES
    assert daemon.stats().sessions  # and the daemon serves on


def test_disk_blocks_stay_published_and_come_back_after_a_restart(
    tmp_path: Path, daemon_factory: DaemonFactory, worker_factory: WorkerFactory, schedulers: list[KvdClient]
) -> None:
    # No grace period here: blocks retired ahead would share the small write-down queue with the evicted ones.
    env = {"KVD_DISK__PATH": str(tmp_path / "disk"), "KVD_HOST_POOL__REUSE_GRACE_MS": "0"}
    daemon = daemon_factory(capacity_bytes=2 * MiB, slab_bytes=1 * MiB, lease_ms=600, env=env)  # 32 blocks in L1
    worker = worker_factory(daemon.socket, SPEC, "disk")
    worker.wait_ready()
    sched = scheduler(daemon, "disk", schedulers)
    wait_for(lambda: sched.index.mapped, 10, what="the index")
    hashes = [block_hash(i, "disk") for i in range(96)]
    for start in range(0, 96, 8):  # the write-down queue holds a quarter of L1 (8 blocks) at a time
        blocks = [(i - start, hashes[i]) for i in range(start, start + 8)]
        worker.fill(blocks)
        assert worker.save(blocks)["ok"]
        # The blocks this save evicted went to the write-down queue, then to disk: published all the way, no gap.
        # (Only in-process lookups here: a lookup RPC would promote disk hits back into L1.)
        assert local(sched, hashes) == start + 8
        wait_for(lambda: daemon.stats().tiers[1].blocks >= max(0, start - 24), 10, what="the write-downs")  # noqa: B023
    tiers = sched.lookup(hashes).result(0).tiers
    assert tiers.count(Tier.HOST_MEMORY) <= 32 and len(tiers) == 96
    loaded = [(64 + i, h) for i, h in enumerate(hashes[:8])]  # from disk, promoted through L1
    assert worker.load(loaded)["ok"] and worker.verify(loaded) == []
    worker.ask_exit()
    worker.close()
    daemon.restart()
    worker = worker_factory(daemon.socket, SPEC, "disk")
    worker.wait_ready()
    wait_for(lambda: sched.ready and sched.index.mapped, 20, what="the new index")
    # The disk tier's blocks are published as soon as their namespace's first memory session registers.
    wait_for(lambda: local(sched, hashes) >= 64, 10, what="the disk blocks in the new index")
