"""A supervisor may watch the daemon's health instead of polling it."""

from __future__ import annotations

import asyncio

import grpc
from conftest import EVENT_GUARD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from legato.server.daemon import Config, Daemon

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_watch_says_serving_then_not_serving_as_the_daemon_stops(
    config: Config,
) -> None:
    daemon = Daemon(config)
    await daemon.start()
    try:
        async with grpc.aio.insecure_channel(config.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="legato.v1.TaskService")
            )
            first = await asyncio.wait_for(watch.read(), EVENT_GUARD)
            assert isinstance(first, health_pb2.HealthCheckResponse)
            assert first.status == SERVING
            stopping = asyncio.create_task(daemon.stop())
            second = await asyncio.wait_for(watch.read(), EVENT_GUARD)
            assert isinstance(second, health_pb2.HealthCheckResponse)
            assert second.status == NOT_SERVING
            # ...and ends, so it does not hold the server's drain for the grace period.
            assert await asyncio.wait_for(watch.read(), EVENT_GUARD) is grpc.aio.EOF
            assert (await watch.code()) is grpc.StatusCode.OK
            await stopping
    finally:
        await daemon.stop()
