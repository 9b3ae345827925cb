"""grpc.health.v1.Health with List: grpc's asyncio health servicer answers Check and Watch, and List (gRFC A90)
lets grpcurl and dashboards discover every service the daemon reports, the per-tier ones included.

List is a snapshot of the same statuses Check answers from, so both always agree: kept here from the public `set`
and `enter_graceful_shutdown`, not read from the base class's private table.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2

ServingStatus: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus.ValueType

# The health protocol's bound on one List answer; more services is RESOURCE_EXHAUSTED.
MAX_LISTED_SERVICES = 100


class HealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, ServingStatus] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._shutting_down = False

    async def set(self, service: str, status: ServingStatus) -> None:
        await super().set(service, status)
        if not self._shutting_down:  # as in the base class: after shutdown began, every status stays NOT_SERVING
            self._statuses[service] = status

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._shutting_down = True
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def List(self, request: health_pb2.HealthListRequest, context: Any) -> health_pb2.HealthListResponse:
        if len(self._statuses) > MAX_LISTED_SERVICES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self._statuses)} services, more than List answers ({MAX_LISTED_SERVICES}): use Check",
            )
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in sorted(self._statuses.items())
            }
        )
