"""A save's publication staged while its bytes are copied (kvd.memory.index_batches), against the client's reader:
invisible until revealed, wherever cuckoo kicks moved it meanwhile; gone without a trace when the copy failed; and
the same whichever of staging and revealing comes first (the copy's thread stages, the event loop reveals)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from kvd_client.layout import Namespace

from kvd.config import HostPoolConfig, IndexConfig
from kvd.memory.host_pool import HostPool
from kvd.memory.index_batches import StageState
from kvd.memory.index_registry import IndexRegistry
from kvd.memory.shm_index import ShmIndex, Source, Staged
from kvd.tiers.store import HostStore
from kvd.types import namespace_key
from tests.helpers.shm_index import key, make_index, readers

HOST = Source.HOST


@pytest.fixture
def index() -> Iterator[ShmIndex]:
    made = make_index()
    yield made
    made.close()


def found(index: ShmIndex, hashes: Sequence[bytes]) -> list[int]:
    """How many of `hashes` each reader finds, one at a time (not as a prefix: every block counts)."""
    return [sum(reader.probe([h]) for h in hashes) for reader in readers(index)]


# 32-byte hashes (the connector's, their own index keys) and shorter ones (digested, remembered while published)
SAVES = [[key("save", i) for i in range(16)], [key("short", i, size=16) for i in range(16)]]


@pytest.mark.parametrize("hashes", SAVES, ids=["32-byte", "16-byte"])
def test_staged_blocks_are_invisible_until_revealed(index: ShmIndex, hashes: list[bytes]) -> None:
    token = Staged(hashes, 0)
    index.stage(token)
    assert token.state is StageState.STAGED and len(token.placed) == len(hashes)
    assert found(index, hashes) == [0, 0], "a staged block is found before its bytes are complete"
    index.reveal(token)
    assert found(index, hashes) == [len(hashes)] * 2
    assert all(reader.probe_tiers(hashes) == (len(hashes), len(hashes)) for reader in readers(index))
    assert index.counters()["entries"] == len(hashes)
    index.discard_many(hashes, 0, HOST)
    assert found(index, hashes) == [0, 0] and index.counters()["entries"] == 0


def test_a_token_revealed_before_it_was_staged_is_published_and_staging_it_later_does_nothing(index: ShmIndex) -> None:
    hashes = SAVES[0]
    token = Staged(hashes, 0)
    index.reveal(token)  # the copy finished before its thread got to staging
    assert found(index, hashes) == [len(hashes)] * 2
    index.stage(token)
    assert token.placed == [] and index.counters()["entries"] == len(hashes)
    index.discard_many(hashes, 0, HOST)
    assert index.counters()["entries"] == 0, "a late stage left entries behind"


@pytest.mark.parametrize("hashes", SAVES, ids=["32-byte", "16-byte"])
def test_unstaged_blocks_were_never_visible_and_leave_nothing_behind(index: ShmIndex, hashes: list[bytes]) -> None:
    token = Staged(hashes, 0)
    index.stage(token)
    index.unstage(token)  # the copy failed
    assert found(index, hashes) == [0, 0] and index.counters()["entries"] == 0
    index.reveal(token)  # a late reveal of a dropped token publishes nothing
    assert found(index, hashes) == [0, 0]
    index.add_many(hashes, 0, HOST)  # the same blocks, saved again later
    assert found(index, hashes) == [len(hashes)] * 2
    index.discard_many(hashes, 0, HOST)
    assert index.counters()["entries"] == 0


def test_staged_blocks_moved_by_later_inserts_are_revealed_where_they_went() -> None:
    index = make_index(capacity=16)  # 64 slots: the inserts below kick staged blocks to their other homes
    try:
        staged = [key("staged", i) for i in range(24)]
        token = Staged(staged, 0)
        index.stage(token)
        homes = {digest: index._blocks[digest] for digest, _ in token.placed}
        others = [key("other", i) for i in range(30)]
        index.add_many(others, 0, HOST)
        moved = [digest for digest, slot in homes.items() if index._blocks[digest] != slot]
        assert moved, "no staged block was kicked: the test shows nothing"
        assert found(index, staged) == [0, 0], "a kick made a staged block visible"
        index.reveal(token)
        assert found(index, staged + others) == [len(staged) + len(others)] * 2
        index.discard_many(staged + others, 0, HOST)
        assert index.counters()["entries"] == 0
    finally:
        index.close()


def test_tensor_parallel_blocks_are_staged_the_general_way() -> None:
    """With several ranks a block is published once every rank has it: staging leaves that to reveal."""
    index = make_index(world=2)
    try:
        hashes = SAVES[0]
        index.add_many(hashes, 1, HOST)
        token = Staged(hashes, 0)
        index.stage(token)
        assert found(index, hashes) == [0, 0]
        index.reveal(token)
        assert found(index, hashes) == [len(hashes)] * 2
    finally:
        index.close()


def test_staging_on_another_thread_races_the_reveal_and_either_order_publishes_once(index: ShmIndex) -> None:
    """Each round releases the staging thread and reveals at once: whichever gets the lock first, the blocks are
    published once and nothing is left behind. Every third round forces each order, so both are seen."""
    rng = random.Random(7)
    orders = set()
    for round_ in range(150):
        hashes = [key(f"race{round_}", i) for i in range(16)]
        token = Staged(hashes, 0)
        go = threading.Event()
        def stage(t: Staged = token, g: threading.Event = go) -> None:
            g.wait()
            index.stage(t)

        stager = threading.Thread(target=stage)
        stager.start()
        if round_ % 3 == 1:
            go.set()
            stager.join()  # staged first
        elif round_ % 3 == 2:
            index.reveal(token)  # revealed first
        go.set()
        time.sleep(rng.choice((0, 1e-5, 1e-4)))
        orders.add(token.state)
        index.reveal(token)
        stager.join()
        assert found(index, hashes) == [16, 16]
        index.discard_many(hashes, 0, HOST)
        assert index.counters()["entries"] == 0
    assert {StageState.STAGED, StageState.DONE} <= orders


@pytest.mark.parametrize("copied", [True, False], ids=["copy-done", "copy-failed"])
async def test_a_save_stages_while_copying_and_publishes_at_commit_or_never(copied: bool) -> None:
    """The store's side: the plan's `while_copying` places the save's blocks, invisible; complete_save reveals them
    (read-your-writes: before the notice) or, for a failed copy, takes them back with the slots."""
    block = 8192  # bench/save_planning.py's pool shape
    pool = HostPool(HostPoolConfig(capacity_bytes=512 * block, slab_bytes=32 * block, populate_threads=1))
    registry = IndexRegistry(IndexConfig(), boot_id="b", local_bytes=pool.capacity_bytes, remote_tier=False,
                             max_lookup_blocks=1024)  # fmt: skip
    namespace = Namespace("m", "fp", 0, 1)
    shm, _ = registry.attach("t", namespace, block)
    store = HostStore(pool)
    store.publish_to(registry)
    try:
        assert shm is not None
        hashes = [key("store", i) for i in range(8)]
        plan = store.prepare_save([(namespace_key("t", namespace), h) for h in hashes], block)
        assert plan.while_copying is not None, "a save of new blocks stages its publication"
        plan.while_copying()
        assert found(shm, hashes) == [0, 0]
        store.complete_save(plan, ok=copied)
        assert found(shm, hashes) == ([8, 8] if copied else [0, 0])
        assert shm.counters()["entries"] == (8 if copied else 0)
        assert len(pool) == (8 if copied else 0)
    finally:
        registry.close()
        pool.close()
