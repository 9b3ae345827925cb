"""A large save or load goes in pipelined segments (kvd/service/operations.py: `segment_bytes`). Here the daemon
splits every request of more than 4 blocks, so each request below is several segments, the last one short: the
notice still speaks for the whole request, bytes and failures included, and the blocks are exactly what was saved."""

from __future__ import annotations

from kvd_client import OperationStages

from tests.conftest import DaemonFactory, WorkerFactory
from tests.helpers.daemon import Daemon
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.worker import WorkerProcess

SEGMENT_BLOCKS = 4


def _segmenting(
    daemon_factory: DaemonFactory, worker_factory: WorkerFactory, spec: CacheSpec, model: str
) -> tuple[Daemon, WorkerProcess]:
    """A daemon that splits requests into SEGMENT_BLOCKS-block segments, and a ready worker of `spec` on it."""
    daemon = daemon_factory(env={"KVD_SEGMENT_BYTES": str(SEGMENT_BLOCKS * spec.block_bytes)})
    worker = worker_factory(daemon.socket, spec, model)
    worker.wait_ready()
    return daemon, worker


def test_segmented_save_and_load_move_every_block_once(
    daemon_factory: DaemonFactory, worker_factory: WorkerFactory
) -> None:
    spec = CacheSpec(num_blocks=96)
    daemon, w = _segmenting(daemon_factory, worker_factory, spec, "model-segments")
    early = [(40 + i, block_hash(i, "seg")) for i in (2, 9)]  # stored before: their segments copy the rest only
    w.fill(early)
    assert w.save(early)["ok"]

    pairs = [(3 + 2 * i, block_hash(i, "seg")) for i in range(22)]  # 6 segments: 4 x 5 + 2
    w.fill(pairs)
    result = w.save(pairs)
    assert result["ok"], result
    assert result["nbytes"] == (len(pairs) - len(early)) * spec.block_bytes  # what this save copied, all segments
    hashes = [h for _, h in pairs]
    assert w.lookup(hashes) == {"hit_blocks": len(hashes)}  # read-your-writes for every segment's blocks

    absent = {block_hash(100 + i, "seg") for i in range(2)}  # in the second and the fifth segment
    wanted = [*hashes[:5], sorted(absent)[0], *hashes[5:17], sorted(absent)[1], *hashes[17:]]
    loaded_at = [(95 - i, h) for i, h in enumerate(wanted)]
    result = w.load(loaded_at)
    assert not result["ok"]
    assert sorted(result["failed"]) == sorted(h.hex() for h in absent)  # exactly those, from their segments
    assert w.verify([(i, h) for i, h in loaded_at if h not in absent]) == []
    assert daemon.stats().bytes_loaded == len(hashes) * spec.block_bytes


def test_segmented_operations_are_stamped_in_path_order(
    daemon_factory: DaemonFactory, worker_factory: WorkerFactory
) -> None:
    """A segmented operation's stages run from its first segment's planning to its last segment's copy."""
    _, w = _segmenting(daemon_factory, worker_factory, CacheSpec(num_blocks=64), "model-segment-stages")
    pairs = [(i, block_hash(i, "seg-stages")) for i in range(3 * SEGMENT_BLOCKS + 1)]
    w.fill(pairs)
    for result in (w.save(pairs), w.load([(32 + i, h) for i, h in pairs])):
        assert result["ok"], result
        stages = result["stages"]
        path = [stages[f"{name}_ns"] for name in OperationStages.ORDER if name != "loop"]
        assert all(path), stages
        assert path == sorted(path), stages
