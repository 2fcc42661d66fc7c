"""No task, every field at its limit, can outgrow a message on its own.

The per-field limits add up below the message limit (checked here and when
`limits` is imported), the size estimate that cuts pages is an upper bound of
a task's wire size, and a task at every limit lives its whole life on a daemon.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import keyed_channel, next_event, watch_task
from google.protobuf import struct_pb2
from legato.client import AsyncClient, EventType, TaskStatus
from legato.server import agents, convert, daemon, lifecycle, limits, model, tasks
from legato.server.daemon import Daemon
from legato.server.model import Status, TaskRecord, task_size
from legato.v1 import tasks_pb2, tasks_pb2_grpc

# The last microsecond a Timestamp holds (year 9999).
MAX_TIME_US = 253402300799_999_999

# Room for a whole message each way on the raw test channels.
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
]


def struct_bytes(value: dict[str, Any]) -> bytes:
    request = tasks_pb2.CreateTaskRequest()
    request.context.update(value)
    return convert.struct_bytes(request, "context")


def struct_of_size(size: int) -> dict[str, Any]:
    """A context whose deterministic serialization is exactly `size` bytes."""
    filler = size
    while True:
        value = {"blob": "x" * filler}
        message = struct_pb2.Struct()
        message.update(value)
        got = len(message.SerializeToString(deterministic=True))
        if got == size:
            return value
        filler -= got - size


@pytest.fixture
async def raw_stub(daemon: Daemon, agent_key: Any) -> AsyncIterator[Any]:
    """`raw_stub(key)`: a TaskService stub on a channel of its own for the key."""
    channels: list[grpc.aio.Channel] = []

    def open_stub(key: str) -> tasks_pb2_grpc.TaskServiceStub:
        channel = keyed_channel(daemon.config.address, key, MESSAGE_OPTIONS)
        channels.append(channel)
        return tasks_pb2_grpc.TaskServiceStub(channel)

    yield open_stub
    for channel in channels:
        await channel.close()


# -- no task outgrows a message ---------------------------------------------------------


def largest_task() -> tuple[TaskRecord, str]:
    """A task with every field at its limit, and an output at its limit."""
    blob = struct_bytes(struct_of_size(limits.MAX_BLOB_BYTES))
    assert len(blob) == limits.MAX_BLOB_BYTES
    wide = "\U0001f600"  # 4 bytes in UTF-8
    task = TaskRecord(
        id="t_" + "i" * (limits.MAX_ID_LENGTH - 2),
        content=wide * (limits.MAX_CONTENT_BYTES // 4),
        labels=tuple(f"@{i:02d}" + "l" * (limits.MAX_LABEL_BYTES - 3) for i in range(16)),
        context=blob,
        created_by="c" * limits.MAX_NAME_BYTES,
        created_at=MAX_TIME_US,
        max_attempts=limits.MAX_MAX_ATTEMPTS,
        parent_id="p" * limits.MAX_ID_LENGTH,
        root_id="r" * limits.MAX_ID_LENGTH,
        idempotency_key="k" * limits.MAX_IDEMPOTENCY_KEY,
        status=Status.INPUT_REQUIRED,
        result=blob,
        error="e" * limits.MAX_ERROR_BYTES,
        claimed_by="w" * limits.MAX_NAME_BYTES,
        attempt=2**31 - 1,
        version=2**63 - 1,
        updated_at=MAX_TIME_US,
        lease_expires_at=MAX_TIME_US,
        depth=8,
        deadline=MAX_TIME_US,
        output_size=2**63 - 1,
        question=wide * (limits.MAX_TEXT_BYTES // 4),
        answer="a" * limits.MAX_TEXT_BYTES,
        released=2**31 - 1,
    )
    return task, "o" * limits.MAX_OUTPUT_BYTES


def test_the_field_limits_add_up_below_the_message_limit() -> None:
    assert limits.MAX_TASK_BYTES < limits.MAX_MESSAGE_BYTES
    assert limits.PAGE_BUDGET_BYTES < limits.MAX_MESSAGE_BYTES
    # The limits the sum counts are the ones enforced elsewhere.
    assert lifecycle.MAX_OUTPUT_BYTES <= limits.MAX_OUTPUT_BYTES
    assert tasks.MAX_CHUNK_BYTES <= limits.MAX_OUTPUT_BYTES
    assert agents.NAME_RE.fullmatch("n" * limits.MAX_NAME_BYTES)
    assert not agents.NAME_RE.fullmatch("n" * (limits.MAX_NAME_BYTES + 1))
    assert limits.LABEL_RE.fullmatch("@" + "l" * (limits.MAX_LABEL_BYTES - 1))
    assert not limits.LABEL_RE.fullmatch("@" + "l" * limits.MAX_LABEL_BYTES)
    # The daemon sends and receives messages of exactly that limit.
    options = dict(daemon.GRPC_OPTIONS)
    assert options["grpc.max_send_message_length"] == limits.MAX_MESSAGE_BYTES
    assert options["grpc.max_receive_message_length"] == limits.MAX_MESSAGE_BYTES


def test_the_size_estimate_bounds_the_largest_task_on_the_wire() -> None:
    task, output = largest_task()
    message = convert.task_proto(task)
    message.output = output
    # As the one task of a response, with its field's tag and length.
    wire = tasks_pb2.GetTaskTreeResponse(tasks=[message]).ByteSize()
    assert wire <= task_size(task, output) <= limits.MAX_TASK_BYTES < limits.MAX_MESSAGE_BYTES


SMALL_TASK = TaskRecord(
    id="t_a", content="x", labels=("@a",), context=b"", created_by="a", created_at=0, max_attempts=3
)
MIXED_TASK = TaskRecord(
    id="t_" + "b" * 22,
    content="é" * 30_000 + "\U0001f600" * 500,
    labels=("@a", "@bb"),
    context=struct_bytes({"a": 1}),
    created_by="agent-b",
    created_at=1_700_000_000_000_000,
    max_attempts=100,
    parent_id="t_" + "c" * 22,
    root_id="t_" + "d" * 22,
    status=Status.DONE,
    result=struct_bytes({f"k{i}": i for i in range(1000)}),
    claimed_by="worker",
    attempt=7,
    version=99,
    updated_at=2**50,
    depth=8,
    deadline=MAX_TIME_US,
    output_size=123_456,
    question="?" * 8000,
    answer="ä" * 4000,
    released=3,
)


@pytest.mark.parametrize("task", [SMALL_TASK, MIXED_TASK], ids=["small", "mixed"])
def test_the_size_estimate_bounds_any_task_on_the_wire(task: TaskRecord) -> None:
    wire = tasks_pb2.ListTasksResponse(tasks=[convert.task_proto(task)]).ByteSize()
    assert wire <= model.task_size(task)


async def test_a_task_with_every_field_at_its_limit_lives_its_whole_life(
    daemon: Daemon, admin: AsyncClient, raw_stub: Any
) -> None:
    wide_label = "@w" + "w" * (limits.MAX_LABEL_BYTES - 2)
    labels = [wide_label] + [f"@l{i:02d}" + "l" * (limits.MAX_LABEL_BYTES - 4) for i in range(15)]
    _, creator_key = await admin.create_agent("c" * limits.MAX_NAME_BYTES, labels=["@creator"])
    _, worker_key = await admin.create_agent("w" * limits.MAX_NAME_BYTES, labels=[wide_label])
    creator = raw_stub(creator_key)
    worker = raw_stub(worker_key)
    blob = struct_of_size(limits.MAX_BLOB_BYTES)
    text = "q" * limits.MAX_TEXT_BYTES
    ids = []
    async with AsyncClient(daemon.config.address, api_key=creator_key, timeout=30) as client:
        for i in range(2):  # two: a listing of both passes a message; its pages must not
            request = tasks_pb2.CreateTaskRequest(
                content=str(i) * limits.MAX_CONTENT_BYTES,
                labels=labels,
                idempotency_key=str(i) * limits.MAX_IDEMPOTENCY_KEY,
            )
            request.context.update(blob)
            created = await creator.CreateTask(request)
            assert created.context.ByteSize() == limits.MAX_BLOB_BYTES
            ids.append(created.id)
            events = watch_task(client, created.id)
            claim = await worker.ClaimTask(tasks_pb2.ClaimTaskRequest(id=created.id))
            await worker.FailTask(
                tasks_pb2.FailTaskRequest(
                    id=created.id, lease_token=claim.lease_token, error=text, retryable=True
                )
            )
            requeued = await next_event(events, EventType.REQUEUED)
            assert requeued.task.error == text
            claim = await worker.ClaimTask(tasks_pb2.ClaimTaskRequest(id=created.id))
            await worker.RequestInput(
                tasks_pb2.RequestInputRequest(
                    id=created.id, lease_token=claim.lease_token, question=text
                )
            )
            await creator.ProvideInput(tasks_pb2.ProvideInputRequest(id=created.id, answer=text))
            chunk = "o" * tasks.MAX_CHUNK_BYTES
            for _ in range(limits.MAX_OUTPUT_BYTES // len(chunk)):
                await worker.AppendOutput(
                    tasks_pb2.AppendOutputRequest(
                        id=created.id, lease_token=claim.lease_token, text=chunk
                    )
                )
            complete = tasks_pb2.CompleteTaskRequest(id=created.id, lease_token=claim.lease_token)
            complete.result.update(blob)
            await worker.CompleteTask(complete)
            done = await next_event(events, EventType.COMPLETED)
            assert done.task.status is TaskStatus.DONE
            assert done.task.result == blob  # an event carries what changed
            await events.aclose()

            got = await creator.GetTask(tasks_pb2.GetTaskRequest(id=created.id))
            assert len(got.output) == limits.MAX_OUTPUT_BYTES
            assert got.result.ByteSize() == limits.MAX_BLOB_BYTES
            assert (got.question, got.answer) == (text, text)
            assert got.ByteSize() > 3 * limits.MAX_BLOB_BYTES

        listed: list[str] = []
        token, pages = "", 0
        while True:
            page = await client.list_tasks(page_token=token)
            listed.extend(t.id for t in page.tasks)
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert listed == ids and pages == 2
        # The whole history replays, one large event at a time.
        replayed = [e.type async for e in _history(client, ids[1])]
        assert replayed[0] is EventType.CREATED and replayed[-1] is EventType.COMPLETED


async def _history(client: AsyncClient, task_id: str) -> AsyncIterator[Any]:
    async for event in watch_task(client, task_id):
        yield event
        if event.task.status.terminal:
            return
