"""Attacks 2 and 3 of issue #12: a session id is not a capability, and nobody registers past the uid check.

2. Stats handed out every session id, and an id alone let anyone save from, load into, watch, renew or end another
   worker's session. Now only the session's owner, holding the key RegisterSession returned, acts on it.
3. allowed_uids was only checked for peers that presented a credential token: a lookup-only or CUDA session (and
   anything over TCP) registered without one. Now every registration goes through a verified peer and the check.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import grpc
import pytest
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.conftest import DaemonFactory, WorkerFactory
from tests.helpers.daemon import Daemon
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.rpc import fingerprint
from tests.helpers.worker import WorkerProcess
from tests.security.conftest import AgentFactory
from tests.security.kit import (
    OUTSIDER,
    SessionRef,
    cuda_request,
    lookup,
    lookup_only_request,
    raw_call,
    raw_cpu_request,
    raw_watch,
    register,
    requires_root,
    scoped,
    transfer,
)

VICTIM_BLOCKS = [(i, block_hash(i, "victim")) for i in range(4)]
STOLEN = block_hash(0, "stolen")


def _victim(daemon: Daemon, worker_factory: WorkerFactory, spec: CacheSpec, model: str) -> tuple[object, str]:
    """A worker (a real KvdClient) with four blocks saved; its session id, as an attacker would learn it."""
    worker = worker_factory(daemon.socket, spec, model, name="victim")
    session_id = str(worker.wait_ready()["session_id"])
    worker.fill(VICTIM_BLOCKS)
    assert worker.save(VICTIM_BLOCKS)["ok"]
    return worker, session_id


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Daemon, WorkerProcess, str]]:
    """One daemon and one victim for the attacks below: each must leave it exactly as it was (checked by `_harm`)."""
    with Daemon() as daemon:
        worker = WorkerProcess(daemon.socket, CacheSpec(), "m-victim", name="victim")
        try:
            session_id = str(worker.wait_ready()["session_id"])
            worker.fill(VICTIM_BLOCKS)
            assert worker.save(VICTIM_BLOCKS)["ok"]
            yield daemon, worker, session_id
        finally:
            worker.close()


def _harm(worker: object, session_id: str) -> list[str]:
    """What the attacker changed for the victim: its session, its memory, blocks stored from it for the attacker, or
    its own operations (a notice that no longer reaches it)."""
    harm = []
    info = worker.request("info")  # type: ignore[attr-defined]
    if info["session_id"] != session_id or info["registrations"] != 1:
        harm.append(f"the victim lost its session ({info['registrations']} registrations)")
    if touched := worker.nonzero(exclude=[i for i, _ in VICTIM_BLOCKS] + [8]):  # type: ignore[attr-defined]
        harm.append(f"the daemon wrote into the victim's blocks {touched}")
    if worker.verify(VICTIM_BLOCKS):  # type: ignore[attr-defined]
        harm.append("the victim's saved blocks changed")
    if worker.lookup([STOLEN]).get("hit_blocks"):  # type: ignore[attr-defined]
        harm.append("the victim's block 0 was stored under the attacker's hash")
    again = [(8, block_hash(8, "victim-again"))]
    worker.fill(again)  # type: ignore[attr-defined]
    result = worker.save(again, timeout=5)  # type: ignore[attr-defined]
    if not result.get("ok"):
        harm.append(f"the victim's own save failed afterwards: {result}")
    return harm


def test_stats_hands_out_no_session_id(shared: tuple[Daemon, WorkerProcess, str]) -> None:
    daemon, _, session_id = shared
    stats = daemon.stats()
    assert len(stats.sessions) == 1
    assert session_id.encode() not in stats.SerializeToString(), "Stats shows the session id"


# What an attacker sends with nothing but the victim's session id (no key).
ATTACKS = {
    "Save": lambda ref: transfer(ref, [(0, STOLEN)]),  # read the victim's block 0 into the store, under our hash
    "Load": lambda ref: transfer(ref, [(10, VICTIM_BLOCKS[0][1])]),  # write into the victim's block 10
    "Lookup": lambda ref: lookup(ref, [h for _, h in VICTIM_BLOCKS]),
    "Heartbeat": lambda ref: scoped(kvd_pb2.HeartbeatRequest(), ref),
    "Unregister": lambda ref: scoped(kvd_pb2.UnregisterRequest(), ref),
}


@pytest.mark.parametrize("key", ["none", "wrong"])
@pytest.mark.parametrize("rpc", sorted(ATTACKS))
def test_a_session_id_alone_acts_on_nothing(shared: tuple[Daemon, WorkerProcess, str], rpc: str, key: str) -> None:
    """With the id and no key, or a wrong one of the right size: PERMISSION_DENIED, and nothing changed."""
    daemon, worker, session_id = shared
    ref = SessionRef(session_id, b"" if key == "none" else os.urandom(32))
    code, details, _ = raw_call(daemon.channel(), rpc, ATTACKS[rpc](ref))
    time.sleep(0.3)  # a Save or Load the daemon accepted would have run by now
    harm = _harm(worker, session_id)
    assert code == "PERMISSION_DENIED" and not harm, f"{rpc} with only the session id: {code} {details}; {harm}"


def test_a_session_id_alone_does_not_watch(shared: tuple[Daemon, WorkerProcess, str]) -> None:
    """A Watch took over the session's notices from its owner: the worker's operations never completed."""
    daemon, worker, session_id = shared
    code, _ = raw_watch(daemon.channel(), scoped(kvd_pb2.WatchRequest(), SessionRef(session_id)), timeout=1.0)
    harm = _harm(worker, session_id)
    assert code == "PERMISSION_DENIED" and not harm, f"Watch with only the session id: {code}; {harm}"


@requires_root
def test_a_uid_that_may_not_register_cannot_end_a_session(
    other_users_daemon: Daemon, worker_factory: WorkerFactory, agents: AgentFactory, spec: CacheSpec
) -> None:
    daemon = other_users_daemon
    worker, session_id = _victim(daemon, worker_factory, spec, "m-outsider")
    outsider = agents(OUTSIDER)
    code, details, _ = outsider.call(daemon.socket, "Unregister", scoped(kvd_pb2.UnregisterRequest(),
                                                                            SessionRef(session_id)))
    harm = _harm(worker, session_id)
    assert code == "PERMISSION_DENIED" and not harm, f"Unregister from uid {OUTSIDER}: {code} {details}; {harm}"


# -- attack 3: every registration through a verified peer and the uid check ------------------------------------


@pytest.mark.parametrize("kind", ["lookup-only", "cuda", "cpu"])
def test_registration_without_a_credential_token_is_refused(daemon: Daemon, kind: str) -> None:
    spec = CacheSpec()
    requests = {
        "lookup-only": lookup_only_request(b"", "m-notoken", fingerprint(spec)),
        "cuda": cuda_request(b"", block_bytes=8192),
        "cpu": raw_cpu_request(b"", 0x10000, 4, 4096, "m-notoken-cpu"),
    }
    code, details, _ = raw_call(daemon.channel(), "RegisterSession", requests[kind].SerializeToString())
    assert code == "PERMISSION_DENIED", f"{kind} registration without a token: {code} {details}"
    assert "credential" in details


@requires_root
@pytest.mark.parametrize("kind", ["lookup-only", "cuda"])
def test_a_uid_outside_allowed_uids_cannot_register(
    other_users_daemon: Daemon, agents: AgentFactory, kind: str
) -> None:
    daemon = other_users_daemon
    outsider = agents(OUTSIDER)
    offered = outsider.credential_bytes(daemon.socket)
    attempts = {"no token": b"", "its token": offered if len(offered) == 32 else b""}
    for how, tok in attempts.items():
        request = (lookup_only_request(tok, "m-outsider", "fp") if kind == "lookup-only"
                   else cuda_request(tok, block_bytes=8192))
        status, _ = register(outsider, daemon.socket, request)
        assert status.startswith("PERMISSION_DENIED"), f"uid {OUTSIDER}, {kind}, {how}: {status}"
    assert len(offered) != 32, "the credential socket gave a token to a uid that may not register"


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_unauthenticated_tcp_listener(daemon_factory: DaemonFactory) -> None:
    """`tcp` let anyone who could reach the port register (no peer credentials there) and look blocks up."""
    port = _free_tcp_port()
    try:
        daemon_factory(env={"KVD_TCP": f"127.0.0.1:{port}"})
    except RuntimeError:
        return  # the daemon refuses the option: fine
    request = lookup_only_request(b"", "m-tcp", fingerprint(CacheSpec())).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        code, _, _ = raw_call(channel, "RegisterSession", request, timeout=3.0)
    assert code != "OK", "an unauthenticated TCP client registered a session"
