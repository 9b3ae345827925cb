"""Every bad input gets a clear gRPC status, and the daemon keeps serving: after each test, a lookup still works and
the blocks stored at the start of the module still hit (checked by the autouse `still_serving` fixture).

All tests share one daemon on purpose: surviving every one of them in a row is part of what is tested.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import grpc
import pytest
import torch
from kvd_client.types import session_label
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from tests.helpers.daemon import Daemon, child_env, reap, track
from tests.helpers.kvdata import CacheSpec, block_hash, fill, make_caches
from tests.helpers.rpc import (
    RawSession,
    cpu_memory_pb,
    cpu_register_request,
    fingerprint,
    layout_pb,
    lookup_hits,
    lookup_only_request,
    namespace_pb,
    scoped,
    token,
    transfer,
)

MAX_BATCH = 32
MAX_LOOKUP = 64
SPEC = CacheSpec()
CANARY_MODEL = "m-canary"
CANARIES = [(i, block_hash(i, "canary")) for i in range(8)]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    env = {"KVD_MAX_BATCH_BLOCKS": str(MAX_BATCH), "KVD_MAX_LOOKUP_BLOCKS": str(MAX_LOOKUP)}
    with Daemon(env=env) as d:
        # Blocks every test must leave intact.
        caches = make_caches(SPEC)
        fill(caches, SPEC, CANARIES)
        stub = d.stub()
        with RawSession(stub, stub.RegisterSession(cpu_register_request(d.socket, SPEC, caches, CANARY_MODEL))) as s:
            notice = s.save(CANARIES)
            assert notice.ok, notice.error
        yield d


@pytest.fixture
def stub(daemon: Daemon) -> kvd_pb2_grpc.KvdStub:
    return daemon.stub()


@pytest.fixture(autouse=True)
def still_serving(daemon: Daemon) -> Iterator[None]:
    yield
    assert daemon.running, daemon.log_text()
    stub = daemon.stub()
    assert lookup_hits(stub, daemon.socket, CANARY_MODEL, fingerprint(SPEC), [h for _, h in CANARIES]) == len(CANARIES)
    assert daemon.health() == 1  # SERVING


@pytest.fixture
def caches() -> dict[str, torch.Tensor]:
    return make_caches(SPEC)


@pytest.fixture
def session(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor], request: pytest.FixtureRequest
) -> Iterator[RawSession]:
    """A CPU session of this process, in a namespace of its own (so ALREADY_EXISTS never leaks between tests)."""
    response = stub.RegisterSession(cpu_register_request(daemon.socket, SPEC, caches, f"m-{request.node.name}"))
    with RawSession(stub, response) as s:
        yield s


def code_of(call: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    """The status a raw call fails with (pytest.fail if it succeeds)."""
    try:
        call(*args, timeout=5, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    pytest.fail(f"{call} succeeded; expected an error")


# -- sessions ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", ["Lookup", "Save", "Load", "Heartbeat", "Unregister"])
def test_unknown_session_is_not_found(stub: kvd_pb2_grpc.KvdStub, rpc: str) -> None:
    requests = {
        "Lookup": kvd_pb2.LookupRequest(session_id="no-such-session", block_hashes=[b"h"]),
        "Save": transfer("no-such-session", [(0, b"h")]),
        "Load": transfer("no-such-session", [(0, b"h")]),
        "Heartbeat": kvd_pb2.HeartbeatRequest(session_id="no-such-session"),
        "Unregister": kvd_pb2.UnregisterRequest(session_id="no-such-session"),
    }
    code, details = code_of(getattr(stub, rpc), requests[rpc])
    assert code == grpc.StatusCode.NOT_FOUND
    assert "session" in details


def test_unknown_session_watch_is_not_found(stub: kvd_pb2_grpc.KvdStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        next(iter(stub.Watch(kvd_pb2.WatchRequest(session_id="no-such-session"), timeout=5)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_expired_session_is_not_found(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub) -> None:
    from tests.helpers.daemon import wait_for

    response = stub.RegisterSession(lookup_only_request(daemon.socket, "m-expire", fingerprint(SPEC)), timeout=5)
    label = session_label(response.session_id)
    wait_for(lambda: label not in daemon.session_labels(), timeout=10, what="the lease to expire")
    code, _ = code_of(stub.Lookup, scoped(kvd_pb2.LookupRequest, response, block_hashes=[b"h"]))
    assert code == grpc.StatusCode.NOT_FOUND


def test_unregistered_session_is_not_found(stub: kvd_pb2_grpc.KvdStub, session: RawSession) -> None:
    stub.Unregister(scoped(kvd_pb2.UnregisterRequest, session.response), timeout=5)
    code, _ = code_of(stub.Save, transfer(session.response, [(0, b"h")]))
    assert code == grpc.StatusCode.NOT_FOUND


def test_duplicate_registration_is_already_exists(
    daemon: Daemon,
    stub: kvd_pb2_grpc.KvdStub,
    caches: dict[str, torch.Tensor],
    session: RawSession,
    request: pytest.FixtureRequest,
) -> None:
    again = cpu_register_request(daemon.socket, SPEC, caches, f"m-{request.node.name}")  # `session`'s namespace
    code, details = code_of(stub.RegisterSession, again)
    assert code == grpc.StatusCode.ALREADY_EXISTS, details
    # Another namespace from the same process is fine.
    other = stub.RegisterSession(cpu_register_request(daemon.socket, SPEC, caches, "m-dup-other"), timeout=5)
    RawSession(stub, other).close()


def test_lookup_only_session_cannot_transfer(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub) -> None:
    response = stub.RegisterSession(lookup_only_request(daemon.socket, "m-lookup-only", fingerprint(SPEC)), timeout=5)
    code, _ = code_of(stub.Save, transfer(response, [(0, b"h")]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    stub.Unregister(scoped(kvd_pb2.UnregisterRequest, response), timeout=5)


# -- batches and hashes -----------------------------------------------------------------------------------------


def test_block_index_out_of_range(session: RawSession, stub: kvd_pb2_grpc.KvdStub) -> None:
    for rpc in (stub.Save, stub.Load):
        code, details = code_of(rpc, transfer(session.response, [(0, b"a"), (SPEC.num_blocks, b"b")]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "out of range" in details
    # Nothing of the batch was accepted: not even its valid first block.
    assert session.lookup([b"a"]) == 0


def test_blocks_as_columns_are_checked_like_blocks(session: RawSession, stub: kvd_pb2_grpc.KvdStub) -> None:
    assert session.response.columnar_blocks  # this daemon takes TransferRequest.block_indices / block_hashes
    cases = {
        "out of range": ([0, SPEC.num_blocks], [b"a", b"b"]),
        "2 block indices for 1 block hashes": ([0, 1], [b"a"]),
        "64": ([0, 1], [b"a", b"x" * 65]),
    }
    for rpc in (stub.Save, stub.Load):
        for expected, (indices, hashes) in cases.items():
            request = transfer(session.response, [])
            request.block_indices.extend(indices)
            request.block_hashes.extend(hashes)
            code, details = code_of(rpc, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in details, details
        both = transfer(session.response, [(0, b"a")])
        both.block_indices.append(1)
        both.block_hashes.append(b"b")
        code, details = code_of(rpc, both)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in details
    assert session.lookup([b"a"]) == 0


@pytest.mark.parametrize("rpc", ["Save", "Load", "Lookup"])
def test_empty_batch(session: RawSession, stub: kvd_pb2_grpc.KvdStub, rpc: str) -> None:
    if rpc == "Lookup":
        request = scoped(kvd_pb2.LookupRequest, session.response, block_hashes=[])
    else:
        request = transfer(session.response, [])
    code, details = code_of(getattr(stub, rpc), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in details


def test_oversized_transfer_batch(session: RawSession, stub: kvd_pb2_grpc.KvdStub) -> None:
    assert session.response.max_batch_blocks == MAX_BATCH
    pairs = [(i, block_hash(i, "big")) for i in range(MAX_BATCH + 1)]
    for rpc in (stub.Save, stub.Load):
        code, details = code_of(rpc, transfer(session.response, pairs))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MAX_BATCH) in details
    assert session.save(pairs[:MAX_BATCH]).ok  # exactly at the limit is fine


def test_oversized_lookup(session: RawSession, stub: kvd_pb2_grpc.KvdStub) -> None:
    hashes = [block_hash(i, "biglookup") for i in range(MAX_LOOKUP + 1)]
    code, _ = code_of(stub.Lookup, scoped(kvd_pb2.LookupRequest, session.response, block_hashes=hashes))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert session.lookup(hashes[:MAX_LOOKUP]) == 0


@pytest.mark.parametrize("length", [0, 65, 1000])
def test_bad_hash_length(session: RawSession, stub: kvd_pb2_grpc.KvdStub, length: int) -> None:
    bad = b"x" * length
    code, details = code_of(stub.Lookup, scoped(kvd_pb2.LookupRequest, session.response, block_hashes=[b"ok", bad]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "64" in details
    code, _ = code_of(stub.Save, transfer(session.response, [(0, b"ok"), (1, bad)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_hash_of_exactly_64_bytes_is_fine(session: RawSession, caches: dict[str, torch.Tensor]) -> None:
    h = b"\xff" * 64
    fill(caches, SPEC, [(5, h)])
    assert session.save([(5, h)]).ok
    assert session.lookup([h]) == 1


def test_load_twice_into_one_block_index(session: RawSession, stub: kvd_pb2_grpc.KvdStub) -> None:
    code, _ = code_of(stub.Load, transfer(session.response, [(3, CANARIES[0][1]), (3, CANARIES[1][1])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_ready_event(session: RawSession, stub: kvd_pb2_grpc.KvdStub) -> None:
    request = transfer(session.response, [(0, b"h")])
    request.ready_event = b"\x00" * 7
    code, _ = code_of(stub.Save, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# -- registration: layouts and memory ---------------------------------------------------------------------------


def test_region_size_does_not_match_layout(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]
) -> None:
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-size")
    request.cpu.layers[1].nbytes -= 2
    code, details = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes" in details


def test_region_count_does_not_match_layout(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]
) -> None:
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-count")
    del request.cpu.layers[1]
    code, _ = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_same_namespace_with_another_layout(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]
) -> None:
    """Two sessions claim one namespace (same model, same fingerprint) but describe different tensors."""
    from tests.helpers.worker import WorkerProcess

    with WorkerProcess(daemon.socket, SPEC, "m-layout") as worker:
        worker.wait_ready()
        other_spec = CacheSpec(kv_heads=4)  # another block geometry...
        other_caches = make_caches(other_spec)
        request = cpu_register_request(daemon.socket, other_spec, other_caches, "m-layout")
        request.namespace.layout_fingerprint = fingerprint(SPEC)  # ...under the first one's fingerprint
        code, details = code_of(stub.RegisterSession, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "layout" in details
        # The honest way (a fingerprint of its own layout) is another namespace: accepted.
        honest = stub.RegisterSession(cpu_register_request(daemon.socket, other_spec, other_caches, "m-layout"))
        RawSession(stub, honest).close()


def test_refused_registration_does_not_claim_the_namespace_layout(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]
) -> None:
    """A registration that fails (here: its memory is bad) must leave no trace, in particular not the layout it
    claimed for its namespace: otherwise one broken client locks the correct workers out until a restart."""
    other_spec = CacheSpec(kv_heads=4)
    bad = cpu_register_request(daemon.socket, other_spec, make_caches(other_spec), "m-claim")
    bad.namespace.layout_fingerprint = fingerprint(SPEC)
    bad.cpu.layers[0].address = 0x1000  # refused by the memory probe, after the layout checks
    code, _ = code_of(stub.RegisterSession, bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    good = stub.RegisterSession(cpu_register_request(daemon.socket, SPEC, caches, "m-claim"), timeout=5)
    RawSession(stub, good).close()


@pytest.mark.parametrize("problem", ["no layers", "bad dtype", "block_dim outside shape", "zero dim", "no fingerprint"])
def test_malformed_layout(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor], problem: str
) -> None:
    request = cpu_register_request(daemon.socket, SPEC, caches, f"m-bad-layout-{problem}")
    if problem == "no layers":
        request.layout.CopyFrom(kvd_pb2.KvLayout())  # memory without a layout
    elif problem == "bad dtype":
        request.layout.layers[0].dtype = 99
    elif problem == "block_dim outside shape":
        request.layout.layers[0].block_dim = 5
    elif problem == "zero dim":
        request.layout.layers[0].shape[2] = 0
    else:
        request.namespace.layout_fingerprint = ""
    code, _ = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_block_larger_than_a_slab(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub) -> None:
    big = CacheSpec(num_layers=5, num_blocks=2, block_size=16, kv_heads=32, head_dim=128)  # 1.25 MiB > 1 MiB slab
    assert big.block_bytes > 1 << 20
    caches = make_caches(big)
    code, details = code_of(stub.RegisterSession, cpu_register_request(daemon.socket, big, caches, "m-big-block"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "slab" in details


def test_cpu_region_at_address_0(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]) -> None:
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-addr0")
    request.cpu.layers[0].address = 0
    code, _ = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_cpu_region_that_is_not_mapped(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]
) -> None:
    """The daemon probes every region at registration: an unmapped address is refused at once."""
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-unmapped")
    request.cpu.layers[1].address = 0x1000  # page 1: never mapped in a Linux process
    code, details = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not readable" in details


def test_cpu_region_that_overflows_the_address_space(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]
) -> None:
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-overflow")
    request.cpu.layers[0].address = (1 << 64) - 4096
    code, _ = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("length", [0, 63, 65])
def test_cuda_ipc_handle_of_wrong_length(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, length: int) -> None:
    request = kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb("m-cuda", fingerprint(SPEC)),
        layout=layout_pb(SPEC),
        pid=os.getpid(),
        credential_token=token(daemon.socket),
        cuda=kvd_pb2.CudaMemory(
            device_uuid="GPU-00000000-0000-0000-0000-000000000000",
            allocations=[kvd_pb2.CudaAllocation(ipc_handle=b"\x01" * length, nbytes=1 << 30)],
            layers=[kvd_pb2.CudaLayer(allocation=0, offset=i << 20, nbytes=1 << 20) for i in range(SPEC.num_layers)],
        ),
    )
    code, details = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 bytes" in details


def test_cuda_layer_outside_its_allocation(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub) -> None:
    request = kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb("m-cuda2", fingerprint(SPEC)),
        layout=layout_pb(SPEC),
        pid=os.getpid(),
        credential_token=token(daemon.socket),
        cuda=kvd_pb2.CudaMemory(
            device_uuid="GPU-00000000-0000-0000-0000-000000000000",
            allocations=[kvd_pb2.CudaAllocation(ipc_handle=b"\x01" * 64, nbytes=1 << 20)],
            layers=[kvd_pb2.CudaLayer(allocation=0, offset=1 << 19, nbytes=1 << 20)],
        ),
    )
    code, _ = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# -- credentials ------------------------------------------------------------------------------------------------


def test_cpu_session_without_a_credential_token(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]
) -> None:
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-notoken", with_token=False)
    code, details = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "credential" in details


def test_reused_credential_token(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]) -> None:
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-reuse")
    first = stub.RegisterSession(request, timeout=5)
    stub.Unregister(scoped(kvd_pb2.UnregisterRequest, first), timeout=5)
    code, details = code_of(stub.RegisterSession, request)  # the same token a second time
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "token" in details


def test_made_up_credential_token(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]) -> None:
    request = cpu_register_request(daemon.socket, SPEC, caches, "m-madeup", with_token=False)
    request.credential_token = os.urandom(32)
    code, _ = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_token_is_bound_to_the_process_that_fetched_it(
    daemon: Daemon, stub: kvd_pb2_grpc.KvdStub, caches: dict[str, torch.Tensor]
) -> None:
    """A token fetched by another (live) process registers that process's pid, whatever the request claims."""
    child = track(
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from kvd_client.credentials import fetch_token;"
                "print(fetch_token(Path(sys.argv[1]), 5)[0].hex(), flush=True); sys.stdin.read()",
                str(daemon.socket),
            ],
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    )
    try:
        assert child.stdout is not None
        request = kvd_pb2.RegisterSessionRequest(
            namespace=namespace_pb("m-bound", fingerprint(SPEC)),
            pid=os.getpid(),  # a lie: the token says otherwise
            credential_token=bytes.fromhex(child.stdout.readline().strip()),
        )
        response = stub.RegisterSession(request, timeout=5)
        stats = {s.session_id: s for s in daemon.stats().sessions}  # by label: Stats never shows ids
        assert stats[session_label(response.session_id)].pid == child.pid
        stub.Unregister(scoped(kvd_pb2.UnregisterRequest, response), timeout=5)
    finally:
        child.kill()
        reap(child)


# -- memory that goes away --------------------------------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def test_save_after_the_memory_was_unmapped(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub) -> None:
    """The worker (alive) unmaps a layer after registering: the save fails in its notice, the session lives on."""
    per_layer = SPEC.num_blocks * SPEC.block_bytes_per_layer
    addresses = []
    for _ in range(SPEC.num_layers):
        address = _libc.mmap(None, per_layer, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANON, -1, 0)
        assert address not in (None, ctypes.c_void_p(-1).value)
        ctypes.memset(address, 7, per_layer)
        addresses.append(address)
    request = kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb("m-unmap", fingerprint(SPEC)),
        layout=layout_pb(SPEC),
        pid=os.getpid(),
        credential_token=token(daemon.socket),
        cpu=kvd_pb2.CpuMemory(layers=[kvd_pb2.CpuRegion(address=a, nbytes=per_layer) for a in addresses]),
    )
    with RawSession(stub, stub.RegisterSession(request, timeout=5)) as s:
        good = [(0, block_hash(0, "unmap"))]
        assert s.save(good).ok
        assert _libc.munmap(addresses[1], per_layer) == 0
        lost = [(1, block_hash(1, "unmap")), (2, block_hash(2, "unmap"))]
        notice = s.save(lost)
        assert not notice.ok
        assert set(notice.failed_block_hashes) == {h for _, h in lost}
        assert "process_vm_readv" in notice.error or "partial copy" in notice.error, notice.error
        assert s.lookup([h for _, h in lost]) == 0  # a failed save stores nothing
        assert s.lookup([h for _, h in good]) == 1
        # Loading into the unmapped layer fails too (the bytes of layer 0 may land; the notice says failed).
        notice = s.load([(3, good[0][1])])
        assert not notice.ok
        assert s.lookup([h for _, h in good]) == 1  # and the stored block is still there
    _libc.munmap(addresses[0], per_layer)


_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import grpc, torch
    from kvd_client.wire.kvd.v1 import kvd_pb2_grpc
    from tests.helpers.kvdata import CacheSpec, block_hash, fill, make_caches
    from tests.helpers.rpc import cpu_register_request

    socket = Path(sys.argv[1])
    spec = CacheSpec()
    caches = make_caches(spec)
    fill(caches, spec, [(i, block_hash(i, "child")) for i in range(4)])
    stub = kvd_pb2_grpc.KvdStub(grpc.insecure_channel(f"unix:{socket}"))
    response = stub.RegisterSession(cpu_register_request(socket, spec, caches, "m-child"), timeout=5)
    print(json.dumps({"session_id": response.session_id, "key": response.session_key.hex()}), flush=True)
    time.sleep(600)
    """
)


def test_save_from_a_worker_that_was_stopped_then_killed(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub) -> None:
    """A child registers its cache and hands us its session (id and key); we SIGSTOP, then SIGKILL it, and only
    then issue the save. Either outcome is clear: the save is accepted and its notice reports every block failed, or the
    session was already reaped (NOT_FOUND). Never a crash, never a stored block lost."""
    child = track(
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(daemon.socket)],
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
    )
    try:
        assert child.stdout is not None
        handed = __import__("json").loads(child.stdout.readline())
        session_id = kvd_pb2.RegisterSessionResponse(
            session_id=handed["session_id"], session_key=bytes.fromhex(handed["key"])
        )
        from tests.helpers.rpc import Watcher

        watcher = Watcher(stub, session_id)
        try:
            child.send_signal(signal.SIGSTOP)
            # Stopped is not gone: the daemon can still read a stopped process's memory.
            accepted = stub.Save(transfer(session_id, [(0, block_hash(0, "child"))]), timeout=5)
            assert watcher.wait(accepted.operation_id).ok
            child.kill()
            assert reap(child) == -signal.SIGKILL
            pairs = [(i, block_hash(i, "child")) for i in range(1, 4)]
            try:
                accepted = stub.Save(transfer(session_id, pairs), timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            else:
                notice = watcher.wait(accepted.operation_id)
                assert not notice.ok
                assert set(notice.failed_block_hashes) == {h for _, h in pairs}
            assert lookup_hits(stub, daemon.socket, "m-child", fingerprint(SPEC), [block_hash(0, "child")]) == 1
            assert lookup_hits(stub, daemon.socket, "m-child", fingerprint(SPEC), [h for _, h in pairs]) == 0
        finally:
            watcher.close()
    finally:
        if child.poll() is None:
            child.kill()
        reap(child)


def test_unknown_fields_of_a_newer_client_are_ignored(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub) -> None:
    """Compatibility: fields are only ever added, so a v1 daemon must accept a request with fields it lacks."""
    request = lookup_only_request(daemon.socket, "m-compat", fingerprint(SPEC))
    raw = request.SerializeToString() + b"\xa0\x06\x01"  # field 100, varint 1: unknown to this daemon
    parsed = kvd_pb2.RegisterSessionRequest.FromString(raw)
    response = stub.RegisterSession(parsed, timeout=5)
    stub.Unregister(scoped(kvd_pb2.UnregisterRequest, response), timeout=5)


def test_cpu_memory_with_region_count_zero(daemon: Daemon, stub: kvd_pb2_grpc.KvdStub) -> None:
    request = kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb("m-nomem", fingerprint(SPEC)),
        layout=layout_pb(SPEC),
        pid=os.getpid(),
        credential_token=token(daemon.socket),
        cpu=cpu_memory_pb({}),
    )
    code, _ = code_of(stub.RegisterSession, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
