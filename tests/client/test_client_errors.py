"""The client maps every gRPC status back to the same kvd_client.errors class the daemon raised (one mapping, in
kvd_client.errors, for both sides), through the raw wire and through KvdClient's own calls."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from kvd_client import KvdClient
from kvd_client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KvdError,
    PermissionDenied,
    ResourceExhausted,
    SessionNotFound,
    Unavailable,
    from_rpc_error,
    status_of,
)
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from tests.helpers.clients import Completions, end_session
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_hash, make_caches
from tests.helpers.rpc import RawSession, cpu_register_request, fingerprint, lookup_only_request, scoped, transfer

SPEC = CacheSpec()
MAX_BATCH = 16


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with Daemon(env={"KVD_MAX_BATCH_BLOCKS": str(MAX_BATCH), "KVD_MAX_LOOKUP_BLOCKS": str(MAX_BATCH)}) as d:
        yield d


@pytest.fixture
def caches() -> dict[str, torch.Tensor]:
    return make_caches(SPEC)


@pytest.fixture
def client(daemon: Daemon, caches: dict[str, torch.Tensor], request: pytest.FixtureRequest) -> Iterator[KvdClient]:
    c = KvdClient(daemon.socket, model_id=f"m-{request.node.name}", timeout_s=2.0)
    c.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=SPEC.block_size)
    with c:
        assert c.wait_ready(20)
        yield c


def raised(call: Callable[[], object]) -> KvdError:
    """The kvd error a raw-stub call maps to."""
    try:
        call()
    except grpc.RpcError as exc:
        return from_rpc_error(exc)
    pytest.fail("the call succeeded; expected an error")


# -- the raw wire, mapped -----------------------------------------------------------------------------------------


def test_not_found_is_session_not_found(daemon: Daemon) -> None:
    stub = daemon.stub()
    error = raised(lambda: stub.Lookup(kvd_pb2.LookupRequest(session_id="nope", block_hashes=[b"h"]), timeout=5))
    assert type(error) is SessionNotFound
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert "session" in error.message


def test_invalid_argument(daemon: Daemon) -> None:
    stub = daemon.stub()
    request = lookup_only_request(daemon.socket, "m-map-invalid", fingerprint(SPEC))
    request.namespace.layout_fingerprint = ""
    assert type(raised(lambda: stub.RegisterSession(request, timeout=5))) is InvalidArgument


def test_already_exists(daemon: Daemon) -> None:
    stub = daemon.stub()
    first = stub.RegisterSession(lookup_only_request(daemon.socket, "m-map-exists", fingerprint(SPEC)), timeout=5)
    try:
        again = lookup_only_request(daemon.socket, "m-map-exists", fingerprint(SPEC))  # the same process, again
        assert type(raised(lambda: stub.RegisterSession(again, timeout=5))) is AlreadyExists
    finally:
        stub.Unregister(scoped(kvd_pb2.UnregisterRequest, first), timeout=5)


def test_permission_denied(daemon: Daemon, caches: dict[str, torch.Tensor]) -> None:
    stub = daemon.stub()
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-map-perm", with_token=False)
    assert type(raised(lambda: stub.RegisterSession(request, timeout=5))) is PermissionDenied


def test_resource_exhausted(daemon: Daemon, caches: dict[str, torch.Tensor]) -> None:
    stub = daemon.stub()
    with RawSession(stub, stub.RegisterSession(cpu_register_request(daemon.socket, SPEC, caches, "m-map-re"))) as s:
        pairs = [(i, block_hash(i, "re")) for i in range(MAX_BATCH + 1)]
        assert type(raised(lambda: stub.Save(transfer(s.response, pairs), timeout=5))) is ResourceExhausted


def test_failed_precondition(daemon: Daemon) -> None:
    stub = daemon.stub()
    response = stub.RegisterSession(lookup_only_request(daemon.socket, "m-map-fp", fingerprint(SPEC)), timeout=5)
    try:
        error = raised(lambda: stub.Save(transfer(response, [(0, b"h")]), timeout=5))
        assert type(error) is FailedPrecondition
    finally:
        stub.Unregister(scoped(kvd_pb2.UnregisterRequest, response), timeout=5)


def test_unavailable_when_nothing_listens(tmp_path: object) -> None:
    with grpc.insecure_channel(f"unix:{os.path.join(str(tmp_path), 'none.sock')}") as channel:
        stub = kvd_pb2_grpc.KvdStub(channel)
        assert type(raised(lambda: stub.Stats(kvd_pb2.StatsRequest(), timeout=1))) is Unavailable


@pytest.mark.parametrize(
    "cls", [InvalidArgument, SessionNotFound, AlreadyExists, PermissionDenied, ResourceExhausted, FailedPrecondition]
)
def test_status_of_and_from_rpc_error_agree(daemon: Daemon, cls: type[KvdError]) -> None:
    """Each class travels as its own code, and that code comes back as the same class."""
    code, message = status_of(cls("why"))
    assert code == cls.code and message == "why"

    class FakeRpcError(grpc.RpcError):  # the shape of an AioRpcError / _InactiveRpcError
        def code(self) -> grpc.StatusCode:
            return code

        def details(self) -> str:
            return message

    back = from_rpc_error(FakeRpcError())
    assert type(back) is cls and back.message == "why"


# -- through KvdClient --------------------------------------------------------------------------------------------


def test_client_lookup_of_a_bad_hash_is_invalid_argument(client: KvdClient) -> None:
    with pytest.raises(InvalidArgument, match="64"):
        client.lookup([b"x" * 65]).result(timeout=5)
    with pytest.raises(InvalidArgument, match="empty"):
        client.lookup([]).result(timeout=5)
    assert client.lookup([b"ok"]).result(timeout=5).hit_blocks == 0  # the session is fine afterwards


def test_client_oversized_lookup_is_resource_exhausted(client: KvdClient) -> None:
    with pytest.raises(ResourceExhausted):
        client.lookup([block_hash(i) for i in range(MAX_BATCH + 1)]).result(timeout=5)


def test_client_lookup_after_session_loss_is_session_not_found(daemon: Daemon, client: KvdClient) -> None:
    # The client's own channel has to see the NOT_FOUND, so stop its re-registration from racing us: ask for the
    # lookup on the old session id by closing the session and looking up before the client notices.
    session_id = end_session(daemon, client)
    errors: list[BaseException] = []
    for _ in range(50):
        if client.session_id != session_id:
            break  # re-registered already: the race is lost, which is fine too
        try:
            client.lookup([b"h"]).result(timeout=5)
        except (SessionNotFound, Unavailable) as exc:
            errors.append(exc)
            break
    # Whatever the timing, the client recovers with a new session.
    wait_for(lambda: client.ready and client.session_id not in ("", session_id), timeout=20, what="re-registration")
    assert all(isinstance(e, SessionNotFound | Unavailable) for e in errors)
    assert client.lookup([b"h"]).result(timeout=5).hit_blocks == 0


def test_lookups_racing_session_loss_fail_only_with_kvd_errors(daemon: Daemon, client: KvdClient) -> None:
    """Lookups in flight when the session ends (its channel closes under them) fail as KvdError (Unavailable or
    SessionNotFound), never with a bare CancelledError the caller does not expect."""
    futures = []
    for _ in range(5):
        old = client.session_id
        futures += [client.lookup([b"h"]) for _ in range(50)]
        end_session(daemon, client)
        futures += [client.lookup([b"h"]) for _ in range(50)]
        wait_for(lambda old=old: client.ready and client.session_id not in ("", old), timeout=20, what="re-register")
    for future in futures:
        exc = future.exception(timeout=10)
        assert exc is None or isinstance(exc, KvdError), repr(exc)


def test_client_save_with_bad_block_index_fails_that_operation_only(client: KvdClient) -> None:
    done = Completions(client)
    bad = [(SPEC.num_blocks, block_hash(0, "bad-index"))]
    completion = done.wait(client.save(bad))
    assert not completion.ok
    assert completion.failed_hashes == frozenset(h for _, h in bad)
    assert "InvalidArgument" in completion.error and "out of range" in completion.error
    good = [(0, block_hash(0, "good-index"))]
    assert done.wait(client.save(good)).ok
    assert client.ready


def test_client_oversized_save_fails_with_resource_exhausted(client: KvdClient) -> None:
    done = Completions(client)
    pairs = [(i, block_hash(i, "too-many")) for i in range(MAX_BATCH + 1)]
    completion = done.wait(client.save(pairs))
    assert not completion.ok
    assert completion.failed_hashes == frozenset(h for _, h in pairs)
    assert "ResourceExhausted" in completion.error


def test_client_registration_refused_is_retried_not_raised(daemon: Daemon) -> None:
    """A client whose registration the daemon refuses (here: its layout conflicts with the namespace's) never
    raises into the caller; it stays not-ready and its operations fail at once."""
    first = make_caches(SPEC)
    ok = KvdClient(daemon.socket, model_id="m-conflict", timeout_s=2.0)
    ok.register_kv_caches(first, block_dim=BLOCK_DIM, block_size_tokens=SPEC.block_size)
    other_spec = CacheSpec(kv_heads=4)
    bad = KvdClient(daemon.socket, model_id="m-conflict", layout_fingerprint=fingerprint(SPEC), timeout_s=2.0)
    bad.register_kv_caches(make_caches(other_spec), block_dim=BLOCK_DIM, block_size_tokens=SPEC.block_size)
    with ok:
        assert ok.wait_ready(20)
        bad.start()  # same process and namespace as `ok`, and another layout: refused either way
        assert not bad.wait_ready(1.0)
        assert bad.registrations == 0
        done = Completions(bad)
        assert not done.wait(bad.save([(0, b"h")]), timeout=0.05).ok
        with pytest.raises(Unavailable):
            bad.lookup([b"h"]).result(timeout=0)
        bad.close()
