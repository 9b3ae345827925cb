"""Sessions: one per registered worker, with a lease. A session that stops heart-beating, or whose process exits,
is closed: its in-flight operations finish first, then its attachment (every mapping of the worker's memory) goes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from kvd.errors import SessionNotFound
from kvd.memory.progress import ProgressWriter
from kvd.transports.base import Attachment
from kvd.types import Notice, PeerIdentity, Registration, SessionSnapshot

log = logging.getLogger(__name__)

_CLOSED = object()  # ends a Watch stream


@dataclass(eq=False)
class Session:
    id: str
    registration: Registration
    attachment: Attachment | None
    lease_s: float
    deadline: float = 0.0
    in_flight: int = 0
    saves: int = 0
    loads: int = 0
    closing: bool = False
    pidfd: int | None = None
    _ops: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _notices: asyncio.Queue[Notice | object] = field(default_factory=asyncio.Queue)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _watchers: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set once closed (leases held on it drop)
    progress: ProgressWriter | None = None  # its in-step loads' progress page, once its process asked for it

    def __post_init__(self) -> None:
        self._idle.set()
        self.renew()

    @property
    def namespace_key(self) -> str:
        return self.registration.namespace.key

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(
            session_id=self.id,
            worker_name=self.registration.worker_name,
            namespace=self.registration.namespace,
            pid=self.registration.peer.pid,
            transport=self.transport,
            saves=self.saves,
            loads=self.loads,
            in_flight=self.in_flight,
        )

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
        self._notices.put_nowait(notice)
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

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

    def end_notices(self) -> None:
        """The session is closed: its Watch stream ends, and so do leases held on it (kvd.rpc.shared)."""
        self._notices.put_nowait(_CLOSED)
        self.ended.set()
        if self.progress is not None:
            self.progress.close()  # the worker's mapping stays valid; nothing writes it any more


class SessionTable:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def add(self, session: Session) -> None:
        self._sessions[session.id] = session

    def get(self, session_id: str) -> Session:
        """The live session, its lease renewed; SessionNotFound if unknown, expired or closing."""
        session = self._sessions.get(session_id)
        if session is None or session.closing:
            raise SessionNotFound(f"no session {session_id[:12]!r} (expired, unregistered, or the daemon restarted)")
        session.renew()
        return session

    def remove(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def expired(self, now: float) -> list[Session]:
        return [s for s in self._sessions.values() if not s.closing and s.deadline < now]

    def find(self, peer: PeerIdentity, namespace_key: str, with_memory: bool) -> Session | None:
        """A live session of the same process, namespace and kind. An unverified pid is only a claim: it never
        matches a kernel-verified one, so a claim cannot lock a real worker out."""
        for session in self._sessions.values():
            reg = session.registration
            if (
                not session.closing
                and reg.peer.pid == peer.pid
                and reg.peer.verified == peer.verified
                and reg.namespace.key == namespace_key
                and (reg.memory is not None) == with_memory
            ):
                return session
        return None


def open_pidfd(pid: int) -> int | None:
    """A pidfd for the worker, readable once it exits; None where the kernel or the pid namespace has none."""
    if pid <= 0 or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None
