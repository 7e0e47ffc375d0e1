"""grpc.health.v1: Check, Watch and List.

Service "" and each served service are SERVING while the server takes requests (the
readiness probe); "liveness" stays SERVING as long as the event loop answers, through the
drain too (the liveness probe, which must not restart a pod that is only shutting down).

Each model has its own, "model/NAME": SERVING while some version of it is served,
NOT_SERVING while its versions in the policy fail to load (ListModels says why).

Watch streams follow the known services only, and end when the server drains
(`shutdown`): a stream left open would hold the drain for the whole grace period.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2

from serving.engine.errors import shown

LIVENESS = "liveness"
MODEL_PREFIX = "model/"  # "model/NAME": SERVING while a version of NAME is served
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health.aio.HealthServicer):
    """The stock servicer's Check and statuses, with a message on NOT_FOUND (it sends
    none), List (it answers UNIMPLEMENTED), and a Watch of its own: the stock one watches
    any name (a megabyte each) and never ends."""

    def __init__(self, services: list[str]):
        super().__init__()
        self.services = services
        self._wakeups: dict[str, set[asyncio.Event]] = {}  # the open Watch streams
        self._stopping = False

    def _unknown(self, service: str) -> str:
        return (f"service: no health status for {shown(service)} (known: "
                f"{', '.join(repr(s) for s in self.services)})")

    async def Check(self, request, context):
        if request.service not in self.services:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(request.service))
        return await super().Check(request, context)

    async def Watch(self, request, context) -> None:
        """The service's status now and at every change; after `shutdown`, its last status
        (NOT_SERVING but for liveness) and the end of the stream, with OK."""
        service = request.service
        if service not in self.services:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(service))
        wakeup = asyncio.Event()
        self._wakeups.setdefault(service, set()).add(wakeup)
        sent = None
        try:
            while True:
                # Cleared before reading, so a change during the write wakes the next wait;
                # `stopping` read before the status, so the last status sent is the final one.
                wakeup.clear()
                stopping = self._stopping
                status = self._server_status.get(service, UNKNOWN)
                if status != sent:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    sent = status
                if stopping:
                    return
                await wakeup.wait()
        finally:
            watching = self._wakeups.get(service)
            if watching is not None:
                watching.discard(wakeup)
                if not watching:
                    del self._wakeups[service]

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service in self.services:
            status = self._server_status.get(service, UNKNOWN)
            response.statuses[service].status = status
        return response

    async def set(self, service: str, status) -> None:
        if service not in self.services:
            self.services.append(service)
        # Not the stock set: its watchers are woken under a lock they hold while writing,
        # so one Watch client that stops reading would block every status change.
        self._server_status[service] = status
        for wakeup in self._wakeups.get(service, ()):
            wakeup.set()

    async def set_all(self, services: list[str], status) -> None:
        for service in services:
            await self.set(service, status)

    def shutdown(self) -> None:
        """The server is draining: open Watch streams send their last status and end, and
        later ones end after their first."""
        self._stopping = True
        for wakeups in self._wakeups.values():
            for wakeup in wakeups:
                wakeup.set()
