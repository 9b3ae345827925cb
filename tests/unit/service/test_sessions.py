"""The session table: ids, leases, the one-session-per-process rule, and a session's notice stream."""

from __future__ import annotations

import asyncio
import time

import pytest
from kvd_client.layout import Namespace

from kvd.errors import SessionNotFound
from kvd.service.sessions import Session, SessionTable
from kvd.types import Notice, OpKind, PeerIdentity, Registration

NS = Namespace("model", "fp", 0, 1)


def session(table: SessionTable, pid: int = 10, verified: bool = True, lease_s: float = 30.0) -> Session:
    registration = Registration(NS, None, None, PeerIdentity(pid, 0, 0, verified), "w")
    made = Session(id=table.new_id(), registration=registration, attachment=None, lease_s=lease_s)
    table.add(made)
    return made


async def test_get_renews_the_lease_and_refuses_unknown_or_closing_sessions() -> None:
    table = SessionTable()
    s = session(table, lease_s=0.05)
    before = s.deadline
    time.sleep(0.01)
    assert table.get(s.id) is s and s.deadline > before
    with pytest.raises(SessionNotFound):
        table.get("0" * 32)
    s.closing = True
    with pytest.raises(SessionNotFound):
        table.get(s.id)


async def test_expired_lists_only_live_sessions_past_their_deadline() -> None:
    table = SessionTable()
    short, long = session(table, pid=1, lease_s=0.0), session(table, pid=2, lease_s=60.0)
    assert table.expired(time.monotonic() + 1) == [short]
    short.closing = True
    assert table.expired(time.monotonic() + 1) == []
    assert len(table) == 2 and set(table) == {short, long}
    table.remove(short)
    assert list(table) == [long]


async def test_an_unverified_pid_never_matches_a_verified_session() -> None:
    table = SessionTable()
    real = session(table, pid=42, verified=True)
    assert table.find(PeerIdentity(42, 0, 0, True), NS.key, with_memory=False) is real
    assert table.find(PeerIdentity(42, -1, -1, False), NS.key, with_memory=False) is None
    assert table.find(PeerIdentity(42, 0, 0, True), NS.key, with_memory=True) is None  # other kind
    assert table.find(PeerIdentity(42, 0, 0, True), "other|ns", with_memory=False) is None
    assert table.new_id() != table.new_id()


async def test_notices_arrive_in_order_and_the_stream_ends_when_the_session_closes() -> None:
    s = session(SessionTable())
    ids = [s.begin_operation() for _ in range(3)]
    assert ids == [1, 2, 3] and s.in_flight == 3
    for op in ids:
        s.end_operation(Notice(op, OpKind.SAVE, True))
    await asyncio.wait_for(s.wait_idle(), 1)
    s.end_notices()
    got = [notice.operation_id async for notice in s.notices()]
    assert got == ids and s.in_flight == 0


async def test_a_newer_watch_takes_over_from_an_older_one() -> None:
    s = session(SessionTable())
    old, new = s.notices(), s.notices()
    old_next = asyncio.ensure_future(anext(old))
    await asyncio.sleep(0)
    new_next = asyncio.ensure_future(anext(new))
    await asyncio.sleep(0)
    s.end_operation(Notice(s.begin_operation(), OpKind.LOAD, True))
    notice = await asyncio.wait_for(new_next, 1)
    assert notice.operation_id == 1
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(old_next, 1)
