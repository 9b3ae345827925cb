"""The session table: ids and keys, leases, the one-session-per-process rule, and a session's notice stream."""

from __future__ import annotations

import asyncio
import time

import pytest
from kvd_client.layout import Namespace

from kvd.errors import PermissionDenied, SessionNotFound
from kvd.process import PeerProcess
from kvd.service.checks import namespace_key
from kvd.service.sessions import Session, SessionTable
from kvd.types import Notice, OpKind, PeerIdentity, Registration, SessionRef

NS = Namespace("model", "fp", 0, 1)


def peer(pid: int, uid: int = 0, tenant: str = "uid:0") -> PeerIdentity:
    """A verified peer as the credential socket would make it (no descriptors: nothing here touches the process)."""
    return PeerIdentity(PeerProcess(pid, uid, uid, None, None), tenant)


def session(table: SessionTable, pid: int = 10, lease_s: float = 30.0, uid: int = 0) -> Session:
    return table.new(Registration(NS, None, None, peer(pid, uid), "w"), None, lease_s)


def ref(s: Session) -> SessionRef:
    return SessionRef(s.id, s.key)


async def test_get_renews_the_lease_and_refuses_unknown_or_closing_sessions() -> None:
    table = SessionTable()
    s = session(table, lease_s=0.05)
    before = s.deadline
    time.sleep(0.01)
    assert table.get(ref(s)) is s and s.deadline > before
    with pytest.raises(SessionNotFound):
        table.get(SessionRef("0" * 32, s.key))
    s.closing = True
    with pytest.raises(SessionNotFound):
        table.get(ref(s))


async def test_only_the_key_opens_a_session_and_a_wrong_one_renews_nothing() -> None:
    table = SessionTable()
    s = session(table, lease_s=0.05)
    assert len(s.key) >= 16 and s.key != session(table, pid=11).key
    deadline = s.deadline
    time.sleep(0.01)
    for key in (b"", s.key[:-1], bytes(len(s.key)), s.key + b"x"):
        with pytest.raises(PermissionDenied):
            table.get(SessionRef(s.id, key))
    assert s.deadline == deadline
    assert s.key.hex() not in repr(s) and s.key.hex() not in repr(ref(s))
    assert s.label.startswith("s-") and s.id not in s.label


async def test_sessions_are_counted_per_uid() -> None:
    table = SessionTable()
    a, _ = session(table, pid=1, uid=1000), session(table, pid=2, uid=1000)
    session(table, pid=3, uid=1001)
    assert (table.of_uid(1000), table.of_uid(1001), table.of_uid(7)) == (2, 1, 0)
    table.remove(a)
    table.remove(a)  # twice: counted once
    assert table.of_uid(1000) == 1


async def test_expired_lists_only_live_sessions_past_their_deadline() -> None:
    table = SessionTable()
    short, long = session(table, pid=1, lease_s=0.0), session(table, pid=2, lease_s=60.0)
    assert table.expired(time.monotonic() + 1) == [short]
    short.closing = True
    assert table.expired(time.monotonic() + 1) == []
    assert len(table) == 2 and set(table) == {short, long}
    table.remove(short)
    assert list(table) == [long]


async def test_one_session_per_process_namespace_and_kind_in_its_tenant() -> None:
    table = SessionTable()
    real = session(table, pid=42)
    key = namespace_key("uid:0", NS)
    assert table.find(peer(42), key, with_memory=False) is real
    assert table.find(peer(42), key, with_memory=True) is None  # other kind
    assert table.find(peer(42), namespace_key("uid:0", Namespace("other", "fp")), with_memory=False) is None
    assert table.find(peer(42), namespace_key("uid:1000", NS), with_memory=False) is None  # other tenant
    assert table.find(peer(0), key, with_memory=False) is None  # a process the daemon cannot see matches nothing


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
