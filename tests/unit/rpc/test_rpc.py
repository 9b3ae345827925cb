"""The RPC surface against an in-process daemon (tests/helpers/inprocess.py): health, registration, the full
save -> lookup -> load path through the real CPU transport with this process's own memory, Stats' typed fields, and
bad input mapped to its documented status code."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from kvd.daemon import KvdDaemon
from tests.helpers.inprocess import serving, stub_for
from tests.helpers.kvdata import CacheSpec, block_hash, fill, make_caches, mismatches
from tests.helpers.rpc import cpu_register_request, fingerprint, lookup_only_request, scoped, transfer

SPEC = CacheSpec()


@pytest.fixture
async def daemon() -> AsyncIterator[KvdDaemon]:
    async with serving() as running:
        yield running


async def register_cpu(daemon: KvdDaemon, stub: kvd_pb2_grpc.KvdStub, caches: dict) -> kvd_pb2.RegisterSessionResponse:
    loop = asyncio.get_running_loop()
    # The credential socket is served by this same loop: fetch the token from another thread.
    request = await loop.run_in_executor(None, cpu_register_request, daemon.config.socket, SPEC, caches, "inproc")
    return await stub.RegisterSession(request, timeout=5)


async def lookup_only(daemon: KvdDaemon, model: str, layout_fingerprint: str) -> kvd_pb2.RegisterSessionRequest:
    """A lookup-only registration with a token (fetched from another thread: this loop serves the socket)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lookup_only_request, daemon.config.socket, model, layout_fingerprint)


def forged(request: kvd_pb2.RegisterSessionRequest) -> kvd_pb2.RegisterSessionRequest:
    request.credential_token = b"\0" * 32
    return request


async def notice_of(watch: grpc.aio.UnaryStreamCall, operation_id: int) -> kvd_pb2.CompletionNotice:
    async for notice in watch:
        if notice.operation_id == operation_id:
            return notice
    raise AssertionError("the Watch stream ended")


async def test_health_is_serving_for_the_daemon_and_each_tier(daemon: KvdDaemon) -> None:
    async with grpc.aio.insecure_channel(f"unix:{daemon.config.socket}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvd.v1.Kvd"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert daemon.service is not None and daemon.service.tier_health() == (("host", True),)


async def test_save_lookup_load_through_the_cpu_transport(daemon: KvdDaemon) -> None:
    caches = make_caches(SPEC)
    pairs = [(i, block_hash(i, "inproc")) for i in range(4)]
    fill(caches, SPEC, pairs)
    async with stub_for(daemon) as stub:
        session = await register_cpu(daemon, stub, caches)
        watch = stub.Watch(scoped(kvd_pb2.WatchRequest, session))
        await watch.initial_metadata()
        saved = await stub.Save(transfer(session, pairs, tag=1), timeout=5)
        assert (await notice_of(watch, saved.operation_id)).ok
        hashes = [h for _, h in pairs] + [block_hash(99, "never")]
        lookup = await stub.Lookup(scoped(kvd_pb2.LookupRequest, session, block_hashes=hashes), timeout=5)
        assert lookup.hit_blocks == 4 and list(lookup.tiers) == [kvd_pb2.TIER_HOST_MEMORY] * 4
        moved = [(10 + i, h) for i, h in pairs]
        loaded = await stub.Load(transfer(session, moved), timeout=5)
        notice = await notice_of(watch, loaded.operation_id)
        assert notice.ok and notice.bytes_moved == 4 * SPEC.block_bytes
        assert mismatches(caches, SPEC, moved) == []
        stats = await stub.Stats(kvd_pb2.StatsRequest(), timeout=5)
        watch.cancel()
    assert (stats.saves_ok, stats.loads_ok, stats.lookups, stats.lookup_blocks, stats.lookup_hit_blocks) == (
        1,
        1,
        1,
        5,
        4,
    )
    assert (stats.bytes_saved, stats.bytes_loaded, stats.load_hit_blocks) == (
        4 * SPEC.block_bytes,
        4 * SPEC.block_bytes,
        4,
    )
    assert [s.transport for s in stats.sessions] == ["cpu"] and stats.tiers[0].name == "host"


@pytest.mark.parametrize(
    ("fingerprint_of", "token", "code"),
    [
        ("", "issued", grpc.StatusCode.INVALID_ARGUMENT),  # no layout fingerprint
        ("fp", "forged", grpc.StatusCode.PERMISSION_DENIED),  # a token never issued
        ("fp", "none", grpc.StatusCode.PERMISSION_DENIED),  # every session registers through the credential socket
    ],
)
async def test_bad_registrations_get_their_status(
    daemon: KvdDaemon, fingerprint_of: str, token: str, code: grpc.StatusCode
) -> None:
    if token == "issued":
        request = await lookup_only(daemon, "m", fingerprint_of)
    else:
        request = lookup_only_request(None, "m", fingerprint_of)
        if token == "forged":
            request = forged(request)
    async with stub_for(daemon) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.RegisterSession(request, timeout=5)
    assert raised.value.code() is code


async def test_calls_on_a_bad_session_or_batch_get_their_status(daemon: KvdDaemon) -> None:
    async with stub_for(daemon) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Lookup(kvd_pb2.LookupRequest(session_id="nope", block_hashes=[b"x"]), timeout=5)
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        session = await stub.RegisterSession(await lookup_only(daemon, "m", fingerprint(SPEC)), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Lookup(scoped(kvd_pb2.LookupRequest, session), timeout=5)  # empty batch
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Save(transfer(session, [(0, b"h")]), timeout=5)  # a lookup-only session has no memory
        assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
