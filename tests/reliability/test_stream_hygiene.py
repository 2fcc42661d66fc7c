"""Stream hygiene: abandoned watch streams leave nothing behind; slow consumers are cut off.

Injected: thousands of watch streams opened and abandoned three ways: cancelled
by the client after their first event, never read and dropped with their
channel, and held by client processes that are then killed with SIGKILL. Then
slow consumers that never read while a flood of events arrives.

Checked from outside the daemon, through /proc/PID (the server is not changed
to expose counters): after the abandoned streams its open file descriptors
and threads are back at their baseline, its resident memory (VmRSS) within a
small margin of it, where a leak per stream would show as megabytes, and the
latency of a create on the streams' label (which grows with the watchers the
daemon still offers each event to) back where it was; slow
consumers end with RESOURCE_EXHAUSTED (`legato serve --watch-buffer 50`) and
the daemon's memory stays bounded meanwhile, then they resume from their last
seq and catch up.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from legato.v1 import tasks_pb2, tasks_pb2_grpc

from reliability.conftest import MakeDaemon
from reliability.harness import DaemonProcess, Raw, create_agent, record, scale

STREAMS = scale(2_000, 10_000)
# Streams are opened and abandoned this many at a time, after WARM_UP batches that
# let the daemon make what it allocates once (they are in the baseline).
BATCH = 250
WARM_UP = 2
STREAMS_PER_CONNECTION = 250
HOLDER_SCRIPT = Path(__file__).with_name("stream_holder.py")
WATCH_BUFFER = 50
SLOW_CONSUMERS = scale(10, 40)
FLOOD = scale(1_500, 5_000)
FLOOD_CONTENT = 4 * 1024
LABEL, SLOW_LABEL = "@hygiene", "@slow"
GUARD = 30.0
# How much resident memory may stay after all abandoned streams are gone. Measured
# here: RSS moves within ~10 MiB from batch to batch with no trend (the allocator
# keeps and returns memory in steps), so a leak shows only past that: in the long
# form, from 1.7 KiB per stream on.
RSS_MARGIN_KIB = 16 * 1024
# Thread names (comm) of gRPC's own pools, and how many more of them may run
# after the streams than before (seen: one more event_engine thread on a
# loaded machine, none on a quiet one).
GRPC_THREADS = frozenset({"event_engine", "grpc_global_tim", "lifeguard"})
GRPC_THREAD_SLACK = 4
# Resident memory the daemon may add while the flood lasts (its event cache included).
FLOOD_RSS_BOUND_KIB = 96 * 1024

pytestmark = pytest.mark.timeout(scale(120, 1200))


@dataclass
class Usage:
    """What /proc says of the daemon at one moment."""

    rss_kib: int
    fds: int
    # The daemon's own threads (the event loop's, the database's)...
    threads: int
    # ...and gRPC's: its EventEngine pool grows while the machine is busy and
    # shrinks later on its own, so it is bounded, not held to the baseline.
    grpc_threads: int

    @classmethod
    def of(cls, daemon: DaemonProcess) -> Usage:
        names = daemon.thread_names()
        grpc = sum(name in GRPC_THREADS for name in names)
        return cls(daemon.rss_kib(), daemon.open_fds(), len(names) - grpc, grpc)


def channels(address: str, count: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool gives each channel a connection of its own.
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]


def watch_calls(
    opened: list[grpc.aio.Channel], key: str, count: int, after_seq: int
) -> list[grpc.aio.UnaryStreamCall[tasks_pb2.WatchTasksRequest, tasks_pb2.TaskEvent]]:
    request = tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=after_seq)
    metadata = (("authorization", f"Bearer {key}"),)
    return [
        tasks_pb2_grpc.TaskServiceStub(opened[n // STREAMS_PER_CONNECTION]).WatchTasks(
            request, metadata=metadata
        )
        for n in range(count)
    ]


async def cancelled_after_first_event(address: str, key: str, count: int, after_seq: int) -> None:
    """Streams that read their first event, then are cancelled by the client."""
    opened = channels(address, -(-count // STREAMS_PER_CONNECTION))
    try:
        calls = watch_calls(opened, key, count, after_seq)
        firsts = await asyncio.wait_for(asyncio.gather(*(call.read() for call in calls)), GUARD)
        assert all(isinstance(m, tasks_pb2.TaskEvent) for m in firsts)
        for call in calls:
            call.cancel()
    finally:
        for channel in opened:
            await channel.close()


async def never_read_then_dropped(address: str, key: str, count: int, after_seq: int) -> None:
    """Streams whose headers arrived but which are never read; their channels just close."""
    opened = channels(address, -(-count // STREAMS_PER_CONNECTION))
    try:
        calls = watch_calls(opened, key, count, after_seq)
        await asyncio.wait_for(asyncio.gather(*(c.initial_metadata() for c in calls)), GUARD)
    finally:
        for channel in opened:
            await channel.close()


async def held_by_killed_process(address: str, key: str, count: int, after_seq: int) -> None:
    """Streams of a client process that is killed with SIGKILL once they are established."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HOLDER_SCRIPT),
        address,
        LABEL,
        str(count),
        str(after_seq),
        env={**os.environ, "LEGATO_AGENT_KEY": key},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), GUARD)
        assert line.decode().strip() == f"ready {count}", line
    finally:
        process.kill()
        await process.wait()


async def abandon(raw: Raw, address: str, key: str, count: int) -> dict[str, int]:
    """Opens and abandons `count` streams, a third each way; how many went which way.

    Each stream replays one stored event (the last), so that it is established
    (its first event or its headers arrived) before it is abandoned.
    """
    listing = await raw.tasks.ListTasks(
        tasks_pb2.ListTasksRequest(page_size=1), metadata=raw.metadata
    )
    third = count // 3
    ways: dict[str, tuple[Callable[[str, str, int, int], Awaitable[None]], int]] = {
        "cancelled": (cancelled_after_first_event, count - 2 * third),
        "never_read_dropped": (never_read_then_dropped, third),
        "client_process_killed": (held_by_killed_process, third),
    }
    await asyncio.gather(*(way(address, key, n, listing.cursor - 1) for way, n in ways.values()))
    return {name: n for name, (_, n) in ways.items()}


class PeakSampler:
    """The highest resident memory of the daemon while the `async with` body runs.

    Memory peaks come and go with no event to await: /proc is sampled every 50 ms.
    """

    def __init__(self, daemon: DaemonProcess):
        self._daemon = daemon
        self.rss_kib = daemon.rss_kib()
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.rss_kib = max(self.rss_kib, self._daemon.rss_kib())
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> PeakSampler:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.rss_kib = max(self.rss_kib, self._daemon.rss_kib())


async def create_latency_ms(raw: Raw, creates: int = 100) -> float:
    """The median latency of a create on LABEL, in milliseconds.

    The daemon offers each event to every subscription of its label, so this
    grows with the number of watchers it still holds there: a watcher count seen
    from outside. Each abandoned subscription left behind would add a few
    microseconds (far more while its stream is still open and written to).
    """
    took: list[float] = []
    for n in range(creates):
        began = time.perf_counter()
        await raw.tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(content=f"probe {n}", labels=[LABEL]),
            metadata=raw.metadata,
            timeout=GUARD,
        )
        took.append(time.perf_counter() - began)
    return statistics.median(took) * 1000


async def settled(daemon: DaemonProcess, baseline: Usage, timeout: float = GUARD) -> Usage:
    """The daemon's usage once its descriptors are back at the baseline (or `timeout` passed).

    Streams end inside the daemon asynchronously after the client went away, and
    nothing outside can await that: /proc is read until it shows the end.
    """
    deadline = time.monotonic() + timeout
    usage = Usage.of(daemon)
    while usage.fds > baseline.fds and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # polling /proc: the daemon signals nothing here
        usage = Usage.of(daemon)
    return usage


async def test_abandoned_streams_leave_nothing_and_slow_consumers_are_cut_off(
    make_daemon: MakeDaemon,
) -> None:
    began = time.monotonic()
    daemon = make_daemon(
        args=["--watch-buffer", str(WATCH_BUFFER), "--max-open-tasks", str(FLOOD + 1000)]
    )
    await daemon.start()
    key = await create_agent(daemon, "watcher", [LABEL, SLOW_LABEL])
    async with Raw(daemon.address, key) as raw:
        await raw.tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(content="the first event", labels=[LABEL]),
            metadata=raw.metadata,
        )
        started = Usage.of(daemon)
        for _ in range(WARM_UP):
            await abandon(raw, daemon.address, key, BATCH)
        baseline = await settled(daemon, started)
        latency_before = await create_latency_ms(raw)
        abandoned: dict[str, int] = {}
        settled_rss: list[int] = []
        async with PeakSampler(daemon) as peak:
            for _ in range(STREAMS // BATCH):
                for way, n in (await abandon(raw, daemon.address, key, BATCH)).items():
                    abandoned[way] = abandoned.get(way, 0) + n
                settled_rss.append((await settled(daemon, baseline)).rss_kib)
        after = await settled(daemon, baseline)
        # Events after the abandon: each subscription left behind would be offered them.
        latency_after = await create_latency_ms(raw)
        health = await raw.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        slow = await slow_consumers(daemon, raw)

    figures: dict[str, Any] = {
        "streams_abandoned": sum(abandoned.values()),
        "abandoned_by_way": abandoned,
        "warm_up_streams": WARM_UP * BATCH,
        "streams_open_at_once": BATCH,
        "rss_kib": {
            "start": started.rss_kib,
            "baseline": baseline.rss_kib,
            "peak_while_streams_open": peak.rss_kib,
            "after": after.rss_kib,
        },
        "rss_kib_after_each_batch": settled_rss,
        "rss_growth_kib": after.rss_kib - baseline.rss_kib,
        "open_fds": {"baseline": baseline.fds, "after": after.fds},
        "threads": {"baseline": baseline.threads, "after": after.threads},
        "grpc_threads": {"baseline": baseline.grpc_threads, "after": after.grpc_threads},
        "create_latency_ms_on_the_label": {
            "before": round(latency_before, 3),
            "after": round(latency_after, 3),
        },
        **slow,
        "seconds": round(time.monotonic() - began, 1),
    }
    record("stream_hygiene", figures)
    assert after.fds <= baseline.fds, f"descriptors not released: {figures['open_fds']}"
    assert after.threads <= baseline.threads, f"threads left behind: {figures['threads']}"
    assert after.grpc_threads <= baseline.grpc_threads + GRPC_THREAD_SLACK, figures["grpc_threads"]
    assert after.rss_kib - baseline.rss_kib <= RSS_MARGIN_KIB, figures["rss_kib"]
    assert latency_after <= 2 * latency_before + 1.0, figures["create_latency_ms_on_the_label"]
    assert slow["slow_consumers_cut_off"] == SLOW_CONSUMERS, slow
    assert slow["flood_rss_growth_kib"] <= FLOOD_RSS_BOUND_KIB, slow
    assert slow["resumed_and_caught_up"], slow


async def slow_consumers(daemon: DaemonProcess, raw: Raw) -> dict[str, Any]:
    """Slow consumers that never read while FLOOD events arrive: cut off, memory bounded."""
    seed = await raw.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(content="slow seed", labels=[SLOW_LABEL]),
        metadata=raw.metadata,
    )
    events = await raw.tasks.ListTaskEvents(
        tasks_pb2.ListTaskEventsRequest(id=seed.id), metadata=raw.metadata
    )
    start_seq = events.events[0].seq - 1
    opened = channels(daemon.address, SLOW_CONSUMERS)
    calls = [
        tasks_pb2_grpc.TaskServiceStub(channel).WatchTasks(
            tasks_pb2.WatchTasksRequest(labels=[SLOW_LABEL], after_seq=start_seq),
            metadata=raw.metadata,
        )
        for channel in opened
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.initial_metadata() for c in calls)), GUARD)
        before = daemon.rss_kib()
        content = "x" * FLOOD_CONTENT

        async def write(part: int) -> None:
            for n in range(part, FLOOD, 4):
                await raw.tasks.CreateTask(
                    tasks_pb2.CreateTaskRequest(content=f"{n} {content}", labels=[SLOW_LABEL]),
                    metadata=raw.metadata,
                    timeout=GUARD,
                )

        async with PeakSampler(daemon) as peak:
            await asyncio.gather(*(write(part) for part in range(4)))
        last_seq = (
            await raw.tasks.ListTasks(
                tasks_pb2.ListTasksRequest(page_size=1), metadata=raw.metadata
            )
        ).cursor

        received: list[int] = []
        last_seqs: list[int] = []
        codes: list[grpc.StatusCode] = []
        for call in calls:
            seqs = [start_seq]
            try:
                async for event in call:
                    seqs.append(event.seq)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
            received.append(len(seqs) - 1)
            last_seqs.append(seqs[-1])
        # Each resumes from its last seq, as the client does, and catches up.
        resumed = all([await catch_up(raw, seq, last_seq) for seq in last_seqs[:3]])
    finally:
        for channel in opened:
            await channel.close()
    return {
        "slow_consumers": SLOW_CONSUMERS,
        "watch_buffer": WATCH_BUFFER,
        "flood_events": FLOOD,
        "flood_event_bytes": FLOOD_CONTENT,
        "slow_consumers_cut_off": codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED),
        "events_received_before_cut_off": {"min": min(received), "max": max(received)},
        "flood_rss_kib": {"before": before, "peak": peak.rss_kib},
        "flood_rss_growth_kib": peak.rss_kib - before,
        "flood_kib": FLOOD * FLOOD_CONTENT // 1024,
        "events_unread_at_cut_off": {
            "min": FLOOD + 1 - max(received),
            "max": FLOOD + 1 - min(received),
        },
        "resumed_and_caught_up": resumed,
    }


async def catch_up(raw: Raw, after_seq: int, last_seq: int) -> bool:
    call = raw.tasks.WatchTasks(
        tasks_pb2.WatchTasksRequest(labels=[SLOW_LABEL], after_seq=after_seq),
        metadata=raw.metadata,
    )
    try:
        expected = after_seq + 1
        while expected <= last_seq:
            message = await asyncio.wait_for(call.read(), GUARD)
            if not isinstance(message, tasks_pb2.TaskEvent) or message.seq != expected:
                return False
            expected += 1
        return True
    finally:
        call.cancel()
