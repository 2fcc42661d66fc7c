"""Events say what changed, not the whole task again; replay rebuilds the same state.

Each test drives a real daemon (temp unix socket, temp SQLite file) through
the raw stubs where the bytes on the wire are the subject.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import pytest
from conftest import EVENT_GUARD, claim_raw
from google.protobuf import duration_pb2, struct_pb2
from legato.client import AsyncClient, EventType, TaskEvent
from legato.server.daemon import Daemon
from legato.v1 import tasks_pb2, tasks_pb2_grpc

AgentKey = Callable[..., Awaitable[str]]
if TYPE_CHECKING:
    Stub = tasks_pb2_grpc.TaskServiceAsyncStub

BIG = 900_000  # bytes of context: five of these made a single list page break 4 MiB
LABEL = "@researcher"


def big_context(size: int = BIG) -> struct_pb2.Struct:
    context = struct_pb2.Struct()
    context.update({"blob": "x" * size})
    return context


async def stored_events(stub: Stub, task_id: str, after_seq: int = 0) -> list[tasks_pb2.TaskEvent]:
    """The task's events after `after_seq`, replayed from the store, up to the terminal one."""
    events: list[tasks_pb2.TaskEvent] = []
    call = stub.WatchTasks(tasks_pb2.WatchTasksRequest(task_ids=[task_id], after_seq=after_seq))

    async def read() -> None:
        async for event in call:
            events.append(event)
            if event.task.status in TERMINAL:
                return

    try:
        await asyncio.wait_for(read(), EVENT_GUARD)
    finally:
        call.cancel()
    return events


TERMINAL = (
    tasks_pb2.TASK_STATUS_DONE,
    tasks_pb2.TASK_STATUS_FAILED,
    tasks_pb2.TASK_STATUS_CANCELED,
)


async def test_output_events_of_a_task_with_a_large_context_cost_what_changed(
    raw_pair: tuple[Stub, Stub],
) -> None:
    coder, researcher = raw_pair
    task = await coder.CreateTask(
        tasks_pb2.CreateTaskRequest(content="read this", labels=[LABEL], context=big_context())
    )
    job = await claim_raw(researcher)
    for n in range(50):
        await researcher.AppendOutput(
            tasks_pb2.AppendOutputRequest(id=task.id, lease_token=job.lease_token, text=f"{n} ")
        )
    result = struct_pb2.Struct()
    result.update({"answer": 42})
    await researcher.CompleteTask(
        tasks_pb2.CompleteTaskRequest(id=task.id, lease_token=job.lease_token, result=result)
    )

    events = await stored_events(coder, task.id)
    created, *changes = events
    assert created.type == tasks_pb2.TASK_EVENT_TYPE_CREATED
    assert created.task.context == big_context()  # the whole task, once
    assert len(changes) == 52  # claimed, 50 chunks, completed
    assert max(event.ByteSize() for event in changes) < 1024
    assert all(not event.task.HasField("context") and not event.task.content for event in changes)
    assert changes[-1].task.result["answer"] == 42  # the result rides on COMPLETED


async def test_heartbeats_extend_the_lease_and_record_no_event(
    raw_pair: tuple[Stub, Stub],
) -> None:
    coder, researcher = raw_pair
    task = await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="long", labels=[LABEL]))
    job = await claim_raw(researcher)
    first_lease = job.task.lease_expires_at.ToMicroseconds()
    for _ in range(20):
        beat = await researcher.Heartbeat(
            tasks_pb2.HeartbeatRequest(
                id=task.id, lease_token=job.lease_token, lease=duration_pb2.Duration(seconds=600)
            )
        )
        assert not beat.cancel_requested
    held = await coder.GetTask(tasks_pb2.GetTaskRequest(id=task.id))
    assert held.lease_expires_at.ToMicroseconds() > first_lease  # moved by the heartbeats
    assert held.version == job.task.version  # ...which are no change anyone watches

    history = await coder.ListTaskEvents(tasks_pb2.ListTaskEventsRequest(id=task.id))
    assert [e.type for e in history.events] == [
        tasks_pb2.TASK_EVENT_TYPE_CREATED,
        tasks_pb2.TASK_EVENT_TYPE_CLAIMED,
    ]


async def test_a_watcher_that_stops_reading_is_cut_off_by_bytes_not_only_by_count(
    raw_pair: tuple[Stub, Stub], daemon: Daemon
) -> None:
    """40 creates with 1 MiB contexts are 40 events, far below the 10,000-event
    buffer, but 40 MiB: the watcher is cut off before they pin that much."""
    coder, _ = raw_pair
    assert daemon.tasks is not None
    stalled = coder.WatchTasks(tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=0))
    await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="first", labels=[LABEL]))
    first = await asyncio.wait_for(stalled.read(), EVENT_GUARD)  # the stream is live
    assert isinstance(first, tasks_pb2.TaskEvent)
    ids = [first.task.id]
    for n in range(40):
        created = await coder.CreateTask(
            tasks_pb2.CreateTaskRequest(
                content=f"big {n}", labels=[LABEL], context=big_context(1_000_000)
            )
        )
        ids.append(created.id)

    # Reading now drains what gRPC had in flight, then the cut-off.
    seen = [first.task.id]

    async def drain() -> None:
        while True:
            event = await asyncio.wait_for(stalled.read(), EVENT_GUARD)
            assert isinstance(event, tasks_pb2.TaskEvent), "the stream ended without the cut-off"
            seen.append(event.task.id)

    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await drain()
    assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "after_seq" in (cut.value.details() or "")
    assert len(seen) < len(ids)

    # Resuming from the last seq received loses nothing.
    resumed = coder.WatchTasks(
        tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=event_seq_of(seen, first))
    )
    try:
        while len(seen) < len(ids):
            event = await asyncio.wait_for(resumed.read(), EVENT_GUARD)
            assert isinstance(event, tasks_pb2.TaskEvent)
            seen.append(event.task.id)
    finally:
        resumed.cancel()
    assert seen == ids


def event_seq_of(seen: list[str], first: tasks_pb2.TaskEvent) -> int:
    # One CREATED event per task, committed one after another: seqs follow on.
    return first.seq + len(seen) - 1


async def test_replay_from_any_seq_sends_exactly_the_live_events(
    raw_pair: tuple[Stub, Stub],
) -> None:
    """A watcher resuming from any cursor receives byte for byte what a live one did."""
    coder, researcher = raw_pair
    # From a cursor, so the stream cannot start after the first create and miss it.
    start = (await coder.GetCursor(tasks_pb2.GetCursorRequest())).cursor
    live = coder.WatchTasks(tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=start))
    task = await coder.CreateTask(
        tasks_pb2.CreateTaskRequest(
            content="story", labels=[LABEL], context=big_context(10_000), max_attempts=3
        )
    )
    job = await claim_raw(researcher)
    await researcher.AppendOutput(
        tasks_pb2.AppendOutputRequest(id=task.id, lease_token=job.lease_token, text="first try")
    )
    await researcher.FailTask(
        tasks_pb2.FailTaskRequest(
            id=task.id, lease_token=job.lease_token, error="flaky", retryable=True
        )
    )
    job = await claim_raw(researcher)
    await researcher.RequestInput(
        tasks_pb2.RequestInputRequest(id=task.id, lease_token=job.lease_token, question="which?")
    )
    await coder.ProvideInput(tasks_pb2.ProvideInputRequest(id=task.id, answer="that one"))
    await researcher.ReleaseTask(
        tasks_pb2.ReleaseTaskRequest(id=task.id, lease_token=job.lease_token, reason="stopping")
    )
    job = await claim_raw(researcher)
    await researcher.AppendOutput(
        tasks_pb2.AppendOutputRequest(id=task.id, lease_token=job.lease_token, text="done it")
    )
    await researcher.CompleteTask(
        tasks_pb2.CompleteTaskRequest(id=task.id, lease_token=job.lease_token)
    )

    received: list[bytes] = []
    try:
        while len(received) < 11:
            event = await asyncio.wait_for(live.read(), EVENT_GUARD)
            assert isinstance(event, tasks_pb2.TaskEvent)
            received.append(event.SerializeToString())
    finally:
        live.cancel()
    seqs = [tasks_pb2.TaskEvent.FromString(e).seq for e in received]
    for n, cursor in enumerate([0, *seqs[:-1]]):
        replayed = await stored_events(coder, task.id, after_seq=cursor)
        assert [e.SerializeToString() for e in replayed] == received[n:], f"from seq {cursor}"


async def test_folding_a_tasks_events_rebuilds_the_stored_task(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    handle = await coder.delegate("@researcher", "fold me", context={"k": "v" * 1000})
    job = await researcher.claim(lease=60)
    assert job is not None
    await job.write("partial")
    await job.fail("try again", retryable=True)
    job = await researcher.claim(lease=60)
    assert job is not None
    await job.write("whole ")
    await job.write("answer")
    asking = asyncio.create_task(job.ask("which tier?"))
    events: list[TaskEvent] = []
    async for event in handle.events(timeout=EVENT_GUARD):
        events.append(event)
        if event.type is EventType.INPUT_REQUESTED:
            await handle.answer("tier 1")
        if event.type is EventType.INPUT_PROVIDED:
            assert await asking == "tier 1"
            await job.complete({"tier": 1})
    folded = events[-1].task
    stored = await coder.get_task(handle.id)
    assert folded.content == "fold me" and folded.context == {"k": "v" * 1000}
    assert (folded.result, folded.question, folded.answer) == ({"tier": 1}, "which tier?", "tier 1")
    assert (folded.status, folded.attempt, folded.version) == (
        stored.status,
        stored.attempt,
        stored.version,
    )
    assert folded.error == stored.error and folded.output_size == stored.output_size
