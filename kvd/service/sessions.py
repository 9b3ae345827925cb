"""Sessions: one per registered worker, with a lease. A session that stops heart-beating, or whose process exits,
is closed: its in-flight operations finish first, then its attachment (every mapping of the worker's memory) goes.

A session is a capability of its owner only: every call names it by id and key, the key compared in constant time
(a wrong or missing key is PERMISSION_DENIED and changes nothing, not even the lease). The id is not secret; the
key never leaves the RegisterSession answer. Stats and the log name a session by its label (a digest of the id).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from kvd_client.types import session_label

from kvd.errors import PermissionDenied, SessionNotFound
from kvd.memory.completions import CompletionWriter
from kvd.memory.progress import ProgressWriter
from kvd.service.checks import namespace_key
from kvd.transports.base import Attachment
from kvd.types import Notice, PeerIdentity, Registration, SessionRef, SessionSnapshot

log = logging.getLogger(__name__)

_CLOSED = object()  # ends a Watch stream


KEY_BYTES = 32
MAX_QUEUED_REFUSALS = 4096  # refusal notices a session's unread Watch stream may hold (a few hundred KB)


@dataclass(eq=False)
class Session:
    id: str
    key: bytes = field(repr=False)
    registration: Registration
    attachment: Attachment | None
    lease_s: float
    deadline: float = 0.0
    in_flight: int = 0
    saves: int = 0
    loads: int = 0
    closing: bool = False
    watching_exit: bool = False
    events: set[bytes] = field(default_factory=set)  # CUDA IPC event handles the daemon opened for this session
    ring: bool = False  # whether its worker submits through a shared-memory ring (kvd.rpc.ring)
    closers: list[Callable[[], None]] = field(default_factory=list)  # run once as the session starts closing
    _ops: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _notices: asyncio.Queue[Notice | object] = field(default_factory=asyncio.Queue)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _watchers: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set once closed (leases held on it drop)
    progress: ProgressWriter | None = None  # its in-step loads' progress page, once its process asked for it
    completions: CompletionWriter | None = None  # its completion queue, once its process asked for it

    def __post_init__(self) -> None:
        self._idle.set()
        self.renew()

    @property
    def label(self) -> str:
        return session_label(self.id)

    @property
    def namespace_key(self) -> str:
        """The namespace in the session's tenant: the only blocks it ever sees."""
        return namespace_key(self.registration.peer.tenant, self.registration.namespace)

    @property
    def transport(self) -> str:
        return self.attachment.kind.value if self.attachment is not None else "none"

    def renew(self) -> None:
        self.deadline = time.monotonic() + self.lease_s

    def begin_operation(self) -> int:
        self.in_flight += 1
        self._idle.clear()
        return next(self._ops)

    def end_operation(self, notice: Notice) -> None:
        """Deliver the operation's notice: one that went well through the completion queue where the session has
        one (nothing to say but its tag and stages), anything else on the Watch stream (its block list, its reason)."""
        queue = self.completions
        if queue is None or not notice.ok or notice.refused_status:
            self._notices.put_nowait(notice)
        else:
            if notice.stages is not None:
                notice.stages.sent_ns = time.monotonic_ns()
            if not queue.write(notice, notice.stages):
                self._notices.put_nowait(notice)
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def notify(self, notice: Notice) -> bool:
        """A notice that ends no operation (a request refused before it became one); False, and dropped, while
        MAX_QUEUED_REFUSALS notices wait for a client that does not read its Watch stream."""
        if self._notices.qsize() >= MAX_QUEUED_REFUSALS:
            return False
        self._notices.put_nowait(notice)
        return True

    def run_closers(self) -> None:
        closers, self.closers = self.closers, []
        for close in closers:
            try:
                close()
            except Exception:
                log.exception("closing a resource of session %s", self.label)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def notices(self) -> AsyncIterator[Notice]:
        """The session's completion notices, in completion order; ends when the session closes. A newer Watch on
        the same session takes over from an older one (a client that reconnected its stream)."""
        self._watchers += 1
        generation = self._watchers
        while True:
            item = await self._notices.get()
            if item is _CLOSED:
                self._notices.put_nowait(_CLOSED)  # let any other watcher end too
                return
            if generation != self._watchers:
                self._notices.put_nowait(item)  # hand it to the newer watcher, which is waiting on get()
                return
            if isinstance(item, Notice):
                yield item

    def snapshot(self) -> SessionSnapshot:
        reg = self.registration
        return SessionSnapshot(
            label=self.label,
            tenant=reg.peer.tenant,
            worker_name=reg.worker_name,
            namespace=reg.namespace,
            pid=reg.peer.pid,
            transport=self.transport,
            saves=self.saves,
            loads=self.loads,
            in_flight=self.in_flight,
        )

    def end_notices(self) -> None:
        """The session is closed: its Watch stream ends, and so do leases held on it (kvd.rpc.shared)."""
        self._notices.put_nowait(_CLOSED)
        self.ended.set()
        if self.progress is not None:
            self.progress.close()  # the worker's mapping stays valid; nothing writes it any more
        if self.completions is not None:
            self.completions.close()  # its wake pipe reads EOF: the worker's loop learns at once


class SessionTable:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._by_uid: collections.Counter[int] = collections.Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def new(self, registration: Registration, attachment: Attachment | None, lease_s: float) -> Session:
        """A session with a fresh id and key, added to the table."""
        session = Session(secrets.token_hex(16), secrets.token_bytes(KEY_BYTES), registration, attachment, lease_s)
        self._sessions[session.id] = session
        self._by_uid[registration.peer.uid] += 1
        return session

    def get(self, ref: SessionRef) -> Session:
        """The live session, its lease renewed; SessionNotFound if unknown, expired or closing, PermissionDenied
        (and nothing renewed) if the key is not the session's."""
        session = self._sessions.get(ref.id)
        if session is None or session.closing:
            raise SessionNotFound(f"no session {ref.id[:12]!r} (expired, unregistered, or the daemon restarted)")
        if not hmac.compare_digest(ref.key, session.key):
            raise PermissionDenied(
                f"wrong or missing session key for session {session.label}: only its owner, with the key"
                " RegisterSession returned, may use it"
            )
        session.renew()
        return session

    def of_uid(self, uid: int) -> int:
        """How many live sessions peers of `uid` hold."""
        return self._by_uid[uid]

    def remove(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is not None:
            uid = session.registration.peer.uid
            self._by_uid[uid] -= 1
            if self._by_uid[uid] <= 0:
                del self._by_uid[uid]

    def expired(self, now: float) -> list[Session]:
        return [s for s in self._sessions.values() if not s.closing and s.deadline < now]

    def find(self, peer: PeerIdentity, namespace_key: str, with_memory: bool) -> Session | None:
        """A live session of the same process (both verified, both alive: the same pid is the same process),
        namespace (in its tenant) and kind. A process the daemon cannot see (pid 0) matches nothing."""
        if peer.pid <= 0:
            return None
        for session in self._sessions.values():
            reg = session.registration
            if (
                not session.closing
                and reg.peer.pid == peer.pid
                and session.namespace_key == namespace_key
                and (reg.memory is not None) == with_memory
            ):
                return session
        return None


def watch_exit(session: Session, exited: Callable[[], None]) -> None:
    """Call `exited` (once, on the event loop) when the session's worker process exits: its pidfd turns readable."""
    fd = session.registration.peer.process.pidfd
    if fd is None:
        return
    session.watching_exit = True
    loop = asyncio.get_running_loop()

    def readable() -> None:
        loop.remove_reader(fd)
        exited()

    loop.add_reader(fd, readable)
