"""Blocks move between real worker processes through a real daemon: bytes, LRU eviction, read-your-writes."""

from __future__ import annotations

import concurrent.futures

import pytest
from kvd_client import KvdClient, OperationStages

from tests.conftest import DaemonFactory, WorkerFactory
from tests.helpers.clients import Completions
from tests.helpers.daemon import Daemon, MiB
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_hash, fill, make_caches, mismatches
from tests.helpers.rpc import fingerprint, lookup_hits


def test_worker_a_saves_worker_b_loads_into_other_blocks(daemon: Daemon, worker_factory: WorkerFactory) -> None:
    spec_a = CacheSpec(num_blocks=64)
    spec_b = CacheSpec(num_blocks=96)  # a cache of another size shares blocks: num_blocks is not in the layout key
    a = worker_factory(daemon.socket, spec_a, "model-ab", name="worker-a")
    b = worker_factory(daemon.socket, spec_b, "model-ab", name="worker-b")
    a.wait_ready()
    b.wait_ready()
    assert a.hello()["block_bytes"] == spec_a.block_bytes

    hashes = [block_hash(i, "ab") for i in range(24)]
    saved_at = [(3 + 2 * i, h) for i, h in enumerate(hashes)]  # scattered source indices
    a.fill(saved_at)
    result = a.save(saved_at)
    assert result["ok"], result
    assert result["nbytes"] == len(hashes) * spec_a.block_bytes

    assert b.lookup(hashes) == {"hit_blocks": len(hashes)}
    assert b.lookup([*hashes[:5], block_hash(999, "ab"), *hashes[5:]]) == {"hit_blocks": 5}  # a prefix, not a set

    loaded_at = [(95 - i, h) for i, h in enumerate(hashes)]  # other indices, reversed order
    result = b.load(loaded_at)
    assert result["ok"], result
    assert b.verify(loaded_at) == []
    assert b.nonzero(exclude=[i for i, _ in loaded_at]) == []  # nothing else in B's cache was written

    stats = daemon.stats()
    assert stats.saves_ok >= 1 and stats.loads_ok >= 1
    assert stats.bytes_loaded == len(hashes) * spec_b.block_bytes
    assert {s.worker_name for s in stats.sessions} == {"worker-a", "worker-b"}
    assert {s.transport for s in stats.sessions} == {"cpu"}


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "rpc"])
def test_every_completion_carries_its_stages_in_order(
    daemon: Daemon, worker_factory: WorkerFactory, ring: bool
) -> None:
    """Each save and load is stamped at every stage of its path, client and daemon on one clock, in path order. A
    request through the submission ring has no hop to the client's loop: its `loop` stage is 0."""
    w = worker_factory(daemon.socket, CacheSpec(), "model-stages", extra_args=[] if ring else ["--no-ring"])
    assert w.wait_ready()["has_ring"] is ring
    pairs = [(i, block_hash(i, "stages")) for i in range(6)]
    w.fill(pairs)
    for result in (w.save(pairs), w.load([(10 + i, h) for i, h in pairs])):
        assert result["ok"], result
        stages = result["stages"]
        assert (stages["loop_ns"] == 0) is ring, stages
        path = [stages[f"{name}_ns"] for name in OperationStages.ORDER if not (ring and name == "loop")]
        assert all(path), stages  # every stage reached and stamped
        assert path == sorted(path), stages
        # The TransferAccepted may arrive after the notice (then it is not in the completion): never before the send.
        assert stages["accepted_ns"] == 0 or stages["accepted_ns"] >= stages["send_ns"]


def test_load_of_missing_blocks_reports_exactly_those(daemon: Daemon, worker_factory: WorkerFactory) -> None:
    spec = CacheSpec()
    w = worker_factory(daemon.socket, spec, "model-missing")
    w.wait_ready()
    stored = [(i, block_hash(i, "missing")) for i in range(4)]
    w.fill(stored)
    assert w.save(stored)["ok"]
    absent = block_hash(100, "missing")
    result = w.load([(10, stored[0][1]), (11, absent), (12, stored[3][1])])
    assert not result["ok"]
    assert result["failed"] == [absent.hex()]
    assert w.verify([(10, stored[0][1]), (12, stored[3][1])]) == []


@pytest.mark.parametrize("segment_bytes", [None, 64 * 1024], ids=["whole", "one-block-segments"])
def test_lru_eviction_at_capacity(daemon_factory: DaemonFactory, segment_bytes: int | None) -> None:
    # 4 slabs of 1 MiB, 64 KiB blocks: exactly 64 blocks fit. Plain LRU: slots reused the moment their block is
    # evicted (no grace period, which would retire a few blocks ahead of need). Split into one-block segments, a
    # request's blocks still age in block order (its segments commit in order, whichever copy ends first).
    env = {"KVD_HOST_POOL__REUSE_GRACE_MS": "0"}
    if segment_bytes is not None:
        env["KVD_SEGMENT_BYTES"] = str(segment_bytes)
    daemon = daemon_factory(capacity_bytes=4 * MiB, slab_bytes=1 * MiB, env=env)
    spec = CacheSpec(num_layers=2, num_blocks=128, block_size=16, kv_heads=8, head_dim=64)
    assert spec.block_bytes == 64 * 1024
    caches = make_caches(spec)
    hashes = [block_hash(i, "lru") for i in range(96)]
    fill(caches, spec, enumerate(hashes))
    client = KvdClient(daemon.socket, model_id="model-lru", worker_name="lru")
    client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    with client:
        assert client.wait_ready(20)
        done = Completions(client)

        def save(indices: range) -> None:
            completion = done.wait(client.save([(i, hashes[i]) for i in indices]))
            assert completion.ok, completion

        for start in range(0, 64, 16):  # oldest first
            save(range(start, start + 16))
        assert daemon.host_tier().blocks == 64
        assert daemon.host_tier().evictions == 0
        assert client.lookup(hashes[:8]).result(5).hit_blocks == 8
        # A use makes h0..h7 the most recent: a load (lookups answered from the shared index are invisible to the
        # daemon; the load that follows a hit is what refreshes the LRU order).
        assert done.wait(client.load([(100 + i, hashes[i]) for i in range(8)])).ok

        save(range(64, 96))  # 32 more: the 32 least recently used (h8..h39) must go

        def hit(i: int) -> bool:
            return client.lookup([hashes[i]]).result(5).hit_blocks == 1

        hits = [i for i in range(96) if hit(i)]
        assert hits == [*range(8), *range(40, 96)]
        tier = daemon.host_tier()
        assert tier.evictions == 32
        assert tier.blocks == 64
        assert tier.used_bytes == tier.capacity_bytes == 4 * MiB

        # And what survived is still the right bytes.
        fill(caches, spec, [(i, block_hash(10_000 + i, "lru-junk")) for i in range(128)])
        loads = [(127 - k, hashes[i]) for k, i in enumerate([0, 7, 40, 95])]
        completion = done.wait(client.load(loads))
        assert completion.ok, completion
        assert mismatches(caches, spec, loads) == []


def test_read_your_writes(daemon: Daemon, spec: CacheSpec) -> None:
    """Once a save's completion arrives, a lookup of its blocks hits: every time."""
    caches = make_caches(spec)
    rounds = 200
    client = KvdClient(daemon.socket, model_id="model-ryw", worker_name="ryw")
    client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    with client:
        assert client.wait_ready(20)
        done = Completions(client)
        for r in range(rounds):
            n = 1 + r % 3
            pairs = [((3 * r + k) % spec.num_blocks, block_hash(k, f"ryw{r}")) for k in range(n)]
            completion = done.wait(client.save(pairs))
            assert completion.ok, (r, completion)
            result = client.lookup([h for _, h in pairs]).result(5)
            assert result.hit_blocks == n, (r, result)
    # Also from another session (another worker's view).
    last = [block_hash(k, f"ryw{rounds - 1}") for k in range(1 + (rounds - 1) % 3)]
    assert lookup_hits(daemon.stub(), daemon.socket, "model-ryw", fingerprint(spec), last) == len(last)


def test_concurrent_saves_of_the_same_blocks_then_lookup(daemon: Daemon, spec: CacheSpec) -> None:
    """Two saves of the same block in flight at once: both notices are only sent once the block is stored."""
    caches = make_caches(spec)
    pairs = [(i, block_hash(i, "dup")) for i in range(32)]
    fill(caches, spec, pairs)
    client = KvdClient(daemon.socket, model_id="model-dup")
    client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    with client:
        assert client.wait_ready(20)
        done = Completions(client)
        ops = [client.save(pairs) for _ in range(4)]
        for op in ops:
            completion = done.wait(op)
            assert completion.ok, completion
            assert client.lookup([h for _, h in pairs]).result(5).hit_blocks == len(pairs)
        assert daemon.host_tier().blocks == len(pairs)


@pytest.mark.parametrize("n_workers", [3])
def test_parallel_workers_do_not_interfere(daemon: Daemon, worker_factory: WorkerFactory, n_workers: int) -> None:
    spec = CacheSpec(num_blocks=32)
    workers = [worker_factory(daemon.socket, spec, f"model-par{k}", name=f"par{k}") for k in range(n_workers)]
    for w in workers:
        w.wait_ready()
    plans = {k: [(i, block_hash(i, f"par{k}")) for i in range(16)] for k in range(n_workers)}
    for k, w in enumerate(workers):
        w.fill(plans[k])
    with concurrent.futures.ThreadPoolExecutor(n_workers) as pool:
        results = list(pool.map(lambda k: workers[k].save(plans[k]), range(n_workers)))
    assert all(r["ok"] for r in results), results
    for k, w in enumerate(workers):
        # A different model never sees another model's blocks...
        other = plans[(k + 1) % n_workers]
        assert w.lookup([h for _, h in other]) == {"hit_blocks": 0}
        # ...and its own come back intact at new indices.
        moved = [(31 - i, h) for i, h in plans[k]]
        assert w.load(moved)["ok"]
        assert w.verify(moved) == []
