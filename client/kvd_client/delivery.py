"""How finished operations reach the client: through the session's completion queue (kvd_client.completions) when
the daemon granted one, else (and always for failures and refusals, with their block lists) on the Watch stream.

The queue is asked for once per session, right after RegisterSession, on the loop thread; it goes when the session
ends, before its operations are failed. The loop thread takes records when the wake pipe turns readable; a caller
of poll_finished() takes them too, on its own thread, so a record can be delivered without waiting for the loop.
Whoever pops an operation from the pending table delivers its completion: never twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from kvd_client import ring as ring_format
from kvd_client.completions import CompletionReader
from kvd_client.credentials import take_grant
from kvd_client.fdpass import GRANT_COMPLETION_WAKE, GRANT_COMPLETIONS, GRANT_QUEUE
from kvd_client.handoff import Finished
from kvd_client.messages import PendingOp, SessionRef, completion_of_record
from kvd_client.types import Completion

log = logging.getLogger(__name__)

# A Save/Load RPC that failed with one of these may still have become an operation: its slot stays held (a record
# may still come) until the session ends.
_MAYBE_ACCEPTED = (
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
)


class Delivery:
    def __init__(self, pending: dict[int, PendingOp], finished: Finished, enabled: bool = True) -> None:
        self._pending = pending
        self._finished = finished
        self._reader: CompletionReader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.enabled = enabled  # False: every notice on the Watch stream (benchmarks compare both)
        self.queues = 0  # completion queues this client was granted (one per session that got one)

    @property
    def has_queue(self) -> bool:
        return self._reader is not None

    @property
    def taken(self) -> int:
        """Completions taken from queues of this client's current session."""
        reader = self._reader
        return reader.taken if reader is not None else 0

    def claim(self, ids: Iterator[int]) -> tuple[int, bool]:
        """The id for a new operation, whose completion slot is free now held (the caller's thread); False: every
        slot is held (the op must fail: the daemon would overwrite a record nobody took yet)."""
        reader = self._reader
        op_id = next(ids)
        if reader is None:
            return op_id, True
        for _ in range(reader.slots):
            if reader.claim(op_id):
                return op_id, True
            op_id = next(ids)
        return op_id, False

    def release(self, tag: int) -> None:
        """The operation ended without a queue record (its notice came on the Watch stream, or it never went)."""
        reader = self._reader
        if reader is not None:
            reader.release(tag)

    def rpc_failed(self, tag: int, code: grpc.StatusCode) -> None:
        if code not in _MAYBE_ACCEPTED:
            self.release(tag)

    def collect(self) -> None:
        """Deliver every record that has arrived (either thread)."""
        reader = self._reader
        if reader is None:
            return
        records = reader.collect()
        if not records:
            return
        now = time.monotonic_ns()
        for record in records:
            op = self._pending.pop(record.tag, None)
            if op is not None:
                self._finished.push(completion_of_record(op, record, now))

    def fail(self, op: PendingOp, error: str) -> None:
        self._finished.push(Completion(op.op_id, op.kind, False, frozenset(h for _, h in op.blocks), error=error))

    def fail_pending(self, op_id: int, error: str) -> None:
        op = self._pending.pop(op_id, None)
        if op is not None:
            self.fail(op, error)

    def fail_all(self, error: str) -> None:
        """Every operation still pending fails (the session ended: the queue is gone first)."""
        ops = []
        while self._pending:  # one atomic pop at a time: an operation added meanwhile is never lost
            try:
                ops.append(self._pending.popitem()[1])
            except KeyError:
                break
        for op in ops:
            self.fail(op, error)

    async def open(self, socket_path: Path, session: SessionRef, timeout_s: float, gone: Callable[[], None]) -> None:
        """Ask for the session's queue (loop thread, after registering); `gone` is called when its wake pipe reads
        EOF (the daemon died or dropped the session). Any failure leaves notices on the Watch stream, logged."""
        self.detach()
        if not self.enabled or not ring_format.supported():
            return
        loop = asyncio.get_running_loop()
        reader = await take_grant(
            socket_path, session.id, session.key, GRANT_QUEUE, timeout_s,
            lambda grant: CompletionReader(grant.take(GRANT_COMPLETIONS), grant.take(GRANT_COMPLETION_WAKE)),
            "completion queue", "completions come on the Watch stream",
        )  # fmt: skip
        if reader is None:
            return

        def woken() -> None:
            alive = reader.drain_wake()
            self.collect()  # what arrived before an EOF is delivered, not failed
            if not alive:
                loop.remove_reader(reader.wake_fd)
                gone()

        loop.add_reader(reader.wake_fd, woken)
        self._reader, self._loop = reader, loop
        self.queues += 1

    def detach(self) -> None:
        """Drop the queue (the session ended), on the loop thread or once the loop has stopped."""
        reader, loop, self._reader, self._loop = self._reader, self._loop, None, None
        if reader is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(reader.wake_fd)
        reader.close()
