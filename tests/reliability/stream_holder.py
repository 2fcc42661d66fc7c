"""A client process that opens watch streams and holds them until it is killed (not collected).

    LEGATO_AGENT_KEY=... python stream_holder.py ADDRESS LABEL STREAMS AFTER_SEQ

Opens STREAMS watch streams on LABEL after AFTER_SEQ over a few connections: half
of them read their first event, half only wait for the response headers and
never read. Once every stream is established it prints `ready STREAMS` and
waits; the stream hygiene test then kills it with SIGKILL, so the daemon sees
the connections drop with no goodbye.
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
from legato.v1 import tasks_pb2, tasks_pb2_grpc

STREAMS_PER_CONNECTION = 250
GUARD = 30.0


async def main() -> None:
    address, label, count, after_seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    metadata = (("authorization", f"Bearer {os.environ['LEGATO_AGENT_KEY']}"),)
    request = tasks_pb2.WatchTasksRequest(labels=[label], after_seq=after_seq)
    calls: list[grpc.aio.UnaryStreamCall[tasks_pb2.WatchTasksRequest, tasks_pb2.TaskEvent]] = []
    for start in range(0, count, STREAMS_PER_CONNECTION):
        # A local subchannel pool: each channel gets a connection of its own.
        channel = grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        calls.extend(
            stub.WatchTasks(request, metadata=metadata)
            for _ in range(min(STREAMS_PER_CONNECTION, count - start))
        )
    await asyncio.wait_for(
        asyncio.gather(
            *(call.read() if n % 2 else call.initial_metadata() for n, call in enumerate(calls))
        ),
        GUARD,
    )
    print(f"ready {len(calls)}", flush=True)
    await asyncio.Event().wait()  # held until the test kills this process


if __name__ == "__main__":
    asyncio.run(main())
