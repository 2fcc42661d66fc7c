"""Handing a task back is not a failure; each attempt's output stands on its own.

Real daemon, temp unix socket, temp SQLite file; raw stubs where the RPC
itself is the subject.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import pytest
from conftest import claim_raw, keyed_channel
from google.protobuf import duration_pb2
from legato.client import AsyncClient, TaskStatus
from legato.server.daemon import Daemon
from legato.v1 import tasks_pb2, tasks_pb2_grpc

AgentKey = Callable[..., Awaitable[str]]
if TYPE_CHECKING:
    Stub = tasks_pb2_grpc.TaskServiceAsyncStub
LABEL = "@researcher"


async def test_releasing_three_times_leaves_the_task_pending_with_its_attempts_unused(
    raw_pair: tuple[Stub, Stub],
) -> None:
    """As Ctrl-C of `legato work` three times did: with max_attempts 1, one
    release used to be enough to fail the task for good."""
    coder, researcher = raw_pair
    task = await coder.CreateTask(
        tasks_pb2.CreateTaskRequest(content="fragile", labels=[LABEL], max_attempts=1)
    )
    for n in range(3):
        job = await claim_raw(researcher)
        released = await researcher.ReleaseTask(
            tasks_pb2.ReleaseTaskRequest(
                id=task.id, lease_token=job.lease_token, reason="worker stopped"
            )
        )
        assert released.status == tasks_pb2.TASK_STATUS_PENDING
        assert (released.attempt, released.released) == (n + 2, n + 1)
        assert released.error == "worker stopped"

    # A real failure still counts: the one attempt this task has.
    job = await claim_raw(researcher)
    failed = await researcher.FailTask(
        tasks_pb2.FailTaskRequest(
            id=task.id, lease_token=job.lease_token, error="x", retryable=True
        )
    )
    assert failed.status == tasks_pb2.TASK_STATUS_FAILED

    history = await coder.ListTaskEvents(tasks_pb2.ListTaskEventsRequest(id=task.id))
    types = [e.type for e in history.events]
    assert types.count(tasks_pb2.TASK_EVENT_TYPE_RELEASED) == 3
    assert all(e.actor == "researcher" for e in history.events[1:])


async def test_only_the_claimant_with_its_current_token_may_release(
    raw_pair: tuple[Stub, Stub], agent_key: AgentKey, daemon: Daemon
) -> None:
    coder, researcher = raw_pair
    task = await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="mine", labels=[LABEL]))
    job = await claim_raw(researcher)
    rival_key = await agent_key("rival", [LABEL])
    async with keyed_channel(daemon.config.address, rival_key) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tasks_pb2_grpc.TaskServiceStub(channel).ReleaseTask(
                tasks_pb2.ReleaseTaskRequest(id=task.id, lease_token=job.lease_token)
            )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await researcher.ReleaseTask(tasks_pb2.ReleaseTaskRequest(id=task.id, lease_token="l_x"))
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    held = await coder.GetTask(tasks_pb2.GetTaskRequest(id=task.id))
    assert held.status == tasks_pb2.TASK_STATUS_CLAIMED and held.version == job.task.version


async def test_a_wrong_lease_token_says_it_is_not_the_current_one(
    raw_pair: tuple[Stub, Stub],
) -> None:
    coder, researcher = raw_pair
    task = await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="typo", labels=[LABEL]))
    await claim_raw(researcher)
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await researcher.CompleteTask(
            tasks_pb2.CompleteTaskRequest(id=task.id, lease_token="l_not-the-token")
        )
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = wrong.value.details() or ""
    assert "not the current lease token" in details
    assert "stop working" not in details


async def test_each_attempt_has_its_own_output_and_get_task_shows_the_current_one(
    raw_pair: tuple[Stub, Stub], admin: AsyncClient
) -> None:
    coder_stub, researcher = raw_pair
    task = await coder_stub.CreateTask(
        tasks_pb2.CreateTaskRequest(content="write it", labels=[LABEL])
    )
    for text in ("abandoned draft\n", "second draft\n"):
        job = await claim_raw(researcher)
        await researcher.AppendOutput(
            tasks_pb2.AppendOutputRequest(id=task.id, lease_token=job.lease_token, text=text)
        )
        await researcher.ReleaseTask(
            tasks_pb2.ReleaseTaskRequest(id=task.id, lease_token=job.lease_token)
        )
    job = await claim_raw(researcher)
    for text in ("final ", "answer"):
        await researcher.AppendOutput(
            tasks_pb2.AppendOutputRequest(id=task.id, lease_token=job.lease_token, text=text)
        )

    current = await coder_stub.GetTask(tasks_pb2.GetTaskRequest(id=task.id))
    assert (current.output, current.output_size, current.attempt) == ("final answer", 12, 3)

    history = await coder_stub.ListTaskEvents(tasks_pb2.ListTaskEventsRequest(id=task.id))
    chunks = [
        (e.output.attempt, e.output.offset, e.output.text)
        for e in history.events
        if e.type == tasks_pb2.TASK_EVENT_TYPE_OUTPUT
    ]
    assert chunks == [
        (1, 0, "abandoned draft\n"),
        (2, 0, "second draft\n"),
        (3, 0, "final "),
        (3, 6, "answer"),
    ]

    # The client follows the current attempt, not the pile of all of them.
    await researcher.CompleteTask(
        tasks_pb2.CompleteTaskRequest(id=task.id, lease_token=job.lease_token)
    )
    handle = admin.get_handle(task.id)
    assert "".join([text async for text in handle.output(timeout=10)]) == "final answer"


async def test_a_claim_that_commits_after_its_caller_went_away_is_handed_back(
    daemon: Daemon, raw_pair: tuple[Stub, Stub]
) -> None:
    """The caller's deadline or disconnect cancels the handler while its claim is
    on its way to the disk: the claim commits, and nobody will ever use it."""
    coder, _ = raw_pair
    tasks = daemon.tasks
    assert tasks is not None
    task = await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="orphan", labels=[LABEL]))
    caller = tasks.agents.get("researcher")
    claiming = asyncio.create_task(
        tasks.claim(labels=[LABEL], task_id="", lease_us=60_000_000, caller=caller)
    )
    await asyncio.sleep(0)  # let the claim start its write, as a handler would
    claiming.cancel()  # ...and go away, as gRPC does when the caller leaves
    with pytest.raises(asyncio.CancelledError):
        await claiming

    watch = coder.WatchTasks(tasks_pb2.WatchTasksRequest(task_ids=[task.id], after_seq=0))
    types = []
    try:
        async for event in watch:
            types.append(event.type)
            if event.type == tasks_pb2.TASK_EVENT_TYPE_RELEASED:
                assert event.task.status == tasks_pb2.TASK_STATUS_PENDING
                assert "after its caller had gone away" in event.task.error
                break
    finally:
        watch.cancel()
    assert types == [
        tasks_pb2.TASK_EVENT_TYPE_CREATED,
        tasks_pb2.TASK_EVENT_TYPE_CLAIMED,
        tasks_pb2.TASK_EVENT_TYPE_RELEASED,
    ]
    task_now = await coder.GetTask(tasks_pb2.GetTaskRequest(id=task.id))
    assert task_now.released == 1 and TaskStatus.PENDING.proto == task_now.status


async def test_revoking_an_agent_hands_back_the_tasks_it_held(
    raw_pair: tuple[Stub, Stub], admin: AsyncClient, agent_key: AgentKey, daemon: Daemon
) -> None:
    """A revoked agent can never finish what it holds: waiting out its lease
    (up to 24 h) would stall those tasks for nothing."""
    coder, researcher = raw_pair
    working = await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="one", labels=[LABEL]))
    asking = await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="two", labels=[LABEL]))
    first, second = await claim_raw(researcher), await claim_raw(researcher)
    await researcher.RequestInput(
        tasks_pb2.RequestInputRequest(id=asking.id, lease_token=second.lease_token, question="?")
    )
    assert {first.task.id, second.task.id} == {working.id, asking.id}

    await admin.revoke_agent("researcher")

    for task_id in (working.id, asking.id):
        task = await coder.GetTask(tasks_pb2.GetTaskRequest(id=task_id))
        assert task.status == tasks_pb2.TASK_STATUS_PENDING
        assert (task.attempt, task.released) == (2, 1)
        assert "researcher was revoked" in task.error
        history = await coder.ListTaskEvents(tasks_pb2.ListTaskEventsRequest(id=task_id))
        assert history.events[-1].type == tasks_pb2.TASK_EVENT_TYPE_RELEASED
        assert history.events[-1].actor == "legato"
    successor_key = await agent_key("successor", [LABEL])
    async with keyed_channel(daemon.config.address, successor_key) as channel:
        taken = await claim_raw(tasks_pb2_grpc.TaskServiceStub(channel))
    assert taken.task.id == working.id


async def test_a_heartbeat_that_shortens_the_lease_ends_it_on_time(
    raw_pair: tuple[Stub, Stub],
) -> None:
    """Heartbeats record no event, so nothing else tells the lease timer."""
    coder, researcher = raw_pair
    task = await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="short", labels=[LABEL]))
    watch = coder.WatchTasks(tasks_pb2.WatchTasksRequest(task_ids=[task.id], after_seq=0))
    job = await claim_raw(researcher)  # a 60 s lease...
    await researcher.Heartbeat(  # ...cut to 0.2 s
        tasks_pb2.HeartbeatRequest(
            id=task.id, lease_token=job.lease_token, lease=duration_pb2.Duration(nanos=200_000_000)
        )
    )
    try:
        async with asyncio.timeout(10):  # far below the first lease's 60 s
            async for event in watch:
                if event.type == tasks_pb2.TASK_EVENT_TYPE_REQUEUED:
                    assert event.actor == "legato" and "expired" in event.task.error
                    break
    finally:
        watch.cancel()


async def test_get_task_output_and_output_size_always_agree_while_chunks_stream(
    raw_pair: tuple[Stub, Stub],
) -> None:
    """The output is read after the task row: a chunk committed in between must
    not show in `output` without being counted in `output_size`."""
    coder, researcher = raw_pair
    task = await coder.CreateTask(tasks_pb2.CreateTaskRequest(content="race", labels=[LABEL]))
    job = await claim_raw(researcher)

    async def write() -> None:
        for n in range(300):
            await researcher.AppendOutput(
                tasks_pb2.AppendOutputRequest(
                    id=task.id, lease_token=job.lease_token, text=f"chunk {n};"
                )
            )

    writer = asyncio.create_task(write())
    disagreements = 0
    reads = 0
    while not writer.done():
        current = await coder.GetTask(tasks_pb2.GetTaskRequest(id=task.id))
        reads += 1
        disagreements += len(current.output.encode()) != current.output_size
    await writer
    assert reads > 10, "the reads did not overlap the writes"
    assert disagreements == 0, f"{disagreements} of {reads} reads disagreed"
