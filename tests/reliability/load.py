"""Load the reliability tests put on the daemon: producers and a finisher that outlive restarts.

Both use raw stubs with `wait_for_ready`, so a call made while the daemon is
down waits for it to be back instead of failing at once; a call that was in
flight when it died fails, and its outcome is unknown until it is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2
from legato.v1 import tasks_pb2

from reliability.harness import Raw

CALL_TIMEOUT = 10.0
# The codes of a call whose outcome is unknown: the daemon died or stopped under it.
RETRY_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


# (seq, event type, task id)
Logged = tuple[int, int, str]


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class Producer:
    """Creates tasks `NAME-0, NAME-1, ...` (content = idempotency key) on `label`.

    A create whose reply was lost is retried with the same key until it is
    acknowledged; only then does the producer move on to a new key. After
    `stop`, it finishes the create in doubt, if any, and returns.
    """

    name: str
    api_key: str
    label: str
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    acknowledged: dict[str, str] = field(default_factory=dict)  # idempotency key -> task id
    unacknowledged: str | None = None
    sent: int = 0
    replies_lost: int = 0  # creates that failed under a kill or stop and were retried
    found_by_retry: int = 0  # retries answered with the task an earlier attempt had committed

    async def run(self, address: str, stop: asyncio.Event) -> None:
        next_number = 0
        async with Raw(address, self.api_key) as raw:
            while not stop.is_set() or self.unacknowledged is not None:
                retry = self.unacknowledged is not None
                key = self.unacknowledged or f"{self.name}-{next_number}"
                if not retry:
                    next_number += 1
                request = tasks_pb2.CreateTaskRequest(
                    content=key, labels=[self.label], idempotency_key=key
                )
                sent_at = now_us()
                self.sent += 1
                try:
                    task = await raw.tasks.CreateTask(
                        request, metadata=raw.metadata, timeout=CALL_TIMEOUT, wait_for_ready=True
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRY_CODES:
                        raise AssertionError(f"create {key}: {exc.code()} {exc.details()}") from exc
                    self.unacknowledged = key
                    self.replies_lost += 1
                    continue
                if retry and task.created_at.ToMicroseconds() < sent_at:
                    self.found_by_retry += 1
                assert task.content == key, f"create {key} answered with task {task.content!r}"
                self.acknowledged[key] = task.id
                self.unacknowledged = None
                self.progress.set()


async def finish(
    address: str, api_key: str, label: str, stop: asyncio.Event, counts: Counter[str]
) -> None:
    """Claims and completes tasks of `label` until `stop`, so that faults also land
    amid claims and completions. A claim lost to a fault runs out its lease (2 s)."""
    request = tasks_pb2.ClaimTaskRequest(
        labels=[label],
        lease=duration_pb2.Duration(seconds=2),
        wait=duration_pb2.Duration(nanos=100_000_000),
    )
    async with Raw(address, api_key) as raw:
        while not stop.is_set():
            try:
                claim = await raw.tasks.ClaimTask(
                    request, metadata=raw.metadata, timeout=CALL_TIMEOUT, wait_for_ready=True
                )
                if not claim.HasField("task"):
                    continue
                await raw.tasks.CompleteTask(
                    tasks_pb2.CompleteTaskRequest(id=claim.task.id, lease_token=claim.lease_token),
                    metadata=raw.metadata,
                    timeout=CALL_TIMEOUT,
                    wait_for_ready=True,
                )
                counts["completed"] += 1
            except grpc.aio.AioRpcError as exc:
                # FAILED_PRECONDITION: the lease ran out while the daemon was down.
                if exc.code() not in RETRY_CODES | {grpc.StatusCode.FAILED_PRECONDITION}:
                    raise AssertionError(f"finisher: {exc.code()} {exc.details()}") from exc
                counts["interrupted"] += 1


@dataclass
class Watcher:
    """Follows `label` from `after_seq`, reconnecting from its last seq whenever the stream drops.

    Asserts as it goes that seqs only grow; records every event as (seq, type, task id).
    """

    label: str
    after_seq: int
    received: list[Logged] = field(default_factory=list)
    reconnects: int = 0
    target: int | None = None
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    # Set on every event: cleared by a test to see the stream is live again.
    fresh: asyncio.Event = field(default_factory=asyncio.Event)
    ended_with: Counter[str] = field(default_factory=Counter)

    @property
    def last(self) -> int:
        return self.received[-1][0] if self.received else self.after_seq

    def wait_for(self, seq: int) -> None:
        self.target = seq
        if self.last >= seq:
            self.caught_up.set()

    async def run(self, address: str, api_key: str) -> None:
        async with Raw(address, api_key) as raw:
            while True:  # until cancelled by the test
                call = raw.tasks.WatchTasks(
                    tasks_pb2.WatchTasksRequest(labels=[self.label], after_seq=self.last),
                    metadata=raw.metadata,
                    wait_for_ready=True,
                )
                try:
                    async for event in call:
                        assert event.seq > self.last, f"seq {event.seq} after {self.last}"
                        self.received.append((event.seq, int(event.type), event.task.id))
                        self.fresh.set()
                        if self.target is not None and event.seq >= self.target:
                            self.caught_up.set()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRY_CODES:
                        raise AssertionError(f"watch: {exc.code()} {exc.details()}") from exc
                    self.reconnects += 1
                    self.ended_with[exc.code().name] += 1
                finally:
                    call.cancel()


async def progressed(
    progress: asyncio.Event, workers: list[asyncio.Task[None]], timeout: float
) -> None:
    """Waits for `progress` to be set; raises at once what made a worker fail instead,
    rather than waiting out `timeout` for progress that cannot come."""
    waiting = asyncio.create_task(progress.wait())
    either: list[asyncio.Future[Any]] = [waiting, *workers]
    try:
        done, _ = await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    for worker in workers:
        if worker.done():
            worker.result()  # raises the worker's failure
    if waiting not in done:
        raise TimeoutError(f"no progress within {timeout} s")
