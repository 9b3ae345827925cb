"""kvd's health servicer answers grpc.health.v1 List (gRFC A90) as Check does, on a real asyncio gRPC server."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvd.rpc.health import MAX_LISTED_SERVICES, HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def served() -> AsyncIterator[tuple[HealthServicer, health_pb2_grpc.HealthStub]]:
    with tempfile.TemporaryDirectory(prefix="kvd-") as directory:
        servicer = HealthServicer()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{Path(directory) / 'h.sock'}")
        await server.start()
        async with grpc.aio.insecure_channel(f"unix:{Path(directory) / 'h.sock'}") as channel:
            yield servicer, health_pb2_grpc.HealthStub(channel)
        await server.stop(None)


async def listed(stub: health_pb2_grpc.HealthStub) -> dict[str, int]:
    response = await stub.List(health_pb2.HealthListRequest(), timeout=5)
    return {name: int(reply.status) for name, reply in response.statuses.items()}


async def test_list_is_what_check_answers(served: tuple[HealthServicer, health_pb2_grpc.HealthStub]) -> None:
    servicer, stub = served
    assert await listed(stub) == {"": SERVING}  # the server itself, as grpc's servicer starts
    await servicer.set("kvd.v1.Kvd", SERVING)
    await servicer.set("kvd.v1.Kvd/tier/redis", NOT_SERVING)
    statuses = await listed(stub)
    assert statuses == {"": SERVING, "kvd.v1.Kvd": SERVING, "kvd.v1.Kvd/tier/redis": NOT_SERVING}
    for name, status in statuses.items():
        assert (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status == status


async def test_after_shutdown_began_everything_is_not_serving(
    served: tuple[HealthServicer, health_pb2_grpc.HealthStub],
) -> None:
    servicer, stub = served
    await servicer.set("kvd.v1.Kvd", SERVING)
    await servicer.enter_graceful_shutdown()
    await servicer.set("kvd.v1.Kvd", SERVING)  # ignored, as Check ignores it
    await servicer.set("kvd.v1.Kvd/tier/disk", SERVING)
    assert await listed(stub) == {"": NOT_SERVING, "kvd.v1.Kvd": NOT_SERVING}
    check = await stub.Check(health_pb2.HealthCheckRequest(service="kvd.v1.Kvd"), timeout=5)
    assert check.status == NOT_SERVING


async def test_too_many_services_is_resource_exhausted(
    served: tuple[HealthServicer, health_pb2_grpc.HealthStub],
) -> None:
    servicer, stub = served
    for i in range(MAX_LISTED_SERVICES - 1):
        await servicer.set(f"s{i}", SERVING)
    assert len(await listed(stub)) == MAX_LISTED_SERVICES
    await servicer.set("one.too.many", SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await listed(stub)
    assert failed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
