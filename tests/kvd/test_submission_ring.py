"""Saves and loads through the session's submission ring (kvd_client.ring, kvd.rpc.ring), end to end on the CPU
transport: bytes, read-your-writes, refusals as the RPC's, a full ring falling back to RPC, a daemon killed with
operations in flight, a worker that crashes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from kvd_client import KvdClient

from tests.conftest import DaemonFactory, WorkerFactory
from tests.helpers.daemon import Daemon, reap, wait_for
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_hash, fill, make_caches, mismatches


def test_ring_save_lookup_load_bytes_identical(daemon: Daemon, worker_factory: WorkerFactory) -> None:
    a = worker_factory(daemon.socket, CacheSpec(), "model-ring", name="ring-a")
    b = worker_factory(daemon.socket, CacheSpec(num_blocks=96), "model-ring", name="ring-b")
    assert a.wait_ready()["has_ring"] and b.wait_ready()["has_ring"]
    pairs = [(3 + 2 * i, block_hash(i, "ring")) for i in range(20)]
    a.fill(pairs)
    assert a.save(pairs)["ok"]
    # Read-your-writes: the notice is out, so a lookup from any session of the tenant hits at once.
    assert b.lookup([h for _, h in pairs]) == {"hit_blocks": len(pairs)}
    loaded_at = [(95 - i, h) for i, (_, h) in enumerate(pairs)]
    result = b.load(loaded_at)
    assert result["ok"], result
    assert b.verify(loaded_at) == []
    assert b.nonzero(exclude=[i for i, _ in loaded_at]) == []
    assert a.request("info")["by_ring"] == 1 and b.request("info")["by_ring"] == 1
    assert a.request("info")["by_rpc"] == 0
    stats = daemon.stats()
    assert stats.ring_records == 2 and stats.ring_refused == 0
    assert all(s.ring for s in stats.sessions)


def test_a_refused_ring_record_fails_as_the_rpc_would(daemon: Daemon, worker_factory: WorkerFactory) -> None:
    ring = worker_factory(daemon.socket, CacheSpec(), "model-refused", name="by-ring")
    rpc = worker_factory(daemon.socket, CacheSpec(), "model-refused", name="by-rpc", extra_args=["--no-ring"])
    assert ring.wait_ready()["has_ring"] and not rpc.wait_ready()["has_ring"]
    bad = [(5, block_hash(0, "refused")), (70, block_hash(1, "refused"))]  # 70 is past the cache's 64 blocks
    by_ring, by_rpc = ring.load(bad), rpc.load(bad)
    assert not by_ring["ok"] and not by_rpc["ok"]
    assert by_ring["error"] == by_rpc["error"] == "InvalidArgument: block index 70 out of range [0, 64)"
    assert by_ring["failed"] == by_rpc["failed"] == sorted(h.hex() for _, h in bad)
    good = [(1, block_hash(2, "refused"))]
    ring.fill(good)
    assert ring.save(good)["ok"]  # the session serves on
    assert daemon.stats().ring_refused == 1


def _client(daemon: Daemon, spec: CacheSpec, model_id: str) -> tuple[KvdClient, dict[str, torch.Tensor]]:
    caches = make_caches(spec)
    client = KvdClient(daemon.socket, model_id=model_id)
    client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    client.start()
    assert client.wait_ready(20)
    return client, caches


def test_a_full_ring_sends_requests_by_rpc(daemon_factory: DaemonFactory) -> None:
    """Two slots, the daemon stopped: the first two saves fill the ring, the rest go by RPC; nothing blocks the
    caller, nothing is dropped, and every save completes once the daemon runs again."""
    daemon = daemon_factory(env={"KVD_RING_SLOTS": "2"})
    spec = CacheSpec()
    client, caches = _client(daemon, spec, "model-full")
    try:
        assert client.submissions.has_ring
        batches = [[(8 * r + i, block_hash(8 * r + i, "full")) for i in range(8)] for r in range(5)]
        fill(caches, spec, [p for batch in batches for p in batch])
        daemon.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            ops = [client.save(batch) for batch in batches]
            assert time.monotonic() - started < 1.0  # the caller never waits for the daemon
            assert (client.submissions.ring_count, client.submissions.rpc_count) == (2, 3)
        finally:
            daemon.signal(signal.SIGCONT)
        done = client.wait(ops, timeout_s=20)
        assert len(done) == 5 and all(c.ok for c in done), [c.error for c in done]
        stored = [p for batch in batches for p in batch]
        for tensor in caches.values():
            tensor.zero_()  # in place (the daemon holds these addresses), then load everything back by ring
        assert all(c.ok for c in client.wait([client.load(batch) for batch in batches], timeout_s=20))
        assert mismatches(caches, spec, stored) == []
    finally:
        client.close()


def test_a_request_larger_than_a_slot_goes_by_rpc(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(env={"KVD_RING_SLOT_BYTES": "512"})  # 11 blocks with 32-byte hashes
    spec = CacheSpec()
    client, caches = _client(daemon, spec, "model-slot")
    try:
        small = [(i, block_hash(i, "slot")) for i in range(11)]
        large = [(20 + i, block_hash(20 + i, "slot")) for i in range(12)]
        fill(caches, spec, small + large)
        done = client.wait([client.save(small), client.save(large)], timeout_s=10)
        assert all(c.ok for c in done)
        assert (client.submissions.ring_count, client.submissions.rpc_count) == (1, 1)
    finally:
        client.close()


def test_daemon_killed_mid_flight_fails_every_op_and_a_new_ring_follows(daemon: Daemon) -> None:
    spec = CacheSpec()
    client, caches = _client(daemon, spec, "model-kill")
    try:
        pairs = [[(4 * r + i, block_hash(4 * r + i, "kill")) for i in range(4)] for r in range(6)]
        fill(caches, spec, [p for batch in pairs for p in batch])
        daemon.signal(signal.SIGSTOP)  # everything published stays in flight
        ops = [client.save(batch) for batch in pairs]
        assert client.submissions.ring_count == 6
        daemon.kill()
        done = sorted(client.wait(ops, timeout_s=20), key=lambda c: c.op_id)
        assert len(done) == 6 and not any(c.ok for c in done)
        assert all(c.failed_hashes == {h for _, h in batch} for c, batch in zip(done, pairs, strict=True))
        daemon.start()
        wait_for(lambda: client.ready and client.registrations == 2, 20, what="re-registration")
        assert client.submissions.rings == 2 and client.submissions.has_ring
        op = client.save(pairs[0])
        assert client.wait([op], timeout_s=10)[0].ok
        assert client.submissions.ring_count == 7
    finally:
        client.close()


def _ring_maps(pid: int) -> int:
    return Path(f"/proc/{pid}/maps").read_text().count("kvd-ring")


def _fds(pid: int) -> int:
    """The daemon's open descriptors, less its published indexes (one per namespace group, kept across sessions)."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if "kvd-index" not in _link(fd))


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:  # closed meanwhile
        return ""


@pytest.mark.parametrize("how", ["kill", "vanish"])
def test_a_worker_crash_frees_its_ring(daemon: Daemon, worker_factory: WorkerFactory, how: str) -> None:
    baseline_maps, baseline_fds = _ring_maps(daemon.pid), _fds(daemon.pid)
    worker = worker_factory(daemon.socket, CacheSpec(), "model-crash")
    assert worker.wait_ready()["has_ring"]
    assert _ring_maps(daemon.pid) == baseline_maps + 1
    if how == "kill":
        worker.kill()
    else:  # exits at once, without unregistering
        assert worker.proc.stdin is not None
        worker.proc.stdin.write('{"cmd": "vanish"}\n')
        worker.proc.stdin.flush()
        reap(worker.proc)
    wait_for(lambda: len(daemon.stats().sessions) == 0, 10, what="the session closed")
    wait_for(lambda: _ring_maps(daemon.pid) == baseline_maps, 5, what="the ring unmapped")
    wait_for(lambda: _fds(daemon.pid) <= baseline_fds, 5, what="the ring's descriptors closed")
