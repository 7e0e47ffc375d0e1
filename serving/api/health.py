"""grpc.health.v1: Check, Watch and List.

Service "" and each served service are SERVING while the server takes requests (the
readiness probe); "liveness" stays SERVING as long as the event loop answers, through the
drain too (the liveness probe, which must not restart a pod that is only shutting down).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

LIVENESS = "liveness"


class HealthService(health.aio.HealthServicer):
    """The stock servicer, with a message on NOT_FOUND (it sends none) and List (it
    answers UNIMPLEMENTED)."""

    def __init__(self, services: list[str]):
        super().__init__()
        self.services = services

    async def Check(self, request, context):
        if request.service not in self.services:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"service: no health status for {request.service!r} (known: "
                                f"{', '.join(repr(s) for s in self.services)})")
        return await super().Check(request, context)

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service in self.services:
            status = self._server_status.get(service,
                                             health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            response.statuses[service].status = status
        return response

    async def set_all(self, services: list[str], status) -> None:
        for service in services:
            await self.set(service, status)
