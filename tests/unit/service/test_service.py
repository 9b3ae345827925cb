"""The service with its real store and pool, and an in-memory attachment in place of a transport (the transports
have their own tests; here the point is what the service decides): save -> lookup hit -> load bytes, failures per
block with their typed reason, and the admission limits."""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import pytest
from kvd_client.layout import DType, KvLayout, LayerLayout, Namespace

from kvd.config import HostPoolConfig, KvdConfig
from kvd.errors import (
    AlreadyExists,
    FailedPrecondition,
    FailureReason,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TransferError,
    Unavailable,
)
from kvd.memory.host_pool import HostPool
from kvd.metrics import Metrics
from kvd.process import PeerProcess
from kvd.service.service import KvdService
from kvd.service.sessions import Session
from kvd.tiers.store import HostStore
from kvd.transports.base import Attachment
from kvd.types import (
    BlockBatch,
    CpuMemory,
    CpuRegion,
    Notice,
    PeerIdentity,
    Registration,
    SessionRef,
    Stamps,
    Tier,
    TransportKind,
    WorkerMemory,
)

LAYOUT = KvLayout(layers=(LayerLayout("l0", (2, 16, 4, 16), DType.FLOAT32, 1),), block_size_tokens=4)
BLOCK = LAYOUT.block_bytes  # 2 x 4 x 16 x 4 bytes: K and V of one block
NUM_BLOCKS = LAYOUT.num_blocks


class MemoryAttachment(Attachment):
    """A worker cache in a bytearray: block b is BLOCK bytes at b * BLOCK (one segment per block)."""

    kind = TransportKind.CPU

    def __init__(self) -> None:
        self.cache = bytearray(NUM_BLOCKS * BLOCK)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.cache))
        self.fail_with: TransferError | None = None
        self.gate: asyncio.Event | None = None  # when set: copies wait for it
        self.closed = False

    async def _copy(self, block_indices: Sequence[int], addresses: Sequence[int], to_worker: bool) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        for index, slot in zip(block_indices, addresses, strict=True):
            worker = self.base + index * BLOCK
            dst, src = (worker, slot) if to_worker else (slot, worker)
            ctypes.memmove(dst, src, BLOCK)

    async def save(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None,
        while_copying: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        if while_copying is not None:
            while_copying()
        await self._copy(block_indices, addresses, to_worker=False)

    async def load(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None
    ) -> bytes:
        await self._copy(block_indices, addresses, to_worker=True)
        return b"done"

    async def close(self) -> None:
        self.closed = True


class OneAttachment:
    """Stands where the transport router does: every session gets the test's attachment."""

    def __init__(self, attachment: MemoryAttachment) -> None:
        self.attachment = attachment

    async def attach(self, memory: WorkerMemory, layout: KvLayout, peer: PeerIdentity) -> Attachment:
        return self.attachment

    def block_limit(self, memory: WorkerMemory) -> None:
        return None


@pytest.fixture
async def parts() -> AsyncIterator[tuple[KvdService, MemoryAttachment, HostPool]]:
    config = KvdConfig(host_pool=HostPoolConfig(capacity_bytes=1 << 20, slab_bytes=64 << 10), max_inflight_ops=2)
    pool = HostPool(config.host_pool)
    store = HostStore(pool)
    attachment = MemoryAttachment()
    service = KvdService(config, OneAttachment(attachment), store, Metrics(process_metrics=False))  # type: ignore[arg-type]
    await store.start()
    await service.start()
    yield service, attachment, pool
    await service.drain(1.0)
    await store.close()
    pool.close()


def batch(pairs: Iterable[tuple[int, bytes]]) -> BlockBatch:
    indices, hashes = zip(*pairs, strict=True)
    return BlockBatch(list(indices), list(hashes))


def registration(pid: int = 7, memory: bool = True, uid: int = 0) -> Registration:
    return Registration(
        namespace=Namespace("model", LAYOUT.fingerprint(), 0, 1),
        layout=LAYOUT if memory else None,
        memory=CpuMemory((CpuRegion(0x1000, LAYOUT.layers[0].nbytes),)) if memory else None,
        peer=PeerIdentity(PeerProcess(pid, uid, uid, None, None), f"uid:{uid}"),
        worker_name="test",
    )


def h(i: int) -> bytes:
    return b"hash" + i.to_bytes(4, "big")


def ref(session: Session) -> SessionRef:
    return SessionRef(session.id, session.key)


async def next_notice(service: KvdService, session: SessionRef) -> Notice:
    return await asyncio.wait_for(anext(service.watch(session)), 5)


async def test_save_then_lookup_hits_then_load_writes_the_same_bytes(parts) -> None:
    service, attachment, _ = parts
    session = await service.register(registration())
    for b in range(4):
        attachment.cache[b * BLOCK : (b + 1) * BLOCK] = bytes([b + 1]) * BLOCK
    op = service.save(ref(session), batch((b, h(b)) for b in range(4)), b"", client_tag=9)
    notice = await next_notice(service, ref(session))
    assert (notice.operation_id, notice.ok, notice.client_tag, notice.bytes_moved) == (op, True, 9, 4 * BLOCK)
    result = await service.lookup(ref(session), [h(0), h(1), h(2), h(3), h(99)])
    assert result.hit_blocks == 4 and result.tiers == (Tier.HOST_MEMORY,) * 4
    attachment.cache[:] = bytes(len(attachment.cache))
    service.load(ref(session), batch((10 + b, h(b)) for b in range(4)), b"", client_tag=0)
    loaded = await next_notice(service, ref(session))
    assert loaded.ok and loaded.done_event == b"done"
    for done in (notice, loaded):  # each layer stamped its stages, in order (the transport's are its own business)
        assert done.stages is not None
        stamps = [getattr(done.stages, f"{stage}_ns") for stage in ("received", "planned", "submitted", "resumed")]
        assert all(stamps) and stamps == sorted(stamps) and done.stages.queued_ns >= stamps[-1]
    assert all(attachment.cache[(10 + b) * BLOCK : (11 + b) * BLOCK] == bytes([b + 1]) * BLOCK for b in range(4))
    counters = service.stats().counters
    assert (counters.saves_ok, counters.loads_ok, counters.lookup_hit_blocks, counters.bytes_loaded) == (
        1,
        1,
        4,
        4 * BLOCK,
    )


async def test_a_load_fails_exactly_the_blocks_not_stored(parts) -> None:
    service, _, _ = parts
    session = await service.register(registration())
    service.save(ref(session), batch([(0, h(0))]), b"", 0)
    assert (await next_notice(service, ref(session))).ok
    service.load(ref(session), batch([(1, h(0)), (2, h(5))]), b"", 0)
    notice = await next_notice(service, ref(session))
    assert not notice.ok and notice.failed_hashes == (h(5),) and notice.error == "not stored"
    assert service.stats().counters.load_miss_blocks == 1


async def test_a_failed_copy_fails_its_blocks_and_stores_nothing(parts) -> None:
    service, attachment, pool = parts
    session = await service.register(registration())
    attachment.fail_with = TransferError("worker memory gone", FailureReason.PROCESS_VM)
    service.save(ref(session), batch([(0, h(0)), (1, h(1))]), b"", 0)
    notice = await next_notice(service, ref(session))
    assert not notice.ok and set(notice.failed_hashes) == {h(0), h(1)} and "worker memory gone" in notice.error
    assert (await service.lookup(ref(session), [h(0)])).hit_blocks == 0 and pool.used_bytes == 0
    failures = service.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "kvd_failures_total", {"kind": "save", "reason": "process_vm"}
    )
    assert failures == 1


async def test_a_save_without_room_fails_those_blocks(parts) -> None:
    service, _, pool = parts
    session = await service.register(registration())
    blocks = pool.capacity_bytes // BLOCK
    pins = []
    for i in range(blocks):  # fill the pool with blocks being read: nothing is evictable
        entry = pool.reserve(("other", h(i)), BLOCK)
        pool.commit(entry)
        pool.pin(entry)
        pins.append(entry)
    service.save(ref(session), batch([(0, h(0))]), b"", 0)
    notice = await next_notice(service, ref(session))
    assert not notice.ok and notice.failed_hashes == (h(0),) and notice.error == "host pool full"
    for entry in pins:
        pool.unpin(entry)


async def test_admission_limits(parts) -> None:
    service, attachment, _ = parts
    session = await service.register(registration())
    lookup_only = await service.register(registration(memory=False))
    with pytest.raises(InvalidArgument):
        service.save(ref(session), batch([(NUM_BLOCKS, h(0))]), b"", 0)  # index out of range
    with pytest.raises(InvalidArgument):
        service.save(ref(session), batch([(0, b"")]), b"", 0)  # empty hash
    with pytest.raises(InvalidArgument):
        service.load(ref(session), batch([(0, h(0)), (0, h(1))]), b"", 0)  # one index twice
    with pytest.raises(FailedPrecondition):
        service.save(ref(lookup_only), batch([(0, h(0))]), b"", 0)
    with pytest.raises(AlreadyExists):
        await service.register(registration())
    attachment.gate = asyncio.Event()
    service.save(ref(session), batch([(0, h(0))]), b"", 0)
    service.save(ref(session), batch([(1, h(1))]), b"", 0)
    with pytest.raises(ResourceExhausted):  # max_inflight_ops = 2
        service.save(ref(session), batch([(2, h(2))]), b"", 0)
    attachment.gate.set()
    await next_notice(service, ref(session))


async def test_sessions_per_uid_and_events_per_session_are_capped() -> None:
    config = KvdConfig(
        host_pool=HostPoolConfig(capacity_bytes=1 << 20, slab_bytes=64 << 10),
        max_sessions_per_uid=2,
        max_worker_events=2,
        allowed_uids=(1000,),
    )
    pool = HostPool(config.host_pool)
    store = HostStore(pool)
    service = KvdService(config, OneAttachment(MemoryAttachment()), store)  # type: ignore[arg-type]
    await store.start()
    await service.start()
    try:
        first = await service.register(registration(pid=1, uid=1000))
        await service.register(registration(pid=2, uid=1000))
        with pytest.raises(ResourceExhausted, match="max_sessions_per_uid"):
            await service.register(registration(pid=3, uid=1000))
        await service.register(registration(pid=3, uid=0))  # another uid is not held back
        with pytest.raises(PermissionDenied):
            await service.register(registration(pid=4, uid=1001))  # not in allowed_uids
        for event in (b"e" * 64, b"f" * 64, b"e" * 64):  # a handle already open costs nothing more
            service.save(ref(first), batch([(0, h(0))]), event, 0)
            await next_notice(service, ref(first))
        with pytest.raises(ResourceExhausted, match="max_worker_events"):
            service.save(ref(first), batch([(0, h(0))]), b"g" * 64, 0)
        await service.unregister(ref(first))
        await service.register(registration(pid=5, uid=1000))
    finally:
        await service.drain(1.0)
        await store.close()
        pool.close()


async def test_draining_refuses_new_work_and_closes_sessions(parts) -> None:
    service, attachment, _ = parts
    await service.register(registration())
    await service.drain(1.0)
    assert attachment.closed and len(service.sessions) == 0
    with pytest.raises(Unavailable):
        await service.register(registration(pid=8))
    assert service.tier_health() == (("host", True),)


class RecordingAttachment(MemoryAttachment):
    """Also keeps the block indices of every save, in the order the copies were handed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[list[int]] = []

    async def save(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None,
        while_copying: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.saved.append(list(block_indices))
        await super().save(block_indices, addresses, ready_event, stamps, while_copying)


async def test_a_request_arriving_during_a_large_one_is_planned_between_its_segments() -> None:
    """A large save goes in segments, one planned per turn of the loop: a request that arrives meanwhile is planned
    and handed over before the large one's last segment, not behind all of them (the two start copying together)."""
    config = KvdConfig(host_pool=HostPoolConfig(capacity_bytes=1 << 20, slab_bytes=64 << 10), segment_bytes=2 * BLOCK)
    pool = HostPool(config.host_pool)
    store, attachment = HostStore(pool), RecordingAttachment()
    service = KvdService(config, OneAttachment(attachment), store, Metrics(process_metrics=False))  # type: ignore[arg-type]
    await service.start()
    try:
        session = ref(await service.register(registration()))
        service.save(session, batch((b, h(b)) for b in range(12)), b"", client_tag=1)  # six segments of two blocks
        await asyncio.sleep(0)  # the request below arrives on the loop's next turn
        service.save(session, batch([(15, h(15))]), b"", client_tag=2)
        notices = [await next_notice(service, session) for _ in range(2)]
        assert all(n.ok for n in notices) and {n.client_tag for n in notices} == {1, 2}
        assert sorted(attachment.saved) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [15]]
        assert attachment.saved.index([15]) < attachment.saved.index([10, 11]), attachment.saved
    finally:
        await service.drain(1.0)
        await store.close()
        pool.close()


async def test_a_large_save_cut_short_by_a_drain_begins_no_more_segments_and_keeps_no_slots() -> None:
    """Draining past its timeout cancels a large save whose segments are still being begun, one per loop turn: the
    drain ends (the save ends too, failed), no segment begins after that, and the slots of those that had begun are
    given back (nothing stays reserved)."""
    config = KvdConfig(host_pool=HostPoolConfig(capacity_bytes=1 << 20, slab_bytes=64 << 10), segment_bytes=2 * BLOCK)
    pool = HostPool(config.host_pool)
    store, attachment = HostStore(pool), RecordingAttachment()
    attachment.gate = asyncio.Event()  # every copy waits: the save is in flight when the drain gives up on it
    service = KvdService(config, OneAttachment(attachment), store, Metrics(process_metrics=False))  # type: ignore[arg-type]
    await service.start()
    try:
        registered = await service.register(registration())
        session = ref(registered)
        service.save(session, batch((b, h(b)) for b in range(16)), b"", client_tag=1)  # eight segments
        while not attachment.saved:  # its first segment handed over (in the handler on 3.12, a turn later on 3.11)
            await asyncio.sleep(0)
        await asyncio.wait_for(service.drain(0.0), 5)  # gives up on the save at once; it must not wait for it
        begun = len(attachment.saved)
        for _ in range(10):  # the turns on which the remaining segments would have begun
            await asyncio.sleep(0)
        assert 0 < begun < 8 and len(attachment.saved) == begun, attachment.saved
        assert pool.used_bytes == 0 and len(pool) == 0
        notices = [notice async for notice in registered.notices()]  # queued before its Watch stream ended
        assert [(n.client_tag, n.ok, n.error) for n in notices] == [
            (1, False, "the daemon stopped before this operation finished")
        ]
        assert set(notices[0].failed_hashes) == {h(b) for b in range(16)}
        assert (service.stats().counters.saves_ok, service.stats().counters.saves_failed) == (0, 1)
    finally:
        await store.close()
        pool.close()
