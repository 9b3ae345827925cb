"""The thin in-worker client.

Threading: the caller's (model) thread only assigns an operation id, notes it, and enqueues; one background thread
runs an asyncio loop with the gRPC channel and does everything else: connect, verify credentials, register,
heartbeat, send requests, read the Watch stream, and re-register after a daemon restart. That thread never touches
CUDA. Nothing here ever blocks the caller on the daemon: lookups return futures, saves and loads return ids, and
finished operations are collected with `poll_finished()`.

Failure model: when the daemon is unreachable, dies, or restarts (its boot id changes), every operation in flight
completes as failed (every block listed), so the caller recomputes; the client keeps retrying and registers again
by itself as soon as the daemon is back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from kvd_client import messages
from kvd_client.delivery import Delivery
from kvd_client.errors import InvalidArgument, KvdError, Unavailable, from_rpc_error
from kvd_client.fdpass import close_fds
from kvd_client.handoff import Finished, Inbox, run_on_loop, settle_when_done
from kvd_client.lookups import LocalIndex, Resolved, rpc_lookup
from kvd_client.memory import KvMemory
from kvd_client.messages import PendingOp
from kvd_client.progress import StepLoad
from kvd_client.session import heartbeat, open_channel, register_session
from kvd_client.submission import Submissions
from kvd_client.types import Completion, LookupResult, OpKind, session_label
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0


class KvdClient:
    def __init__(
        self,
        socket_path: str | Path,
        *,
        model_id: str,
        layout_fingerprint: str | None = None,
        tp_rank: int = 0,
        tp_world_size: int = 1,
        worker_name: str = "",
        timeout_s: float = 5.0,
        submission_ring: bool = True,
        completion_queue: bool = True,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.model_id = model_id
        self.layout_fingerprint = layout_fingerprint
        self.tp_rank = tp_rank
        self.tp_world_size = tp_world_size
        self.worker_name = worker_name or f"pid{os.getpid()}"
        self.timeout_s = timeout_s
        self._kv = KvMemory()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._pending: dict[int, PendingOp] = {}
        self._lookups: set[concurrent.futures.Future[LookupResult]] = set()
        self._inbox = Inbox()  # work handed from callers to the loop thread
        self._broken: asyncio.Event | None = None  # set when a call finds the daemon gone: ends the session
        self._finished = Finished(self._lock)  # completions handed from the loop thread to callers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed = False
        self._stub: kvd_pb2_grpc.KvdStub | None = None
        self._session = messages.SessionRef()
        self.boot_id = ""
        self.block_bytes = 0
        self._columnar = False
        self.registrations = 0  # how many times this client registered (re-registration after restarts counts)
        self.index = LocalIndex(timeout_s)  # the daemon's published index, once mapped
        # Saves and loads go through the session's ring when it has one (kvd_client.submission), else by RPC.
        self.submissions = Submissions(lambda op: self._inbox.post(lambda: self._submit(op)), submission_ring)
        # Successful ones come back through the session's completion queue when it has one (kvd_client.delivery).
        self.delivery = Delivery(self._pending, self._finished, completion_queue)

    # -- set-up ----------------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: Mapping[str, Any], *, block_dim: int, block_size_tokens: int = 0) -> None:
        """Describe the worker's KV tensors: CPU ones for the CPU transport, CUDA ones by IPC handle or descriptor.
        Called after start() (a wake-up from sleep), it registers the new memory in a new session."""
        self._kv.describe(kv_caches, block_dim=block_dim, block_size_tokens=block_size_tokens)
        if self.layout_fingerprint is None and self._kv.layout is not None:
            self.layout_fingerprint = self._kv.layout.fingerprint()
        if self._thread is not None:
            self._renew_session(wait=False)

    def release_memory(self) -> None:
        """Have the daemon drop every mapping of the KV memory now (before vLLM's sleep mode frees it), waiting at
        most `timeout_s`. Lookups keep working until `register_kv_caches` hands it memory again."""
        fds = self._kv.release()
        if self._thread is not None:
            self._renew_session(wait=True)
        close_fds(fds)  # after the daemon let go: the last references that keep the memory from being freed

    def start(self) -> None:
        """Start the background thread; returns at once. Registration happens there, with retries."""
        if self.layout_fingerprint is None:
            raise InvalidArgument("a lookup-only client needs layout_fingerprint (or call register_kv_caches first)")
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        self._loop = loop
        self.index.configure(self.socket_path, self.model_id, self.layout_fingerprint, self.tp_world_size)
        self._inbox.open()
        self._thread = threading.Thread(target=self._thread_main, name="kvd-client", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until registered (for tests and tools; the serving path never calls this)."""
        return self._ready.wait(timeout_s)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def session_id(self) -> str:
        return self._session.id

    # -- operations (called from the model / scheduler thread; none of them blocks) -------------------------------

    def lookup(self, block_hashes: Sequence[bytes]) -> concurrent.futures.Future[LookupResult]:
        """The longest stored prefix of `block_hashes`; the future fails with Unavailable when the daemon is not
        reachable now. With the daemon's index mapped it is answered at once (local tiers only)."""
        loop = self._loop
        if not self.ready or loop is None or self._closed:
            failed: concurrent.futures.Future[LookupResult] = concurrent.futures.Future()
            failed.set_exception(Unavailable("kvd is not connected"))
            return failed
        if (local := self.index.lookup(block_hashes)) is not None:
            return Resolved(local)  # from the mapped index, in this thread: no round trip
        future: concurrent.futures.Future[LookupResult] = concurrent.futures.Future()
        with self._lock:
            self._lookups.add(future)
        future.add_done_callback(self._lookups.discard)
        hashes = list(block_hashes)
        self._inbox.post(lambda: self._start_lookup(future, hashes))
        return future

    def save(self, blocks: Sequence[tuple[int, bytes]], *, ready_event: bytes = b"") -> int:
        """Save (block index, block hash) pairs. For a CUDA cache the ready event is recorded here, on the caller's
        current stream, unless one is given: the daemon copies only after the work queued before it."""
        call_ns = time.monotonic_ns()  # the operation's first stage (Completion.stages)
        return self._enqueue(OpKind.SAVE, blocks, self._kv.ready_event(blocks, ready_event), call_ns)

    def load(self, blocks: Sequence[tuple[int, bytes]], *, in_step: StepLoad | None = None) -> int:
        """Load (block index, block hash) pairs into the worker's cache (CUDA: after the caller's current stream).
        `in_step`: an entry of `self.index.page`, which the daemon advances layer by layer (kvd_client.progress)."""
        call_ns = time.monotonic_ns()
        return self._enqueue(OpKind.LOAD, blocks, self._kv.ready_event(blocks), call_ns, in_step)

    def wait_loaded(self, completion: Completion) -> None:
        """Order the caller's current stream after a finished load (a stream wait, never a stream switch). CPU
        caches: the bytes are already in place; nothing to do."""
        if completion.done_event:
            from kvd_client.cuda import wait_done_event

            wait_done_event(completion.done_event)

    def poll_finished(self) -> list[Completion]:
        """Every operation finished since the last call (never blocks)."""
        self.delivery.collect()  # records already in the queue, without waiting for the loop thread
        return self._finished.take_all()

    def wait(self, op_ids: Iterable[int], timeout_s: float) -> list[Completion]:
        """Block until these operations finished or `timeout_s` passed; their completions (the others stay queued
        for poll_finished). For shutdown and preemption flushes, never the serving path."""
        return self._finished.wait(op_ids, timeout_s)

    def close(self) -> None:
        """Unregister (best effort) and stop the background thread; pending operations complete as failed."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(lambda: None)  # wake the loop so it sees _closed
            run_on_loop(loop, self._shutdown(), self.timeout_s, "shutdown")
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=self.timeout_s)
        self.submissions.detach()
        self.delivery.detach()
        self.delivery.fail_all("client closed")
        close_fds(self._kv.release())
        self._inbox.close()  # only now, long after _closed stopped new posts
        with self._lock:
            lookups = list(self._lookups)
        for future in lookups:  # the loop is gone: nothing else would ever resolve them
            if not future.done():
                future.set_exception(Unavailable("kvd client closed"))

    def __enter__(self) -> KvdClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals: caller side ----------------------------------------------------------------------------------

    def _enqueue(
        self, kind: OpKind, blocks: Sequence[tuple[int, bytes]], ready_event: bytes, call_ns: int, step: Any = None
    ) -> int:
        op_id, free = self.delivery.claim(self._ids)  # an id whose completion slot is free, now held
        op = PendingOp(op_id, kind, tuple(blocks), ready_event, call_ns, step and (step.slot, step.base))
        loop = self._loop
        if not free or not self.ready or loop is None or self._closed:
            self.delivery.release(op_id)
            self.delivery.fail(op, "kvd is not connected" if free else "every completion slot is held")
            return op.op_id
        self._pending[op.op_id] = op  # no lock: one dict store, atomic (the loop thread may hold the lock for notices)
        self.submissions.submit(op)
        return op.op_id

    def _renew_session(self, *, wait: bool) -> None:
        """End the session (the daemon unmaps its memory); the loop thread registers again with the memory now."""
        if self._loop is not None and not self._closed:
            run_on_loop(self._loop, self._end_session(), self.timeout_s if wait else None, "session renewal")

    # -- internals: background thread ----------------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = self._loop
        if loop is None:
            return
        asyncio.set_event_loop(loop)
        loop.add_reader(self._inbox.read_fd, self._inbox.drain)
        self._main_task = loop.create_task(self._main())
        try:
            loop.run_forever()
        finally:
            self._main_task.cancel()
            loop.run_until_complete(asyncio.gather(self._main_task, return_exceptions=True))
            loop.remove_reader(self._inbox.read_fd)
            loop.close()

    async def _main(self) -> None:
        delay = RETRY_MIN_S
        while not self._closed:
            channel = open_channel(self.socket_path)
            try:
                await self._register(channel)
                delay = RETRY_MIN_S
                await self._serve_session()
                reason = "kvd session ended (daemon restarted or stopped)"
            except (TimeoutError, grpc.aio.AioRpcError, KvdError, OSError) as exc:
                reason = f"kvd unavailable: {messages.describe(exc)}"
            finally:
                self.index.drop()
                self._ready.clear()
                self.submissions.detach()  # its records would reach nobody now
                self.delivery.detach()
                self._session = messages.SessionRef()
                self._stub = None
                await channel.close(grace=None)
            self.delivery.fail_all(reason)
            if self._closed:
                break
            log.debug("%s; retrying in %.1fs", reason, delay)
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)

    async def _register(self, channel: grpc.aio.Channel) -> None:
        kv, fingerprint = self._kv, self.layout_fingerprint or ""
        namespace = kvd_pb2.Namespace(model_id=self.model_id, layout_fingerprint=fingerprint, tp_rank=self.tp_rank)
        namespace.tp_world_size = self.tp_world_size

        def request(token: bytes) -> kvd_pb2.RegisterSessionRequest:
            return messages.registration_request(namespace, token, self.worker_name, os.getpid(), kv.layout, kv.message)

        ptrace = kv.message is not None and not kv.cuda
        stub, response = await register_session(channel, self.socket_path, self.timeout_s, request, ptrace, kv.fds)
        self._stub = stub
        self._session = messages.SessionRef(response.session_id, response.session_key)
        self.boot_id = response.boot_id
        self.block_bytes = response.block_bytes
        self._columnar = response.columnar_blocks  # the daemon takes a request's blocks as two columns
        self._lease_s = response.lease_ms / 1000
        if response.submission_ring and self.submissions.enabled:
            await self.submissions.open_ring(self.socket_path, self._session, self.timeout_s)
        await self.delivery.open(self.socket_path, self._session, self.timeout_s, self._daemon_gone)
        self.registrations += 1
        log.info("kvd session %s (boot %s)", session_label(response.session_id), response.boot_id)
        await self.index.attach(self._session, self.boot_id, response.tenant)

    async def _serve_session(self) -> None:
        stub = self._stub
        if stub is None:
            return
        call = stub.Watch(messages.scoped(kvd_pb2.WatchRequest, self._session))
        await asyncio.wait_for(call.initial_metadata(), timeout=self.timeout_s)  # the stream is live
        self._broken = asyncio.Event()
        self._ready.set()
        watch = asyncio.create_task(self._watch(call))
        every_s, retry = max(0.05, self._lease_s / 3), self.index.retry  # an index published since we registered
        beat = asyncio.create_task(heartbeat(stub, self._session, self.boot_id, every_s, self.timeout_s, retry))
        broken = asyncio.create_task(self._broken.wait())
        try:
            done, _ = await asyncio.wait({watch, beat, broken}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise what ended the session
        finally:
            call.cancel()
            for task in (watch, beat, broken):
                task.cancel()
            await asyncio.gather(watch, beat, broken, return_exceptions=True)

    def _connection_lost(self, error: KvdError) -> None:
        """A call that finds the daemon unreachable ends the session now: new operations fail fast from here on."""
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self._daemon_gone()

    def _daemon_gone(self) -> None:
        self._ready.clear()
        if self._broken is not None:
            self._broken.set()

    async def _watch(self, call: Any) -> None:
        async for notice in call:
            notice_ns = time.monotonic_ns()
            self.delivery.release(notice.client_tag)  # a failure or refusal: no record comes for it
            op = self._pending.pop(notice.client_tag, None)
            if op is None:
                continue
            self._finished.push(messages.completion(op, notice, notice_ns))

    def _submit(self, op: PendingOp) -> None:
        asyncio.get_running_loop().create_task(self._send(op))

    def _start_lookup(self, future: concurrent.futures.Future[LookupResult], hashes: list[bytes]) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller cancelled it
        task = asyncio.get_running_loop().create_task(self._lookup(hashes))
        settle_when_done(future, task, lambda: Unavailable("kvd lookup cancelled (connection closing)"))

    async def _send(self, op: PendingOp) -> None:
        op.loop_ns = time.monotonic_ns()
        stub = self._stub
        if stub is None:
            self.delivery.fail_pending(op.op_id, "kvd is not connected")
            return
        request = messages.transfer_request(self._session, op, self._columnar)
        method = stub.Save if op.kind is OpKind.SAVE else stub.Load
        try:
            op.send_ns = time.monotonic_ns()
            await method(request, timeout=self.timeout_s)
            op.accepted_ns = time.monotonic_ns()  # after the notice, if that came first: then not in its stages
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            self._connection_lost(error)
            self.delivery.rpc_failed(op.op_id, error.code)
            self.delivery.fail_pending(op.op_id, f"{type(error).__name__}: {error.message}")

    async def _lookup(self, hashes: list[bytes]) -> LookupResult:
        try:
            return await rpc_lookup(self._stub, self._session, hashes, self.timeout_s)
        except KvdError as error:
            self._connection_lost(error)
            raise

    async def _unregister(self) -> None:
        stub, session = self._stub, self._session
        if stub is not None and session.id:
            try:
                await stub.Unregister(messages.scoped(kvd_pb2.UnregisterRequest, session), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                log.debug("unregister: %s", exc.details())

    async def _end_session(self) -> None:
        self._ready.clear()
        await self._unregister()
        if self._broken is not None:
            self._broken.set()

    async def _shutdown(self) -> None:
        await self._unregister()
        if hasattr(self, "_main_task"):
            self._main_task.cancel()
