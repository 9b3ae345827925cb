"""Tensor-parallel ranks of one model share one daemon: each rank stores its own shard under the same block hashes,
a prefix hits only once every rank has it, and each rank loads back its own bytes. (The two-GPU variant of this, one
GPU per rank, runs on the device; this is the CPU one, which CI can run.)"""

from __future__ import annotations

from tests.helpers.daemon import Daemon
from tests.helpers.kvdata import CacheSpec, block_hash


def _rank(worker_factory, daemon: Daemon, spec: CacheSpec, rank: int, name: str):  # type: ignore[no-untyped-def]
    worker = worker_factory(
        daemon.socket,
        spec,
        "tp-model",
        name=name,
        extra_args=[f"--tp-rank={rank}", "--tp-world-size=2", f"--content-salt=rank{rank}"],
    )
    assert worker.wait_ready()["ready"]
    return worker


def test_two_ranks_store_separate_shards_and_hit_only_together(daemon: Daemon, worker_factory, spec) -> None:
    hashes = [block_hash(i, "tp") for i in range(8)]
    saved = list(enumerate(hashes))
    rank0 = _rank(worker_factory, daemon, spec, 0, "tp0-writer")
    rank1 = _rank(worker_factory, daemon, spec, 1, "tp1-writer")

    rank0.fill(saved)
    assert rank0.save(saved)["ok"]
    # Rank 1 has not stored its shard yet: for the scheduler's purposes nothing is loadable.
    assert rank0.lookup(hashes)["hit_blocks"] == 0
    assert rank1.lookup(hashes)["hit_blocks"] == 0

    rank1.fill(saved[:5])
    assert rank1.save(saved[:5])["ok"]
    assert rank0.lookup(hashes)["hit_blocks"] == 5  # the prefix every rank has
    assert rank1.lookup(hashes)["hit_blocks"] == 5

    # Fresh processes for both ranks (a new vLLM replica) load into other indices: each gets its own shard.
    reader0 = _rank(worker_factory, daemon, spec, 0, "tp0-reader")
    reader1 = _rank(worker_factory, daemon, spec, 1, "tp1-reader")
    moved = [(20 + i, h) for i, h in saved[:5]]
    for reader in (reader0, reader1):
        result = reader.load(moved)
        assert result["ok"], result
        assert reader.verify(moved) == []
        assert reader.nonzero(exclude=[i for i, _ in moved]) == []
    sessions = {s.worker_name: s for s in daemon.stats().sessions}
    assert sessions["tp0-reader"].namespace.tp_rank == 0
    assert sessions["tp1-reader"].namespace.tp_rank == 1
    assert sessions["tp1-reader"].namespace.layout_fingerprint == sessions["tp0-reader"].namespace.layout_fingerprint
