"""Attack 5 of issue #12: work before limits.

A Lookup of millions of hashes with a bogus session id was parsed whole (seconds, hundreds of MB that stayed) before
NOT_FOUND; sessions, outstanding credential tokens and opened worker events had no bound; an undecodable request
answered UNKNOWN and logged a full traceback (a log flood). Now the gRPC receive limit is the largest valid request,
the session is resolved before per-hash work, each resource has a configured cap (RESOURCE_EXHAUSTED), and an
undecodable request answers INVALID_ARGUMENT at the cost of one rate-limited log line.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest
from kvd_client.credentials import fetch_token
from kvd_client.errors import ResourceExhausted
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.conftest import DaemonFactory
from tests.helpers.daemon import Daemon, MiB
from tests.helpers.rpc import token
from tests.security.agent import credential_reply
from tests.security.kit import SessionRef, lookup, lookup_only_request, raw_call, rss_bytes, scoped, transfer

BIG_CHANNEL = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


def _register_lookup_only(daemon: Daemon, model: str) -> tuple[str, str, SessionRef | None]:
    request = lookup_only_request(token(daemon.socket), model, "fp").SerializeToString()
    code, details, response = raw_call(daemon.channel(), "RegisterSession", request)
    return code, details, SessionRef.of(response) if code == "OK" else None


@pytest.mark.parametrize("session", ["bogus", "valid"])
def test_an_oversized_lookup_is_refused_before_it_is_parsed(daemon_factory: DaemonFactory, session: str) -> None:
    daemon = daemon_factory(env={"KVD_MAX_LOOKUP_BLOCKS": "1024"})
    ref = SessionRef("no-such-session")
    if session == "valid":
        code, details, got = _register_lookup_only(daemon, "m-big")
        assert got is not None, f"{code} {details}"
        ref = got
    request = lookup(ref, [os.urandom(32)] * 1_000_000)  # 34 MB: a thousand times the largest valid lookup
    before = rss_bytes(daemon.pid)
    with grpc.insecure_channel(f"unix:{daemon.socket}", options=BIG_CHANNEL) as channel:
        code, details, _ = raw_call(channel, "Lookup", request, timeout=60)
    grew = rss_bytes(daemon.pid) - before
    assert code == "RESOURCE_EXHAUSTED", f"{code}: {details}"
    assert grew < 16 * MiB, f"the daemon's RSS grew by {grew / MiB:.0f} MiB for a request it refused"


def test_the_largest_valid_requests_fit_the_receive_limit(daemon: Daemon) -> None:
    """The receive limit is sized from the configuration: a maximal lookup or transfer (64-byte hashes) is parsed
    and answered on its merits (here: no such session), never refused for its size."""
    stats = daemon.stats()  # the default limits: 65,536 hashes per lookup, 16,384 blocks per transfer
    assert stats.boot_id
    ref = SessionRef("no-such-session")
    with grpc.insecure_channel(f"unix:{daemon.socket}", options=BIG_CHANNEL) as channel:
        code, details, _ = raw_call(channel, "Lookup", lookup(ref, [b"\xff" * 64] * 65_536))
        assert code == "NOT_FOUND", f"Lookup: {code} {details}"
        pairs = [((1 << 32) - 1, b"\xff" * 64)] * 16_384
        for method in ("Save", "Load"):
            code, details, _ = raw_call(channel, method, transfer(ref, pairs))
            assert code == "NOT_FOUND", f"{method}: {code} {details}"


def test_sessions_per_uid_are_capped(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(env={"KVD_MAX_SESSIONS_PER_UID": "4"})
    sessions = []
    for i in range(4):
        code, details, ref = _register_lookup_only(daemon, f"m-cap{i}")
        assert ref is not None, f"session {i}: {code} {details}"
        sessions.append(ref)
    code, details, _ = _register_lookup_only(daemon, "m-cap-over")
    assert code == "RESOURCE_EXHAUSTED", f"a fifth session of the same uid: {code} {details}"
    assert "max_sessions_per_uid" in details
    assert raw_call(daemon.channel(), "Unregister", scoped(kvd_pb2.UnregisterRequest(), sessions[0]))[0] == "OK"
    code, details, _ = _register_lookup_only(daemon, "m-cap-again")
    assert code == "OK", f"a session once another one ended: {code} {details}"


def _credential_bytes(daemon: Daemon) -> bytes:
    return credential_reply(str(daemon.credential_socket))


@pytest.mark.parametrize("cap", ["KVD_MAX_TOKENS_PER_UID", "KVD_MAX_TOKENS"])
def test_outstanding_credential_tokens_are_capped(daemon_factory: DaemonFactory, cap: str) -> None:
    daemon = daemon_factory(env={cap: "4"})
    held = [_credential_bytes(daemon) for _ in range(4)]
    assert all(len(t) == 32 for t in held), held
    refused = _credential_bytes(daemon)
    assert len(refused) != 32 and b"RESOURCE_EXHAUSTED" in refused, f"a fifth outstanding token: {refused!r}"
    # Redeeming one frees its place.
    request = lookup_only_request(held[0], "m-tokens", "fp").SerializeToString()
    assert raw_call(daemon.channel(), "RegisterSession", request)[0] == "OK"
    assert len(_credential_bytes(daemon)) == 32


def test_the_client_raises_the_daemons_refusal(daemon_factory: DaemonFactory) -> None:
    """kvd_client turns a refusal on the credential socket into the same error family as an RPC status."""
    daemon = daemon_factory(env={"KVD_MAX_TOKENS_PER_UID": "1"})
    fetch_token(daemon.socket, timeout_s=5)
    with pytest.raises(ResourceExhausted, match="max_tokens_per_uid"):
        fetch_token(daemon.socket, timeout_s=5)


# Bytes no kvd.v1 request decodes from: a truncated varint, a string that is not UTF-8, a length past the end.
UNDECODABLE = [b"\xff", b"\x08", b"\x0a\x02\xff\xfe", b"\x12\x05ab"]
METHODS = ["RegisterSession", "Heartbeat", "Unregister", "Lookup", "Save", "Load", "Stats"]


def test_an_undecodable_request_is_invalid_argument_and_one_log_line(daemon: Daemon) -> None:
    log_before = daemon.log_text()
    codes = {}
    for _ in range(25):
        for method in METHODS:
            for data in UNDECODABLE:
                if method == "Stats" and data.startswith(b"\x0a"):
                    continue  # an unknown field: a valid StatsRequest
                code, _, _ = raw_call(daemon.channel(), method, data)
                codes.setdefault(code, set()).add(method)
    stream = daemon.channel().unary_stream("/kvd.v1.Kvd/Watch")
    try:
        list(stream(b"\x0a\x02\xff\xfe", timeout=5))
    except grpc.RpcError as exc:
        codes.setdefault(exc.code().name, set()).add("Watch")
    time.sleep(0.5)
    new_log = daemon.log_text()[len(log_before):]
    assert set(codes) == {"INVALID_ARGUMENT"}, f"answers to undecodable requests: {codes}"
    assert "Traceback" not in new_log, new_log[-3000:]
    assert len(new_log.splitlines()) <= 5, f"{len(new_log.splitlines())} log lines for 675 bad requests"
    assert daemon.health() == 1


def test_an_undecodable_health_check_is_invalid_argument_too(daemon: Daemon) -> None:
    """Every service on the socket, not only kvd.v1.Kvd: health and reflection go through the same guard."""
    call = daemon.channel().unary_unary("/grpc.health.v1.Health/Check")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"\x0a\x02\xff\xfe", timeout=5)  # service: a string that is not UTF-8
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in daemon.log_text()


@pytest.mark.cuda
def test_ipc_events_one_session_has_the_daemon_open_are_capped(daemon_factory: DaemonFactory) -> None:
    """A client that sends a new event handle with every save would have the daemon open events without bound;
    past max_worker_events distinct handles, a save is RESOURCE_EXHAUSTED (a handle already open stays free)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kvd_client.layout import KvLayout
    from kvd_client.messages import layout_message, worker_memory

    from tests.kvd.cuda_common import SPEC as GPU_SPEC
    from tests.kvd.cuda_common import make_gpu_caches

    daemon = daemon_factory(
        capacity_bytes=256 * MiB, slab_bytes=4 * MiB, env={"KVD_MAX_WORKER_EVENTS": "4"}
    )
    caches, _backing = make_gpu_caches(offset_elements=4096)
    memory, _is_cuda, _fds = worker_memory(list(caches.values()))  # cudaMalloc memory: no descriptors
    layout = KvLayout.from_tensors(caches, block_dim=1, block_size_tokens=GPU_SPEC.block_size)
    request = kvd_pb2.RegisterSessionRequest(
        namespace=kvd_pb2.Namespace(model_id="m-events", layout_fingerprint=layout.fingerprint(), tp_world_size=1),
        layout=layout_message(layout),
        credential_token=token(daemon.socket),
        cuda=memory,
    )
    code, details, response = raw_call(daemon.channel(), "RegisterSession", request.SerializeToString())
    assert code == "OK", details
    session = SessionRef.of(response)
    events = [torch.cuda.Event(interprocess=True) for _ in range(5)]
    handles = [bytes(e.ipc_handle()) for e in events]
    for i, handle in enumerate(handles[:4] + handles[:1]):
        message = kvd_pb2.TransferRequest.FromString(transfer(session, [(i, bytes([i + 1]) * 32)]))
        message.ready_event = handle
        code, details, _ = raw_call(daemon.channel(), "Save", message.SerializeToString())
        assert code == "OK", details
    message = kvd_pb2.TransferRequest.FromString(transfer(session, [(9, b"\x09" * 32)]))
    message.ready_event = handles[4]
    code, details, _ = raw_call(daemon.channel(), "Save", message.SerializeToString())
    assert code == "RESOURCE_EXHAUSTED" and "max_worker_events" in details, f"{code}: {details}"
