"""Lookups: from the daemon's published index in the caller's thread when it is mapped, else over RPC.

`LocalIndex` holds the session's mapping (kvd_client.index) and its lease (a kvd_client.fdpass grant). The loop thread
attaches it after each registration and drops it when the session ends, the lease hangs up (the daemon died) or the
index is retired; the caller's thread only reads the current reader reference, so a probe never waits for the loop
thread. A mapping is only used while its header's boot id is the registered daemon's: a stale mapping never answers
for a new daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from kvd_client import messages
from kvd_client.credentials import fetch_grant
from kvd_client.errors import KvdError, Unavailable, from_rpc_error
from kvd_client.fdpass import GRANT_INDEX, GRANT_PROGRESS, GRANT_SHARED, GRANT_WAKE, Grant, GrantRefused
from kvd_client.index import (
    DAEMON_REMOTE_TIER,
    W_DAEMON_FLAGS,
    W_MAX_LOOKUP,
    IndexReader,
    IndexUnavailable,
    group_key,
    label_of,
)
from kvd_client.messages import SessionRef
from kvd_client.progress import ProgressPage
from kvd_client.types import LookupResult, Tier
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

log = logging.getLogger(__name__)

RETRY_S = 1.0  # a session without an index (no memory session in its group yet) asks again this often


class LocalIndex:
    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._socket_path = Path()
        self._group: tuple[str, str, int] = ("", "", 1)  # model id, layout fingerprint, TP world size
        self.tenant = ""  # the session's tenant, from its registration
        self._session: SessionRef | None = None
        self._boot_id = ""
        self._reader: IndexReader | None = None
        self.page: ProgressPage | None = None  # the session's progress page (in-step loads), with KV memory only
        self._grant: Grant | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_try = 0.0
        self.enabled = True  # False: every lookup goes to the RPC (benchmarks compare the two)
        self.answered = 0  # lookups answered from the index
        self.fell_back = 0  # lookups that went to the RPC instead

    @property
    def mapped(self) -> bool:
        return self._reader is not None

    @property
    def reader(self) -> IndexReader | None:
        """The mapped index (tools and benchmarks probe it directly)."""
        return self._reader

    @property
    def boot_id(self) -> str:
        """The boot id of the daemon whose index is mapped ("" when none is)."""
        reader = self._reader
        return reader.boot_id if reader is not None else ""

    @property
    def remote_tier(self) -> bool:
        """Whether the daemon has a remote tier that may hold blocks the index does not show."""
        reader = self._reader
        try:
            return reader is not None and bool(reader.counter(W_DAEMON_FLAGS) & DAEMON_REMOTE_TIER)
        except IndexUnavailable:
            return False

    # -- the caller's thread -------------------------------------------------------------------------------------

    def lookup(self, block_hashes: Sequence[bytes]) -> LookupResult | None:
        """KvdClient.lookup's answer from the index, or None for the RPC: not mapped, a batch only the daemon may
        judge, or a partial local hit while a remote tier may hold the rest."""
        result = self.probe(block_hashes)
        if result is not None and result.hit_blocks < len(block_hashes) and self.remote_tier:
            result = None
        if result is None:
            self.fell_back += 1
        else:
            self.answered += 1
        return result

    def probe(self, block_hashes: Sequence[bytes]) -> LookupResult | None:
        """The local tiers' answer (host pool, write-down queue, disk), or None when the index cannot give one."""
        reader = self._reader
        if reader is None or not block_hashes or not self.enabled:
            return None
        try:
            if len(block_hashes) > reader.counter(W_MAX_LOOKUP):
                return None  # the RPC answers RESOURCE_EXHAUSTED, as it always did
            hit, host = reader.probe_tiers(block_hashes)
        except (IndexUnavailable, ValueError):  # retired meanwhile; or a hash of a length the daemon refuses
            return None
        return local_result(hit, host)

    # -- the loop thread -----------------------------------------------------------------------------------------

    def fetch(self) -> Grant:
        """A fresh grant of this session's shared memory (tools and benchmarks map it again themselves)."""
        if self._session is None:
            raise GrantRefused("no session")
        return fetch_grant(self._socket_path, self._session.id, self._session.key, GRANT_SHARED, self.timeout_s)

    def configure(self, socket_path: Path, model_id: str, layout_fingerprint: str, tp_world_size: int) -> None:
        """The daemon to ask, and the namespace group (kvd_client.index.group_key, with `tenant`) whose index to
        accept."""
        self._socket_path, self._group = socket_path, (model_id, layout_fingerprint, tp_world_size)

    async def retry(self) -> None:
        """Attach again if no index is mapped (none was published yet when we registered) and it is time to ask."""
        if self._reader is None and self._session is not None and time.monotonic() - self._last_try >= RETRY_S:
            await self.attach(self._session, self._boot_id, self.tenant)

    async def attach(self, session: SessionRef, boot_id: str, tenant: str) -> None:
        """Map the session's index if the daemon publishes one (never raises: without it lookups use the RPC)."""
        self.drop()
        self._session, self._boot_id, self.tenant = session, boot_id, tenant
        self._last_try = time.monotonic()
        loop = asyncio.get_running_loop()
        group = group_key(self.tenant, *self._group)
        ask = functools.partial(fetch_grant, self._socket_path, session.id, session.key, GRANT_SHARED, self.timeout_s)
        try:
            grant = await loop.run_in_executor(None, ask)
        except (OSError, KvdError) as exc:  # GrantRefused is an OSError
            log.debug("kvd: no shared index (%s); lookups go over RPC", exc)
            return
        self.page = _map_page(grant)
        reader = _map_index(grant, boot_id, group)
        if reader is None and self.page is None:
            grant.close()
            return
        self._grant, self._reader, self._loop = grant, reader, loop
        if grant.lease is not None:
            loop.add_reader(grant.lease.fileno(), self._lease_event)

    def drop(self) -> None:
        """Stop answering from the mapping (the session ended). The mapping goes once no probe uses it. The progress
        page is marked gone (waits on it end; the worker releases its in-step loads) and dropped."""
        self._reader, self._session = None, None
        page, self.page = self.page, None
        if page is not None:
            page.daemon_gone = True
        grant, self._grant = self._grant, None
        if grant is not None and grant.lease is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(grant.lease.fileno())
        if grant is not None:
            grant.close()

    def _lease_event(self) -> None:
        grant = self._grant
        if grant is None or grant.lease is None:
            return
        try:
            data = grant.lease.recv(1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the daemon died or dropped the session: its index must not answer any more
            self.drop()


def _map_index(grant: Grant, boot_id: str, group: str) -> IndexReader | None:
    fd = grant.take(GRANT_INDEX)
    if fd < 0:
        return None
    try:
        reader = IndexReader(fd)
    except (OSError, ValueError) as exc:
        log.warning("kvd: cannot map the shared index: %s", exc)
        return None
    finally:
        os.close(fd)
    if reader.boot_id != boot_id[:16] or reader.header.label != label_of(group):
        log.warning("kvd: the shared index is not this session's (boot %s, group %r)", reader.boot_id, group)
        return None
    return reader


def _map_page(grant: Grant) -> ProgressPage | None:
    fd, wake = grant.take(GRANT_PROGRESS), grant.take(GRANT_WAKE)
    if fd < 0 or wake < 0 or grant.lease is None:
        for f in (fd, wake):
            if f >= 0:
                os.close(f)
        return None
    try:
        return ProgressPage(fd, wake_fd=wake, lease_fd=os.dup(grant.lease.fileno()))
    except (OSError, ValueError) as exc:
        log.warning("kvd: cannot map the progress page: %s", exc)
        os.close(wake)
        return None
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=256)
def local_result(hit: int, host: int) -> LookupResult:
    """An index answer (immutable, so shared): building its tiers tuple costs about a microsecond per lookup."""
    return LookupResult(hit, (Tier.HOST_MEMORY,) * host + (Tier.DISK,) * (hit - host))


class Resolved(concurrent.futures.Future[LookupResult]):
    """An already-finished future: an index lookup answers in the caller's thread, and a plain Future builds a
    Condition (about 1.75 us) that nothing would ever wait on. The Condition, and the lists that
    concurrent.futures.wait() and as_completed() use, are made only if one of those asks for them."""

    _state = "FINISHED"  # concurrent.futures' own state name: wait(), as_completed() and repr() read it
    _exception = None

    def __init__(self, result: LookupResult) -> None:  # no super().__init__(): it builds the Condition
        self._result = result  # what Future's own methods read
        self._answer = result  # the same, typed as never None

    @functools.cached_property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        return threading.Condition()

    @functools.cached_property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        return []

    @functools.cached_property
    def _done_callbacks(self) -> list[Any]:
        return []

    def result(self, timeout: float | None = None) -> LookupResult:
        return self._answer

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return None

    def done(self) -> bool:
        return True

    def running(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[LookupResult]], object]) -> None:
        try:  # done already: called at once, and an exception is logged, not raised (as Future does)
            fn(self)
        except Exception:
            log.exception("exception calling callback for %r", self)


async def rpc_lookup(
    stub: kvd_pb2_grpc.KvdStub | None, session: SessionRef, hashes: list[bytes], timeout_s: float
) -> LookupResult:
    """A Lookup RPC (the remote tier, or no index mapped). Raises KvdError; Unavailable when not connected."""
    if stub is None:
        raise Unavailable("kvd is not connected")
    try:
        request = messages.scoped(kvd_pb2.LookupRequest, session, block_hashes=hashes)
        response = await stub.Lookup(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    except asyncio.CancelledError:
        # The session ended and its channel closed under the call (daemon gone or restarting): the caller gets the
        # documented Unavailable, not a bare CancelledError outside the KvdError family.
        raise Unavailable("kvd connection closed during the lookup") from None
    return messages.lookup_result(response)
