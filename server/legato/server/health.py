"""gRPC health checking (`grpc.health.v1.Health`) for the daemon.

Not grpc's own servicer, for two reasons: its Watch writes with
`context.write` from a coroutine, which the daemon's wrapping of streaming
handlers (`rpc.guard`) does not serve, and its Watch streams stay open after
shutdown begins, so each would hold the server's drain for the whole grace
period. Here Watch is an async generator that says NOT_SERVING and ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status = int  # a health_pb2.HealthCheckResponse.ServingStatus value
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped in grpcio-health-checking
    """The serving status of the daemon ("") and of its services, by name."""

    def __init__(self) -> None:
        self._status: dict[str, Status] = {"": NOT_SERVING}
        self._changed = asyncio.Condition()
        self._stopping = False

    async def set(self, service: str, status: Status) -> None:
        """Sets a service's status; ignored once shutdown has begun."""
        if not self._stopping:
            await self._publish({service: status})

    async def enter_graceful_shutdown(self) -> None:
        """Everything NOT_SERVING for good; Watch streams say so and end."""
        self._stopping = True
        await self._publish(dict.fromkeys(self._status, NOT_SERVING))

    async def _publish(self, statuses: dict[str, Status]) -> None:
        async with self._changed:
            self._status.update(statuses)
            self._changed.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: Status | None = None
        while True:
            async with self._changed:
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                while status == last and not self._stopping:
                    await self._changed.wait()
                    status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self._stopping:
                return
