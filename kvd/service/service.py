"""The service layer: sessions, leases, namespaces and admission. It decides what happens; the transports (through a
session's attachment) move the bytes and the block store keeps track of what is stored.

Every public method validates its input completely (session and its key first, then batch size, every block index
and hash) before any copy starts, raises only KvdError subclasses, and returns at once: Save and Load hand back an
operation id and run in the background; their outcome is a Notice on the session's Watch stream. Every session
belongs to a verified peer and sees only its tenant's blocks (docs/security.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from kvd_client.layout import KvLayout

from kvd.config import KvdConfig
from kvd.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SessionNotFound,
    Unavailable,
)
from kvd.logs import Throttled
from kvd.process import PeerProcess
from kvd.service.checks import (
    LayoutClaims,
    admit_event,
    block_keys,
    check_block_fits,
    check_block_indices,
    check_hashes,
    check_peer,
    namespace_key,
    rank_namespace_key,
)
from kvd.service.operations import Operation, Outcome, drained, run_load, run_save, start_task
from kvd.service.published import in_step_progress, publish_namespace
from kvd.service.reports import stats_snapshot, update_session_gauges
from kvd.service.sessions import Session, SessionTable, watch_exit
from kvd.tiers.store import BlockStore
from kvd.transports.base import Attachment
from kvd.transports.router import TransportRouter
from kvd.types import (
    BlockBatch,
    DaemonStages,
    InStep,
    LookupResult,
    Notice,
    OpKind,
    Registration,
    ServiceCounters,
    SessionRef,
    Stamps,
    StatsSnapshot,
    Tier,
)

if TYPE_CHECKING:
    from kvd.memory.index_registry import IndexRegistry
    from kvd.memory.progress import LayerProgress
    from kvd.metrics import Metrics

log = logging.getLogger(__name__)


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
        self._layouts = LayoutClaims()
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.counters = ServiceCounters()
        self.indexes: IndexRegistry | None = None  # the published indexes (set by the daemon)
        self._warn = Throttled(log)
        self._eager = config.runtime.eager_operations

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

    # -- sessions ------------------------------------------------------------------------------------------------

    async def register(self, registration: Registration) -> Session:
        """A session for a verified peer (its process is the session's from now on, closed with it; on a refusal
        the caller closes it)."""
        self.check_open()
        peer = registration.peer
        config = self.config
        check_peer(peer, config.may_register(peer.uid), self.sessions.of_uid(peer.uid), config.max_sessions_per_uid)
        ns_key = namespace_key(peer.tenant, registration.namespace)
        # One memory session and one lookup-only session per process and namespace: vLLM's scheduler (lookups) and
        # worker (memory) share a process with a single-process executor.
        if self.sessions.find(peer, ns_key, with_memory=registration.memory is not None) is not None:
            kind = "memory" if registration.memory is not None else "lookup-only"
            raise AlreadyExists(f"pid {peer.pid} already has a live {kind} session for namespace {ns_key!r}")
        canonical = self._canonical_layout(registration, ns_key)
        attachment = await self._attach(registration, ns_key, canonical) if canonical is not None else None
        publish_namespace(self.indexes, self.store, registration, ns_key)
        session = self.sessions.new(registration, attachment, config.lease_ms / 1000)
        self._watch_process(session)
        log.info(
            "session %s registered: worker %r pid %d uid %d tenant %r namespace %r transport %s",
            session.label,
            registration.worker_name,
            peer.pid,
            peer.uid,
            peer.tenant,
            registration.namespace.key,
            session.transport,
        )
        self._update_session_gauges()
        return session

    def _canonical_layout(self, registration: Registration, ns_key: str) -> tuple[str, ...] | None:
        """The layout's canonical form once it is checked against the buffers a block passes through and against its
        namespace; None: lookup-only."""
        layout, memory = registration.layout, registration.memory
        canonical = None
        if layout is not None and memory is not None:
            limits = [(self.store.max_block_bytes, "the host pool's slab", "host_pool.slab_bytes")]
            transport_limit = self.transports.block_limit(memory)
            if transport_limit is not None:
                limits.append((transport_limit[0], "the GPU staging chunk", transport_limit[1]))
            check_block_fits(layout.block_bytes, limits)
            canonical = tuple(layer.canonical() for layer in layout.layers)
            self._layouts.check(ns_key, canonical)
        if (registration.memory is None) != (layout is None):
            raise InvalidArgument("a session carries both a KV layout and its memory, or neither (lookup-only)")
        return canonical

    async def _attach(self, registration: Registration, ns_key: str, canonical: tuple[str, ...]) -> Attachment:
        """Map the worker's memory through its transport, then claim the namespace's layout (in its tenant)."""
        peer, layout, memory = registration.peer, registration.layout, registration.memory
        if layout is None or memory is None:
            raise InvalidArgument("a session with memory needs its KV layout")
        attachment = await self.transports.attach(memory, layout, peer)
        if self.sessions.find(peer, ns_key, with_memory=True) is not None:
            await attachment.close()  # a twin registration won the race during the await
            raise AlreadyExists(f"pid {peer.pid} already has a live memory session for namespace {ns_key!r}")
        # Claim the namespace's layout only now: a registration refused above (bad memory, no ptrace grant)
        # must not lock the namespace to its layout. Re-checked, as another one may have claimed it meanwhile.
        try:
            self._layouts.claim(ns_key, canonical)
        except InvalidArgument:
            await attachment.close()
            raise
        return attachment

    def heartbeat(self, ref: SessionRef) -> None:
        self.sessions.get(ref)

    async def unregister(self, ref: SessionRef) -> None:
        session = self.sessions.get(ref)
        await self._close_session(session, "unregistered")

    def watch(self, ref: SessionRef) -> AsyncIterator[Notice]:
        return self.sessions.get(ref).notices()

    def session_of_process(self, ref: SessionRef, process: PeerProcess) -> Session:
        """The live session `ref` names (its key checked), for that session's own process only: what a session
        shares with its worker outside gRPC (its submission ring) goes to no one else."""
        session = self.sessions.get(ref)
        if not session.registration.peer.process.same_process(process):
            raise PermissionDenied(f"session {session.label} belongs to another process")
        return session

    def refuse(self, ref: SessionRef, notice: Notice) -> None:
        """The notice of a request refused before it became an operation (a ring record the Save/Load RPC would
        have answered with an error): on the session's Watch stream, like every other outcome."""
        try:
            session = self.sessions.get(ref)
        except (SessionNotFound, PermissionDenied):
            return  # closing: its client fails whatever it has in flight
        session.notify(notice)

    # -- lookup --------------------------------------------------------------------------------------------------

    async def lookup(self, ref: SessionRef, hashes: Sequence[bytes]) -> LookupResult:
        session = self.sessions.get(ref)  # before any per-hash work
        check_hashes(hashes, self.config.max_lookup_blocks)
        ns, tenant = session.registration.namespace, session.registration.peer.tenant
        # Tensor-parallel ranks store separate shards; a prefix is a hit only if every rank has it.
        hit_blocks = len(hashes)
        tiers: tuple[Tier, ...] = ()
        for rank in range(ns.tp_world_size):
            key = session.namespace_key if rank == ns.tp_rank else rank_namespace_key(tenant, ns, rank)
            keys = block_keys(key, hashes[:hit_blocks])
            hit, rank_tiers = await self.store.lookup(keys)
            hit_blocks = min(hit_blocks, hit)
            if rank == ns.tp_rank:
                tiers = rank_tiers
        self.counters.lookups += 1
        self.counters.lookup_blocks += len(hashes)
        self.counters.lookup_hit_blocks += hit_blocks
        hit_tiers = tiers[:hit_blocks]
        if self.metrics is not None:
            self.metrics.observe_lookup(len(hashes), hit_blocks)
            for tier, count in collections.Counter(hit_tiers).items():
                self.metrics.observe_tier_hit(tier.name.lower(), count)
        return LookupResult(hit_blocks=hit_blocks, tiers=hit_tiers)

    # -- save / load ---------------------------------------------------------------------------------------------

    # `stamps`: the operation's stage times, begun by the rpc layer ("received"); the layers below stamp theirs.
    def save(
        self, ref: SessionRef, blocks: BlockBatch, ready_event: bytes, client_tag: int, stamps: Stamps = None
    ) -> int:
        session, layout = self._begin_transfer(ref, blocks, ready_event)
        op_id = session.begin_operation()
        session.saves += 1
        run = self._run(OpKind.SAVE, session, layout, op_id, blocks, ready_event, client_tag, stamps)
        self._spawn(run, eager=self._eager)
        return op_id

    def load(
        self, ref: SessionRef, blocks: BlockBatch, ready_event: bytes, client_tag: int, stamps: Stamps = None,
        in_step: InStep | None = None,  # an in-step load's progress entry (kvd_client.progress)
    ) -> int:  # fmt: skip
        session, layout = self._begin_transfer(ref, blocks, ready_event)
        if len(set(blocks.indices)) != len(blocks):
            raise InvalidArgument("a load writes each destination block index at most once")
        progress = in_step_progress(session, layout, in_step)
        op_id = session.begin_operation()
        session.loads += 1
        run = self._run(OpKind.LOAD, session, layout, op_id, blocks, ready_event, client_tag, stamps, progress)
        self._spawn(run, eager=self._eager)
        return op_id

    async def _run(
        self,
        kind: OpKind,
        session: Session,
        layout: KvLayout,
        op_id: int,
        blocks: BlockBatch,
        ready_event: bytes,
        client_tag: int,
        stamps: Stamps,
        progress: LayerProgress | None = None,
    ) -> None:
        start = time.monotonic()
        stamps = stamps or DaemonStages(received_ns=time.monotonic_ns())
        keys = block_keys(session.namespace_key, blocks.hashes)
        what = f"{kind} {op_id} of session {session.label}"
        run, memory = (run_save if kind is OpKind.SAVE else run_load), session.attachment
        segment = self.config.segment_bytes and max(1, self.config.segment_bytes // layout.block_bytes)
        op = Operation(self.store, memory, layout, blocks, keys, ready_event, what, stamps, progress, segment)
        try:
            outcome = await run(op)
        except asyncio.CancelledError:  # drained past its timeout: it still ends, or closing its session waits forever
            self._conclude(kind, session, op_id, blocks, client_tag, stamps, drained(blocks.hashes), start)
            raise
        self._conclude(kind, session, op_id, blocks, client_tag, stamps, outcome, start)

    def _conclude(self, kind: OpKind, session: Session, op_id: int, blocks: BlockBatch, client_tag: int,
                  stamps: DaemonStages, outcome: Outcome, start: float) -> None:  # fmt: skip
        if kind is OpKind.LOAD:
            hit = len(blocks) - len(outcome.failed)
            self.counters.load_hit_blocks += hit
            self.counters.load_miss_blocks += len(outcome.failed)
            if self.metrics is not None:
                self.metrics.observe_load_blocks(hit, len(outcome.failed))
        seconds = time.monotonic() - start
        error = outcome.failure.message if outcome.failure is not None else ""
        stamps.queued_ns = time.monotonic_ns()
        notice = Notice(  # once, positionally: dataclasses.replace of a partial notice cost several times as much
            op_id, kind, not outcome.failed, tuple(outcome.failed), error, client_tag, outcome.moved,
            int(seconds * 1e6), outcome.done_event, stamps,
        )  # fmt: skip
        self._finish(session, notice, outcome, seconds, len(blocks))

    def _finish(self, session: Session, notice: Notice, outcome: Outcome, seconds: float, nblocks: int) -> None:
        """Queue the operation's notice, then count it: counters, metrics and the log are nobody's to wait for (the
        loop runs nothing in between, so a Stats call after the notice still sees them)."""
        failure, error = outcome.failure, notice.error
        session.end_operation(notice)
        self.counters.count_operation(notice.kind, notice.ok, outcome.moved)
        if self.metrics is not None:
            reason = failure.reason.value if failure is not None else ""
            self.metrics.observe_operation(
                notice.kind.value, notice.ok, outcome.moved, seconds, nblocks, len(outcome.failed), reason
            )
        if error:
            log.debug(
                "%s %d of session %s: %d failed: %s",
                notice.kind,
                notice.operation_id,
                session.label,
                len(outcome.failed),
                error,
            )

    # -- stats ---------------------------------------------------------------------------------------------------

    def stats(self) -> StatsSnapshot:
        return stats_snapshot(self.boot_id, self.started, self.sessions, self.store, self.counters)

    def tier_health(self) -> tuple[tuple[str, bool], ...]:
        """(tier name, healthy) for every tier, for health probes and metrics."""
        return tuple((tier.name, tier.healthy) for tier in self.store.snapshots())

    # -- internals -----------------------------------------------------------------------------------------------

    def check_open(self) -> None:
        if self._draining:
            raise Unavailable("kvd is shutting down")

    def _begin_transfer(self, ref: SessionRef, blocks: BlockBatch, ready_event: bytes) -> tuple[Session, KvLayout]:
        self.check_open()
        session = self.sessions.get(ref)
        layout = session.registration.layout
        if layout is None or session.attachment is None:
            raise FailedPrecondition("a lookup-only session cannot save or load: register its KV memory")
        check_hashes(blocks.hashes, self.config.max_batch_blocks)
        check_block_indices(blocks.indices, layout.num_blocks)
        if session.in_flight >= self.config.max_inflight_ops:
            raise ResourceExhausted(f"{session.in_flight} operations already in flight for this session")
        session.attachment.check()
        admit_event(session.events, ready_event, self.config.max_worker_events)
        return session, layout

    def _spawn(self, coro: Coroutine[Any, Any, None], eager: bool = False) -> None:
        """Run `coro` as a task. `eager` (Python 3.12 on): its first step runs now, in the caller, so an operation is
        planned and handed to its transport before the handler returns instead of a loop iteration later."""
        task = start_task(asyncio.get_running_loop(), coro, eager)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _watch_process(self, session: Session) -> None:
        """Close the session the moment its worker exits (pidfd turns readable), not only when the lease ends."""
        watch_exit(session, lambda: self._spawn(self._close_session(session, "worker process exited")))

    async def _close_session(self, session: Session, why: str) -> None:
        if session.closing:
            return
        session.closing = True
        session.run_closers()  # what it shares outside gRPC (its ring) takes no new work from now on
        await session.wait_idle()  # never unmap memory under a copy in flight
        process = session.registration.peer.process
        if session.watching_exit and process.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(process.pidfd)
        if session.attachment is not None:
            try:
                await session.attachment.close()
            except Exception:
                self._warn.exception("attachment-close", "closing the attachment of session %s", session.label)
        process.close()
        session.end_notices()
        self.sessions.remove(session)
        self._update_session_gauges()
        log.info("session %s closed: %s", session.label, why)

    async def _sweep_leases(self) -> None:
        period = max(0.05, min(1.0, self.config.lease_ms / 4000))
        while True:
            await asyncio.sleep(period)
            for session in self.sessions.expired(time.monotonic()):
                self._spawn(self._close_session(session, "lease expired"))

    def _update_session_gauges(self) -> None:
        update_session_gauges(self.metrics, self.sessions)
