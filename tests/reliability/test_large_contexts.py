"""Large contexts stay bounded: 100 watchers, tasks with 1 MiB contexts, streamed output.

Injected: tasks whose context is 1 MiB each, watched by 100 streams, while a
worker streams 1,000 output chunks into them. Before events were deltas, every
OUTPUT event carried the whole task again: the per-seq cache and the watchers'
buffers held a megabyte per chunk.

Checked from outside the daemon, through /proc/PID: its resident memory stays
within a stated bound above its baseline while the chunks stream, and every
watcher receives every chunk, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
from google.protobuf import duration_pb2, struct_pb2
from legato.v1 import tasks_pb2

from reliability.conftest import MakeDaemon
from reliability.harness import Raw, create_agent, record, scale

WATCHERS = 100
STREAMS_PER_CONNECTION = 25
TASKS = scale(5, 20)
CHUNKS = scale(1_000, 5_000)
CONTEXT_BYTES = 1024 * 1024
LABEL = "@big"
GUARD = 60.0
# What the daemon's resident memory may grow by while the chunks stream, after
# every watcher has its CREATED events. Events are deltas of ~150 bytes, so
# this is allocator noise: measured here, under 10 MiB. With whole-task events
# each chunk was a megabyte more for every watcher behind.
STREAM_RSS_BOUND_KIB = 32 * 1024
# ...and from the baseline to the peak, the creates included: each CREATED event
# carries its 1 MiB context to all 100 watchers, and gRPC copies a message into
# each stream's send buffer (measured: 250-320 MiB for 5 tasks, returned to the
# allocator, not to the system).
RSS_BOUND_KIB = 512 * 1024

pytestmark = pytest.mark.timeout(scale(180, 900))


def megabyte_context(n: int) -> struct_pb2.Struct:
    context = struct_pb2.Struct()
    context.update({"n": n, "document": "x" * (CONTEXT_BYTES - 64)})
    return context


async def test_watchers_of_tasks_with_1_mib_contexts_keep_the_daemon_small(
    make_daemon: MakeDaemon,
) -> None:
    daemon = make_daemon(args=["--max-open-tasks", str(TASKS + 10)])
    await daemon.start()
    coder_key = await create_agent(daemon, "coder", [])
    worker_key = await create_agent(daemon, "worker", [LABEL])
    received: defaultdict[int, list[str]] = defaultdict(list)
    created: defaultdict[int, int] = defaultdict(int)
    all_created, all_in = asyncio.Event(), asyncio.Event()
    expected_chunks = TASKS * (CHUNKS // TASKS)

    async with Raw(daemon.address, coder_key) as coder, Raw(daemon.address, worker_key) as worker:
        cursor = (
            await coder.tasks.GetCursor(tasks_pb2.GetCursorRequest(), metadata=coder.metadata)
        ).cursor
        channels = [
            Raw(daemon.address, coder_key) for _ in range(WATCHERS // STREAMS_PER_CONNECTION)
        ]

        async def watch(n: int, raw: Raw) -> None:
            call = raw.tasks.WatchTasks(
                tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=cursor),
                metadata=raw.metadata,
            )
            async for event in call:
                if event.type == tasks_pb2.TASK_EVENT_TYPE_CREATED:
                    assert len(str(event.task.context["document"])) == CONTEXT_BYTES - 64
                    created[n] += 1
                    if all(created[w] == TASKS for w in range(WATCHERS)):
                        all_created.set()
                if event.type == tasks_pb2.TASK_EVENT_TYPE_OUTPUT:
                    received[n].append(event.output.text)
                    if all(len(received[w]) == expected_chunks for w in range(WATCHERS)):
                        all_in.set()

        watchers = [
            asyncio.create_task(watch(n, channels[n % len(channels)])) for n in range(WATCHERS)
        ]
        baseline = daemon.rss_kib()
        peak = baseline
        began = time.monotonic()
        try:
            ids = []
            for n in range(TASKS):
                new = await coder.tasks.CreateTask(
                    tasks_pb2.CreateTaskRequest(
                        content=f"read document {n}", labels=[LABEL], context=megabyte_context(n)
                    ),
                    metadata=coder.metadata,
                )
                ids.append(new.id)
                peak = max(peak, daemon.rss_kib())
            await asyncio.wait_for(all_created.wait(), GUARD)
            streaming_from = daemon.rss_kib()
            streaming_peak = streaming_from
            sent: list[str] = []
            for task_id in ids:
                claim = await worker.tasks.ClaimTask(
                    tasks_pb2.ClaimTaskRequest(
                        id=task_id, lease=duration_pb2.Duration(seconds=300)
                    ),
                    metadata=worker.metadata,
                )
                for c in range(CHUNKS // TASKS):
                    text = f"{task_id} chunk {c}: " + "y" * 80 + "\n"
                    await worker.tasks.AppendOutput(
                        tasks_pb2.AppendOutputRequest(
                            id=task_id, lease_token=claim.lease_token, text=text
                        ),
                        metadata=worker.metadata,
                    )
                    sent.append(text)
                    if c % 50 == 0:  # a measurement, not a wait
                        streaming_peak = max(streaming_peak, daemon.rss_kib())
            await asyncio.wait_for(all_in.wait(), GUARD)
            streaming_peak = max(streaming_peak, daemon.rss_kib())
            peak = max(peak, streaming_peak)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            for raw in channels:
                await raw.close()
        took = time.monotonic() - began

    growth = peak - baseline
    streaming_growth = streaming_peak - streaming_from
    record(
        "large_contexts",
        {
            "watchers": WATCHERS,
            "tasks": TASKS,
            "context_bytes": CONTEXT_BYTES,
            "chunks": expected_chunks,
            "rss_baseline_kib": baseline,
            "rss_peak_kib": peak,
            "rss_growth_kib": growth,
            "rss_bound_kib": RSS_BOUND_KIB,
            "rss_growth_while_streaming_kib": streaming_growth,
            "rss_bound_while_streaming_kib": STREAM_RSS_BOUND_KIB,
            "seconds": round(took, 2),
        },
    )
    assert all(received[w] == sent for w in range(WATCHERS)), "a watcher missed a chunk"
    assert streaming_growth < STREAM_RSS_BOUND_KIB, (
        f"RSS grew {streaming_growth} KiB while chunks streamed (bound {STREAM_RSS_BOUND_KIB})"
    )
    assert growth < RSS_BOUND_KIB, f"RSS grew {growth} KiB (bound {RSS_BOUND_KIB} KiB)"
    code, _, _ = await daemon.terminate(daemon.grace + 5)
    assert code == 0, daemon.log_tail()
