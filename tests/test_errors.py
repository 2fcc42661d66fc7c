"""Refused requests: the exact status, a message that names what to change, and no change.

The table talks to the daemon through the raw stub, so it can send what the
friendly client would refuse before it left the process. The stub calls as the
admin, who sees every task and may claim any label, so each refusal is about
the request itself and not about who sent it.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from inspect import ismodule

import grpc
import legato.client
import pytest
from conftest import keyed_channel
from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import Message
from legato.client import AsyncClient, LegatoError, RPCError
from legato.client.errors import AlreadyExistsError, from_rpc_error
from legato.server.daemon import Daemon
from legato.v1 import tasks_pb2, tasks_pb2_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DENIED = grpc.StatusCode.PERMISSION_DENIED
MISSING_ID = "t_no_such_task"
DAY = 24 * 3600


@dataclass(frozen=True)
class World:
    """The tasks every refused request is aimed at."""

    pending_id: str
    claimed_id: str
    lease_token: str
    # The token of an earlier claim of `claimed_id`, which was requeued and claimed again.
    stale_token: str


@dataclass(frozen=True)
class Snapshot:
    count: int
    cursor: int
    versions: dict[str, int]


@pytest.fixture
async def stub(
    daemon: Daemon, admin_key: str
) -> AsyncIterator[tasks_pb2_grpc.TaskServiceAsyncStub]:
    async with keyed_channel(daemon.config.address, admin_key) as channel:
        yield tasks_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture
async def world(stub: tasks_pb2_grpc.TaskServiceAsyncStub) -> World:
    pending = await stub.CreateTask(
        tasks_pb2.CreateTaskRequest(content="pending work", labels=["@researcher"])
    )
    claimed = await stub.CreateTask(
        tasks_pb2.CreateTaskRequest(content="claimed work", labels=["@reviewer"])
    )
    first = await stub.ClaimTask(tasks_pb2.ClaimTaskRequest(id=claimed.id))
    await stub.FailTask(
        tasks_pb2.FailTaskRequest(
            id=claimed.id, lease_token=first.lease_token, error="flaky", retryable=True
        )
    )
    second = await stub.ClaimTask(tasks_pb2.ClaimTaskRequest(id=claimed.id))
    assert second.task.status == tasks_pb2.TASK_STATUS_CLAIMED
    return World(pending.id, claimed.id, second.lease_token, first.lease_token)


async def snapshot(stub: tasks_pb2_grpc.TaskServiceAsyncStub) -> Snapshot:
    listing = await stub.ListTasks(tasks_pb2.ListTasksRequest(page_size=1000))
    return Snapshot(
        len(listing.tasks), listing.cursor, {task.id: task.version for task in listing.tasks}
    )


def create(**fields: object) -> Callable[[World], Message]:
    """A CreateTaskRequest that is valid except for `fields`."""
    request: dict[str, object] = {"content": "look this up", "labels": ["@researcher"]}
    request.update(fields)
    return lambda world: tasks_pb2.CreateTaskRequest(**request)  # type: ignore[arg-type]


def big_struct(size: int) -> struct_pb2.Struct:
    blob = struct_pb2.Struct()
    blob.update({"blob": "x" * size})
    return blob


def lease(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


def page_token(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@dataclass(frozen=True)
class Refusal:
    rpc: str
    request: Callable[[World], Message]
    code: grpc.StatusCode
    names: str  # what the message must mention so the caller knows what to change


REFUSALS: dict[str, Refusal] = {
    # -- CreateTask -------------------------------------------------------------------
    "empty content": Refusal("CreateTask", create(content=""), INVALID, "content"),
    "blank content": Refusal("CreateTask", create(content=" \n\t "), INVALID, "content"),
    "content over 64 KiB": Refusal(
        "CreateTask", create(content="x" * (64 * 1024 + 1)), INVALID, "content"
    ),
    "content over 64 KiB in UTF-8 bytes": Refusal(
        "CreateTask", create(content="é" * (32 * 1024 + 1)), INVALID, "content"
    ),
    "no labels": Refusal("CreateTask", create(labels=[]), INVALID, "labels"),
    "label without @": Refusal("CreateTask", create(labels=["researcher"]), INVALID, "labels"),
    "bare @": Refusal("CreateTask", create(labels=["@"]), INVALID, "labels"),
    "upper-case label": Refusal("CreateTask", create(labels=["@UPPER"]), INVALID, "labels"),
    "label with a space": Refusal("CreateTask", create(labels=["@a b"]), INVALID, "labels"),
    "label over 63 characters": Refusal(
        "CreateTask", create(labels=["@" + "a" * 64]), INVALID, "labels"
    ),
    "one bad label among good ones": Refusal(
        "CreateTask", create(labels=["@researcher", "@Reviewer"]), INVALID, "labels"
    ),
    "17 labels": Refusal(
        "CreateTask", create(labels=[f"@l{i}" for i in range(17)]), INVALID, "labels"
    ),
    "context over 1 MiB": Refusal(
        "CreateTask", create(context=big_struct(1024 * 1024)), INVALID, "context"
    ),
    "unknown parent_id": Refusal(
        "CreateTask", create(parent_id=MISSING_ID), NOT_FOUND, "parent_id"
    ),
    "max_attempts negative": Refusal(
        "CreateTask", create(max_attempts=-1), INVALID, "max_attempts"
    ),
    "max_attempts over 100": Refusal(
        "CreateTask", create(max_attempts=101), INVALID, "max_attempts"
    ),
    "idempotency_key over 128": Refusal(
        "CreateTask", create(idempotency_key="k" * 129), INVALID, "idempotency_key"
    ),
    # -- unknown task ids -------------------------------------------------------------
    "get unknown id": Refusal(
        "GetTask", lambda w: tasks_pb2.GetTaskRequest(id=MISSING_ID), NOT_FOUND, MISSING_ID
    ),
    "claim unknown id": Refusal(
        "ClaimTask", lambda w: tasks_pb2.ClaimTaskRequest(id=MISSING_ID), NOT_FOUND, MISSING_ID
    ),
    "heartbeat unknown id": Refusal(
        "Heartbeat",
        lambda w: tasks_pb2.HeartbeatRequest(id=MISSING_ID, lease_token=w.lease_token),
        NOT_FOUND,
        MISSING_ID,
    ),
    "complete unknown id": Refusal(
        "CompleteTask",
        lambda w: tasks_pb2.CompleteTaskRequest(id=MISSING_ID, lease_token=w.lease_token),
        NOT_FOUND,
        MISSING_ID,
    ),
    "fail unknown id": Refusal(
        "FailTask",
        lambda w: tasks_pb2.FailTaskRequest(id=MISSING_ID, lease_token=w.lease_token, error="x"),
        NOT_FOUND,
        MISSING_ID,
    ),
    "cancel unknown id": Refusal(
        "CancelTask", lambda w: tasks_pb2.CancelTaskRequest(id=MISSING_ID), NOT_FOUND, MISSING_ID
    ),
    "get without id": Refusal("GetTask", lambda w: tasks_pb2.GetTaskRequest(), INVALID, "id"),
    # -- leases -----------------------------------------------------------------------
    "claim with negative lease": Refusal(
        "ClaimTask",
        lambda w: tasks_pb2.ClaimTaskRequest(labels=["@researcher"], lease=lease(-1)),
        INVALID,
        "lease",
    ),
    "claim with a malformed lease (mixed signs)": Refusal(
        "ClaimTask",
        lambda w: tasks_pb2.ClaimTaskRequest(
            id=w.pending_id, lease=duration_pb2.Duration(seconds=1, nanos=-500)
        ),
        INVALID,
        "lease",
    ),
    "claim with lease over 24h": Refusal(
        "ClaimTask",
        lambda w: tasks_pb2.ClaimTaskRequest(id=w.pending_id, lease=lease(DAY + 1)),
        INVALID,
        "lease",
    ),
    "heartbeat with negative lease": Refusal(
        "Heartbeat",
        lambda w: tasks_pb2.HeartbeatRequest(
            id=w.claimed_id, lease_token=w.lease_token, lease=lease(-1)
        ),
        INVALID,
        "lease",
    ),
    "heartbeat with lease over 24h": Refusal(
        "Heartbeat",
        lambda w: tasks_pb2.HeartbeatRequest(
            id=w.claimed_id, lease_token=w.lease_token, lease=lease(DAY + 1)
        ),
        INVALID,
        "lease",
    ),
    # No labels means "any of mine", and the admin holds none.
    "claim with neither labels nor id": Refusal(
        "ClaimTask", lambda w: tasks_pb2.ClaimTaskRequest(), DENIED, "holds no labels"
    ),
    "claim with a malformed label": Refusal(
        "ClaimTask", lambda w: tasks_pb2.ClaimTaskRequest(labels=["researcher"]), INVALID, "labels"
    ),
    # -- ListTasks --------------------------------------------------------------------
    "page_size negative": Refusal(
        "ListTasks", lambda w: tasks_pb2.ListTasksRequest(page_size=-1), INVALID, "page_size"
    ),
    "page_size over 1000": Refusal(
        "ListTasks", lambda w: tasks_pb2.ListTasksRequest(page_size=1001), INVALID, "page_size"
    ),
    "garbage page_token": Refusal(
        "ListTasks",
        lambda w: tasks_pb2.ListTasksRequest(page_token="not-a-token!"),
        INVALID,
        "page_token",
    ),
    "page_token past any position": Refusal(
        "ListTasks",
        lambda w: tasks_pb2.ListTasksRequest(page_token=page_token("p" + "9" * 30)),
        INVALID,
        "page_token",
    ),
    "unknown status 99": Refusal(
        "ListTasks",
        lambda w: tasks_pb2.ListTasksRequest(statuses=[tasks_pb2.TaskStatus.ValueType(99)]),
        INVALID,
        "statuses",
    ),
    "status UNSPECIFIED": Refusal(
        "ListTasks",
        lambda w: tasks_pb2.ListTasksRequest(statuses=[tasks_pb2.TASK_STATUS_UNSPECIFIED]),
        INVALID,
        "statuses",
    ),
    "list with a malformed label": Refusal(
        "ListTasks", lambda w: tasks_pb2.ListTasksRequest(labels=["@a b"]), INVALID, "labels"
    ),
    # -- finishing --------------------------------------------------------------------
    "fail with empty error": Refusal(
        "FailTask",
        lambda w: tasks_pb2.FailTaskRequest(id=w.claimed_id, lease_token=w.lease_token, error=""),
        INVALID,
        "error",
    ),
    "fail with error over 8 KiB": Refusal(
        "FailTask",
        lambda w: tasks_pb2.FailTaskRequest(
            id=w.claimed_id, lease_token=w.lease_token, error="e" * (8 * 1024 + 1)
        ),
        INVALID,
        "error",
    ),
    "complete with result over 1 MiB": Refusal(
        "CompleteTask",
        lambda w: tasks_pb2.CompleteTaskRequest(
            id=w.claimed_id, lease_token=w.lease_token, result=big_struct(1024 * 1024)
        ),
        INVALID,
        "result",
    ),
    "cancel with reason over 8 KiB": Refusal(
        "CancelTask",
        lambda w: tasks_pb2.CancelTaskRequest(id=w.pending_id, reason="r" * (8 * 1024 + 1)),
        INVALID,
        "reason",
    ),
    # -- WatchTasks -------------------------------------------------------------------
    "watch with negative after_seq": Refusal(
        "WatchTasks",
        lambda w: tasks_pb2.WatchTasksRequest(labels=["@researcher"], after_seq=-1),
        INVALID,
        "after_seq",
    ),
    "watch with over 1000 task ids": Refusal(
        "WatchTasks",
        lambda w: tasks_pb2.WatchTasksRequest(task_ids=[f"t_{i}" for i in range(1001)]),
        INVALID,
        "task_ids",
    ),
    # -- leases that do not hold the task ---------------------------------------------
    "complete with a stale lease token": Refusal(
        "CompleteTask",
        lambda w: tasks_pb2.CompleteTaskRequest(id=w.claimed_id, lease_token=w.stale_token),
        PRECONDITION,
        "lease_token",
    ),
    "heartbeat with a stale lease token": Refusal(
        "Heartbeat",
        lambda w: tasks_pb2.HeartbeatRequest(id=w.claimed_id, lease_token=w.stale_token),
        PRECONDITION,
        "lease_token",
    ),
    "fail with a made-up lease token": Refusal(
        "FailTask",
        lambda w: tasks_pb2.FailTaskRequest(id=w.claimed_id, lease_token="l_guess", error="x"),
        PRECONDITION,
        "lease_token",
    ),
    "complete a pending task": Refusal(
        "CompleteTask",
        lambda w: tasks_pb2.CompleteTaskRequest(id=w.pending_id, lease_token=w.lease_token),
        PRECONDITION,
        "PENDING",
    ),
    "claim a claimed task": Refusal(
        "ClaimTask", lambda w: tasks_pb2.ClaimTaskRequest(id=w.claimed_id), PRECONDITION, "CLAIMED"
    ),
}


async def send(stub: tasks_pb2_grpc.TaskServiceAsyncStub, rpc: str, request: Message) -> None:
    method = getattr(stub, rpc)
    if rpc == "WatchTasks":
        # A watch that is (wrongly) accepted would stream forever: the deadline
        # turns that into a wrong status code instead of a hang.
        async for _ in method(request, timeout=5):
            return
    else:
        await method(request, timeout=5)


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
async def test_refused_request_names_the_field_and_changes_nothing(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub, world: World, refusal: Refusal
) -> None:
    before = await snapshot(stub)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await send(stub, refusal.rpc, refusal.request(world))

    assert raised.value.code() == refusal.code, raised.value.details()
    assert refusal.names in (raised.value.details() or "")
    assert await snapshot(stub) == before
    # The daemon keeps serving after the refusal.
    created = await stub.CreateTask(
        tasks_pb2.CreateTaskRequest(content="still serving?", labels=["@researcher"])
    )
    assert created.status == tasks_pb2.TASK_STATUS_PENDING


async def test_the_limits_themselves_are_accepted(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub, world: World
) -> None:
    task = await stub.CreateTask(
        tasks_pb2.CreateTaskRequest(
            content="x" * (64 * 1024),
            labels=[f"@l{i}" for i in range(16)],
            max_attempts=100,
            idempotency_key="k" * 128,
            parent_id=world.pending_id,
        )
    )
    assert task.parent_id == world.pending_id and task.max_attempts == 100
    claimed = await stub.ClaimTask(tasks_pb2.ClaimTaskRequest(id=task.id, lease=lease(DAY)))
    assert claimed.task.status == tasks_pb2.TASK_STATUS_CLAIMED
    listing = await stub.ListTasks(tasks_pb2.ListTasksRequest(page_size=1000))
    assert len(listing.tasks) == 3 and listing.next_page_token == ""


# -- idempotent create -----------------------------------------------------------------


async def test_repeated_create_with_the_same_key_returns_the_original_task(
    coder: AsyncClient,
) -> None:
    first = await coder.create_task(
        "current RPM for Tier 1?",
        labels=["@researcher"],
        context={"tier": 1, "api": "anthropic"},
        idempotency_key="rpm-question",
    )
    before = await coder.list_tasks()

    again = await coder.create_task(
        "current RPM for Tier 1?",
        labels=["@researcher"],
        context={"api": "anthropic", "tier": 1},  # same mapping, other key order
        idempotency_key="rpm-question",
    )

    after = await coder.list_tasks()
    assert again.id == first.id
    assert [t.id for t in after.tasks] == [first.id]
    assert after.cursor == before.cursor  # no second CREATED event


DIFFERENT_REQUESTS: dict[str, dict[str, object]] = {
    "content": {"content": "a different question"},
    "labels": {"labels": ["@reviewer"]},
    "context": {"context": {"tier": 2}},
    "max_attempts": {"max_attempts": 7},
}


@pytest.mark.parametrize("changed", DIFFERENT_REQUESTS.values(), ids=DIFFERENT_REQUESTS.keys())
async def test_same_key_for_a_different_request_is_already_exists(
    coder: AsyncClient, changed: dict[str, object]
) -> None:
    request: dict[str, object] = {
        "content": "current RPM for Tier 1?",
        "labels": ["@researcher"],
        "context": {"tier": 1},
        "max_attempts": 0,
    }
    original = await coder.create_task(idempotency_key="k-1", **request)  # type: ignore[arg-type]
    before = await coder.list_tasks()

    with pytest.raises(AlreadyExistsError) as raised:
        await coder.create_task(idempotency_key="k-1", **{**request, **changed})  # type: ignore[arg-type]

    assert raised.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key" in raised.value.message and original.id in raised.value.message
    after = await coder.list_tasks()
    assert ([t.id for t in after.tasks], after.cursor) == ([original.id], before.cursor)


async def test_the_same_key_from_another_agent_is_another_task(
    coder: AsyncClient, researcher: AsyncClient, admin: AsyncClient
) -> None:
    mine = await coder.create_task("summarise RFC 9113", labels=["@x"], idempotency_key="k")
    theirs = await researcher.create_task("summarise RFC 9113", labels=["@x"], idempotency_key="k")

    assert mine.id != theirs.id
    tasks = (await admin.list_tasks()).tasks
    assert {(t.id, t.created_by) for t in tasks} == {(mine.id, "coder"), (theirs.id, "researcher")}
    # Each agent sees its own task only (neither holds @x), and a repeat by
    # either returns that agent's own task.
    assert [t.id for t in (await coder.list_tasks()).tasks] == [mine.id]
    assert [t.id for t in (await researcher.list_tasks()).tasks] == [theirs.id]
    again = await researcher.create_task("summarise RFC 9113", labels=["@x"], idempotency_key="k")
    assert again.id == theirs.id
    assert len((await admin.list_tasks()).tasks) == 2


# -- the client's error tree -------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    """Stands in for grpc's error object: only code() and details() are read."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


FAILURE_CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]


@pytest.mark.parametrize("code", FAILURE_CODES, ids=[c.name for c in FAILURE_CODES])
def test_every_status_code_maps_to_its_own_rpc_error(code: grpc.StatusCode) -> None:
    error = from_rpc_error(FakeRpcError(code, "what went wrong"))

    assert isinstance(error, RPCError) and isinstance(error, LegatoError)
    assert type(error) is not RPCError
    assert type(error).code is code and error.code is code
    assert "what went wrong" in str(error)


def test_no_two_status_codes_share_an_error_class() -> None:
    classes = {type(from_rpc_error(FakeRpcError(code, ""))) for code in FAILURE_CODES}
    assert len(classes) == len(FAILURE_CODES)


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(legato.client).items()
        if not name.startswith("_") and not ismodule(value)
    }
    assert len(legato.client.__all__) == len(set(legato.client.__all__))
    assert set(legato.client.__all__) == public
    for name in legato.client.__all__:
        assert getattr(legato.client, name) is not None
