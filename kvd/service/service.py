"""The service layer: sessions, leases, namespaces and admission. It decides what happens; the transports (through a
session's attachment) move the bytes and the block store keeps track of what is stored.

Every public method validates its input completely (session, batch size, every block index and hash) before any
copy starts, raises only KvdError subclasses, and returns at once: Save and Load hand back an operation id and run
in the background; their outcome is a Notice on the session's Watch stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvd_client.layout import KvLayout

import kvd
from kvd.config import KvdConfig
from kvd.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TransferError,
    Unavailable,
)
from kvd.service.sessions import Session, SessionTable, open_pidfd
from kvd.tiers.store import BlockStore
from kvd.transports.base import SlotRef
from kvd.transports.router import TransportRouter
from kvd.types import (
    BlockBatch,
    BlockKey,
    DaemonStages,
    LookupResult,
    Notice,
    OpKind,
    Registration,
    SessionSnapshot,
    StatsSnapshot,
    Tier,
)

if TYPE_CHECKING:
    from kvd.metrics import Metrics

log = logging.getLogger(__name__)

MAX_HASH_BYTES = 64


@dataclass(frozen=True, slots=True)
class _Transfer:
    """An accepted save or load, as its background task carries it to the notice."""

    session: Session
    layout: KvLayout
    op_id: int
    blocks: BlockBatch
    ready_event: bytes
    client_tag: int
    stamps: DaemonStages
    start: float = field(default_factory=time.monotonic)  # accepted: the notice's duration counts from here


class KvdService:
    def __init__(
        self, config: KvdConfig, transports: TransportRouter, store: BlockStore, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.transports = transports
        self.store = store
        self.metrics = metrics
        self.boot_id = secrets.token_hex(8)
        self.started = time.monotonic()
        self.sessions = SessionTable()
        self._layouts: dict[str, tuple[str, ...]] = {}  # namespace key -> canonical layout every session must share
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.counters = dict.fromkeys(
            (
                "lookups",
                "lookup_blocks",
                "lookup_hit_blocks",
                "saves_ok",
                "saves_failed",
                "loads_ok",
                "loads_failed",
                "bytes_saved",
                "bytes_loaded",
                "load_hit_blocks",
                "load_miss_blocks",
            ),
            0,
        )

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_leases(), name="kvd-lease-sweeper")

    async def drain(self, timeout_s: float) -> None:
        """Refuse new operations, let in-flight ones finish (up to timeout_s), then close every session."""
        self._draining = True
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            log.info("draining %d in-flight operations", len(pending))
            _, late = await asyncio.wait(pending, timeout=timeout_s)
            for task in late:
                task.cancel()
        for session in self.sessions:
            await self._close_session(session, "daemon shutting down")
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.store.close()

    # -- sessions ------------------------------------------------------------------------------------------------

    async def register(self, registration: Registration) -> Session:
        self._check_open()
        peer = registration.peer
        if peer.verified and peer.uid not in (0, os.getuid(), *self.config.allowed_uids):
            raise PermissionDenied(f"uid {peer.uid} may not register (allowed: root, the daemon's user, allowed_uids)")
        ns_key = registration.namespace.key
        # One memory session and one lookup-only session per process and namespace: vLLM's scheduler (lookups) and
        # worker (memory) share a process with a single-process executor.
        if self.sessions.find(peer, ns_key, with_memory=registration.memory is not None) is not None:
            kind = "memory" if registration.memory is not None else "lookup-only"
            raise AlreadyExists(f"pid {peer.pid} already has a live {kind} session for namespace {ns_key!r}")
        layout = registration.layout
        if layout is not None:
            if layout.block_bytes > self.store.pool.slab_bytes:
                raise InvalidArgument(
                    f"a block of {layout.block_bytes} bytes exceeds the host pool's slab of"
                    f" {self.store.pool.slab_bytes} bytes: raise host_pool.slab_bytes"
                )
            canonical = tuple(layer.canonical() for layer in layout.layers)
            self._check_layout(ns_key, self._layouts.get(ns_key, canonical), canonical)
        if (registration.memory is None) != (layout is None):
            raise InvalidArgument("a session carries both a KV layout and its memory, or neither (lookup-only)")
        attachment = None
        if registration.memory is not None and layout is not None:
            attachment = await self.transports.attach(registration.memory, layout, peer)
            if self.sessions.find(peer, ns_key, with_memory=True) is not None:
                await attachment.close()  # a twin registration won the race during the await
                raise AlreadyExists(f"pid {peer.pid} already has a live memory session for namespace {ns_key!r}")
            # Claim the namespace's layout only now: a registration refused above (bad memory, no ptrace grant)
            # must not lock the namespace to its layout. Re-checked, as another one may have claimed it meanwhile.
            known = self._layouts.setdefault(ns_key, canonical)
            if known != canonical:
                await attachment.close()
                self._check_layout(ns_key, known, canonical)
        session = Session(
            id=self.sessions.new_id(),
            registration=registration,
            attachment=attachment,
            lease_s=self.config.lease_ms / 1000,
        )
        self.sessions.add(session)
        self._watch_process(session)
        log.info(
            "session %s registered: worker %r pid %d uid %d (%s) namespace %r transport %s",
            session.id[:12],
            registration.worker_name,
            peer.pid,
            peer.uid,
            "verified" if peer.verified else "unverified",
            ns_key,
            session.transport,
        )
        self._update_session_gauges()
        return session

    @staticmethod
    def _check_layout(ns_key: str, known: tuple[str, ...], canonical: tuple[str, ...]) -> None:
        if known != canonical:
            raise InvalidArgument(
                f"namespace {ns_key!r} is registered with another KV layout; the fingerprint must cover the layout"
            )

    def heartbeat(self, session_id: str) -> None:
        self.sessions.get(session_id)

    async def unregister(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        await self._close_session(session, "unregistered")

    def watch(self, session_id: str) -> AsyncIterator[Notice]:
        return self.sessions.get(session_id).notices()

    # -- lookup --------------------------------------------------------------------------------------------------

    async def lookup(self, session_id: str, hashes: Sequence[bytes]) -> LookupResult:
        session = self.sessions.get(session_id)
        self._check_hashes(hashes, self.config.max_lookup_blocks)
        ns = session.registration.namespace
        # Tensor-parallel ranks store separate shards; a prefix is a hit only if every rank has it.
        hit_blocks = len(hashes)
        tiers: tuple[Tier, ...] = ()
        for rank in range(ns.tp_world_size):
            keys = self._keys(ns.key if rank == ns.tp_rank else self._rank_key(session, rank), hashes[:hit_blocks])
            hit, rank_tiers = await self.store.lookup(keys)
            hit_blocks = min(hit_blocks, hit)
            if rank == ns.tp_rank:
                tiers = rank_tiers
        self.counters["lookups"] += 1
        self.counters["lookup_blocks"] += len(hashes)
        self.counters["lookup_hit_blocks"] += hit_blocks
        hit_tiers = tiers[:hit_blocks]
        if self.metrics is not None:
            self.metrics.observe_lookup(len(hashes), hit_blocks)
            for tier, count in collections.Counter(hit_tiers).items():
                self.metrics.observe_tier_hit(tier.name.lower(), count)
        return LookupResult(hit_blocks=hit_blocks, tiers=hit_tiers)

    # -- save / load ---------------------------------------------------------------------------------------------

    def transfer(
        self,
        kind: OpKind,
        session_id: str,
        blocks: BlockBatch,
        ready_event: bytes,
        client_tag: int,
        stamps: DaemonStages | None = None,
    ) -> int:
        """Accept a save or a load (everything checked first) and run it in the background; its operation id."""
        session, layout = self._begin_transfer(session_id, blocks)
        if kind is OpKind.LOAD and len(set(blocks.indices)) != len(blocks):
            raise InvalidArgument("a load writes each destination block index at most once")
        stamps = stamps or DaemonStages(received_ns=time.monotonic_ns())
        op = _Transfer(session, layout, session.begin_operation(), blocks, ready_event, client_tag, stamps)
        if kind is OpKind.SAVE:
            session.saves += 1
            self._spawn(self._run_save(op))
        else:
            session.loads += 1
            self._spawn(self._run_load(op))
        return op.op_id

    async def _run_save(self, op: _Transfer) -> None:
        session, stamps, (indices, hashes) = op.session, op.stamps, (op.blocks.indices, op.blocks.hashes)
        plan = self.store.plan_save(self._keys(session.namespace_key, hashes), op.layout.block_bytes)
        stamps.planned_ns = time.monotonic_ns()
        failed = {hashes[i] for i in plan.no_room}
        error = "host pool full" if plan.no_room else ""
        moved = 0
        entries = [entry for _, entry in plan.to_write]
        try:
            if entries:
                if session.attachment is None:
                    raise TransferError("session has no memory")
                stamps.submitted_ns = time.monotonic_ns()
                slots = [SlotRef(e.address, e.nbytes) for e in entries]
                await session.attachment.save([indices[i] for i, _ in plan.to_write], slots, op.ready_event, stamps)
                stamps.resumed_ns = time.monotonic_ns()
                moved = len(entries) * op.layout.block_bytes
            self.store.finish_save(entries, ok=True)
        except (Exception, asyncio.CancelledError) as exc:
            self.store.finish_save(entries, ok=False)
            failed.update(hashes[i] for i, _ in plan.to_write)
            error = _failure(exc, f"save {op.op_id} of session {session.id[:12]}")
        for i, waiter in plan.in_flight:
            if not await waiter:
                failed.add(hashes[i])
                error = error or "a concurrent save of the same block failed"
        self._finish(op, OpKind.SAVE, failed, error, moved)

    async def _run_load(self, op: _Transfer) -> None:
        session, stamps, blocks = op.session, op.stamps, op.blocks
        entries = await self.store.acquire(self._keys(session.namespace_key, blocks.hashes))
        stamps.planned_ns = time.monotonic_ns()
        present = [(i, e) for i, e in zip(blocks.indices, entries, strict=True) if e is not None]
        failed = {h for h, e in zip(blocks.hashes, entries, strict=True) if e is None}
        error = "not stored" if failed else ""
        done_event = b""
        moved = 0
        try:
            if present:
                if session.attachment is None:
                    raise TransferError("session has no memory")
                stamps.submitted_ns = time.monotonic_ns()
                indices, slots = [i for i, _ in present], [SlotRef(e.address, e.nbytes) for _, e in present]
                done_event = await session.attachment.load(indices, slots, op.ready_event, stamps)
                stamps.resumed_ns = time.monotonic_ns()
                moved = len(present) * op.layout.block_bytes
        except (Exception, asyncio.CancelledError) as exc:
            failed.update(h for h, e in zip(blocks.hashes, entries, strict=True) if e is not None)
            error = _failure(exc, f"load {op.op_id} of session {session.id[:12]}")
        finally:
            self.store.release(entries)
        hit = len(blocks) - len(failed)
        self.counters["load_hit_blocks"] += hit
        self.counters["load_miss_blocks"] += len(failed)
        if self.metrics is not None:
            self.metrics.observe_load_blocks(hit, len(failed))
        self._finish(op, OpKind.LOAD, failed, error, moved, done_event)

    def _finish(
        self, op: _Transfer, kind: OpKind, failed: set[bytes], error: str, moved: int, done_event: bytes = b""
    ) -> None:
        ok = not failed
        seconds = time.monotonic() - op.start
        prefix = "saves" if kind is OpKind.SAVE else "loads"
        self.counters[f"{prefix}_{'ok' if ok else 'failed'}"] += 1
        self.counters["bytes_saved" if kind is OpKind.SAVE else "bytes_loaded"] += moved
        if self.metrics is not None:
            self.metrics.observe_operation(kind.value, ok, moved, seconds, len(op.blocks), len(failed), _reason(error))
        if error:
            log.debug("%s %d of session %s: %d failed: %s", kind, op.op_id, op.session.id[:12], len(failed), error)
        op.stamps.queued_ns = time.monotonic_ns()
        op.session.end_operation(
            Notice(
                operation_id=op.op_id,
                kind=kind,
                ok=ok,
                failed_hashes=tuple(failed),
                error=error,
                client_tag=op.client_tag,
                bytes_moved=moved,
                duration_us=int(seconds * 1e6),
                done_event=done_event,
                stages=op.stamps,
            )
        )

    # -- stats ---------------------------------------------------------------------------------------------------

    def stats(self) -> StatsSnapshot:
        return StatsSnapshot(
            boot_id=self.boot_id,
            version=kvd.__version__,
            uptime_s=int(time.monotonic() - self.started),
            sessions=tuple(
                SessionSnapshot(
                    session_id=s.id,
                    worker_name=s.registration.worker_name,
                    namespace=s.registration.namespace,
                    pid=s.registration.peer.pid,
                    transport=s.transport,
                    saves=s.saves,
                    loads=s.loads,
                    in_flight=s.in_flight,
                )
                for s in self.sessions
            ),
            tiers=self.store.snapshots(),
            counters=dict(self.counters),
            tier_counters={k: float(v) for k, v in self.store.stats_counters().items()},
        )

    def tier_health(self) -> tuple[tuple[str, bool], ...]:
        """(tier name, healthy) for every tier, for health probes and metrics."""
        return tuple((tier.name, tier.healthy) for tier in self.store.snapshots())

    # -- internals -----------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._draining:
            raise Unavailable("kvd is shutting down")

    def _check_hashes(self, hashes: Sequence[bytes], limit: int) -> None:
        if not hashes:
            raise InvalidArgument("empty batch")
        if len(hashes) > limit:
            raise ResourceExhausted(f"batch of {len(hashes)} blocks exceeds the limit of {limit}")
        lengths = list(map(len, hashes))
        if min(lengths) < 1 or max(lengths) > MAX_HASH_BYTES:
            bad = next(n for n in lengths if not 0 < n <= MAX_HASH_BYTES)
            raise InvalidArgument(f"a block hash must be 1..{MAX_HASH_BYTES} bytes, got {bad}")

    def _begin_transfer(self, session_id: str, blocks: BlockBatch) -> tuple[Session, KvLayout]:
        self._check_open()
        session = self.sessions.get(session_id)
        layout = session.registration.layout
        if layout is None or session.attachment is None:
            raise FailedPrecondition("a lookup-only session cannot save or load: register its KV memory")
        self._check_hashes(blocks.hashes, self.config.max_batch_blocks)
        num_blocks, indices = layout.num_blocks, blocks.indices
        if min(indices) < 0 or max(indices) >= num_blocks:
            bad = next(i for i in indices if not 0 <= i < num_blocks)
            raise InvalidArgument(f"block index {bad} out of range [0, {num_blocks})")
        if session.in_flight >= self.config.engine.max_inflight_ops:
            raise ResourceExhausted(f"{session.in_flight} operations already in flight for this session")
        return session, layout

    @staticmethod
    def _keys(namespace_key: str, hashes: Sequence[bytes]) -> list[BlockKey]:
        return [(namespace_key, h) for h in hashes]

    @staticmethod
    def _rank_key(session: Session, rank: int) -> str:
        ns = session.registration.namespace
        return type(ns)(ns.model_id, ns.layout_fingerprint, rank, ns.tp_world_size).key

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _watch_process(self, session: Session) -> None:
        """Close the session the moment its worker exits (pidfd turns readable), not only when the lease ends."""
        if not session.registration.peer.verified:
            return
        fd = open_pidfd(session.registration.peer.pid)
        if fd is None:
            return
        session.pidfd = fd
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(fd)
            self._spawn(self._close_session(session, "worker process exited"))

        loop.add_reader(fd, exited)

    async def _close_session(self, session: Session, why: str) -> None:
        if session.closing:
            return
        session.closing = True
        await session.wait_idle()  # never unmap memory under a copy in flight
        if session.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(session.pidfd)
            os.close(session.pidfd)
            session.pidfd = None
        if session.attachment is not None:
            try:
                await session.attachment.close()
            except Exception:
                log.exception("closing the attachment of session %s", session.id[:12])
        session.end_notices()
        self.sessions.remove(session)
        self._update_session_gauges()
        log.info("session %s closed: %s", session.id[:12], why)

    async def _sweep_leases(self) -> None:
        period = max(0.05, min(1.0, self.config.lease_ms / 4000))
        while True:
            await asyncio.sleep(period)
            for session in self.sessions.expired(time.monotonic()):
                self._spawn(self._close_session(session, "lease expired"))

    def _update_session_gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.set_sessions(len(self.sessions))
        by_transport: dict[str, int] = {}
        for s in self.sessions:
            by_transport[s.transport] = by_transport.get(s.transport, 0) + 1
        for transport in ("cpu", "cuda_ipc", "none"):
            self.metrics.set_transport_sessions(transport, by_transport.get(transport, 0))


def _failure(exc: BaseException, what: str) -> str:
    """The notice's error text for a failed copy. A transfer error (the worker's memory gone, a CUDA error) or a
    cancelled drain is expected; anything else is a bug, logged with its traceback, that fails this operation and
    never the daemon."""
    if isinstance(exc, TransferError | asyncio.CancelledError):
        return str(exc) or type(exc).__name__
    log.error("%s failed", what, exc_info=exc)
    return f"internal error: {exc}"


def _reason(error: str) -> str:
    """A short, bounded label for metrics (the full text goes to the notice and the log)."""
    if not error:
        return ""
    for label in ("not stored", "host pool full", "process_vm", "partial copy", "internal error", "CUDA", "cuda"):
        if label in error:
            return label.lower().replace(" ", "_")
    return "other"
