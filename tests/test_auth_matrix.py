"""Every RPC by every kind of caller: the exact status code, and a refusal changes nothing.

The world of each case: `coder` (@coder) created task T for @researcher,
`researcher` claimed it (lease token L); `outsider` (@outsider) created task O
for @outsider; `gone` was revoked; `rotated` had its key replaced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from legato.client import AsyncClient
from legato.server.daemon import Daemon
from legato.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2, tasks_pb2_grpc

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# A well-formed key no agent has.
UNKNOWN_KEY = "lgt_0123456789ab_" + "A" * 43


@dataclass
class World:
    keys: dict[str, str]
    task_id: str
    outsider_task_id: str
    lease_token: str


@pytest.fixture
async def world(daemon: Daemon, admin: AsyncClient, admin_key: str) -> World:
    keys = {"admin": admin_key}
    for name in ("coder", "researcher", "outsider", "gone", "rotated"):
        _, keys[name] = await admin.create_agent(name, labels=[f"@{name}"])
    await admin.revoke_agent("gone")
    keys["rotated-away"] = keys.pop("rotated")
    await admin.rotate_key("rotated")

    async with (
        AsyncClient(daemon.config.address, api_key=keys["coder"]) as coder,
        AsyncClient(daemon.config.address, api_key=keys["researcher"]) as researcher,
        AsyncClient(daemon.config.address, api_key=keys["outsider"]) as outsider,
    ):
        task = await coder.create_task("what is the Tier 1 limit?", labels=["@researcher"])
        job = await researcher.claim(["@researcher"])
        assert job is not None
        own = await outsider.create_task("outsider's own work", labels=["@outsider"])
    return World(keys, task.id, own.id, job.lease_token)


# Who calls: a key, or a way of sending a bad one.
CALLERS: dict[str, Callable[[World], tuple[tuple[str, str], ...]]] = {
    "no key": lambda w: (),
    "malformed key": lambda w: (("authorization", "Bearer not-a-legato-key"),),
    "unknown key": lambda w: (("authorization", f"Bearer {UNKNOWN_KEY}"),),
    "revoked key": lambda w: (("authorization", f"Bearer {w.keys['gone']}"),),
    "rotated-away key": lambda w: (("authorization", f"Bearer {w.keys['rotated-away']}"),),
    "outsider": lambda w: (("authorization", f"Bearer {w.keys['outsider']}"),),
    "right agent": lambda w: (),  # filled per RPC below
    "admin": lambda w: (("authorization", f"Bearer {w.keys['admin']}"),),
}


@dataclass(frozen=True)
class Case:
    service: str
    method: str
    request: Callable[[World], Any]
    right_agent: str  # who "the right agent" is for this RPC
    outsider: grpc.StatusCode
    right: grpc.StatusCode
    admin: grpc.StatusCode


T = "tasks"
A = "agents"
CASES: dict[str, Case] = {
    "CreateTask": Case(
        T, "CreateTask", lambda w: tasks_pb2.CreateTaskRequest(content="x", labels=["@researcher"]),
        "coder", OK, OK, OK,
    ),
    "CreateTask with T as parent": Case(
        T, "CreateTask",
        lambda w: tasks_pb2.CreateTaskRequest(content="x", labels=["@a"], parent_id=w.task_id),
        "researcher", NOT_FOUND, OK, OK,
    ),
    "GetTask": Case(
        T, "GetTask", lambda w: tasks_pb2.GetTaskRequest(id=w.task_id), "coder", NOT_FOUND, OK, OK
    ),
    "ListTasks": Case(T, "ListTasks", lambda w: tasks_pb2.ListTasksRequest(), "coder", OK, OK, OK),
    "ClaimTask by label": Case(
        T, "ClaimTask", lambda w: tasks_pb2.ClaimTaskRequest(labels=["@researcher"]),
        "researcher", DENIED, OK, OK,
    ),
    "ClaimTask by id": Case(
        T, "ClaimTask", lambda w: tasks_pb2.ClaimTaskRequest(id=w.task_id),
        "researcher", NOT_FOUND, PRECONDITION, PRECONDITION,
    ),
    "Heartbeat": Case(
        T, "Heartbeat",
        lambda w: tasks_pb2.HeartbeatRequest(id=w.task_id, lease_token=w.lease_token),
        "researcher", NOT_FOUND, OK, DENIED,
    ),
    "CompleteTask": Case(
        T, "CompleteTask",
        lambda w: tasks_pb2.CompleteTaskRequest(id=w.task_id, lease_token=w.lease_token),
        "researcher", NOT_FOUND, OK, DENIED,
    ),
    "FailTask": Case(
        T, "FailTask",
        lambda w: tasks_pb2.FailTaskRequest(id=w.task_id, lease_token=w.lease_token, error="x"),
        "researcher", NOT_FOUND, OK, DENIED,
    ),
    "CancelTask": Case(
        T, "CancelTask", lambda w: tasks_pb2.CancelTaskRequest(id=w.task_id),
        "coder", NOT_FOUND, OK, OK,
    ),
    "CancelTask by the claimant": Case(
        T, "CancelTask", lambda w: tasks_pb2.CancelTaskRequest(id=w.task_id),
        "researcher", NOT_FOUND, DENIED, OK,
    ),
    "ListTaskEvents": Case(
        T, "ListTaskEvents", lambda w: tasks_pb2.ListTaskEventsRequest(id=w.task_id),
        "coder", NOT_FOUND, OK, OK,
    ),
    "WatchTasks by id": Case(
        T, "WatchTasks",
        lambda w: tasks_pb2.WatchTasksRequest(task_ids=[w.task_id], after_seq=0),
        "coder", NOT_FOUND, OK, OK,
    ),
    "WatchTasks by label": Case(
        T, "WatchTasks",
        lambda w: tasks_pb2.WatchTasksRequest(labels=["@researcher", "@outsider"], after_seq=0),
        "coder", OK, OK, OK,
    ),
    "CreateAgent": Case(
        A, "CreateAgent", lambda w: agents_pb2.CreateAgentRequest(name="new", labels=["@new"]),
        "admin", DENIED, OK, OK,
    ),
    "ListAgents": Case(
        A, "ListAgents", lambda w: agents_pb2.ListAgentsRequest(), "admin", DENIED, OK, OK
    ),
    "GetAgent": Case(
        A, "GetAgent", lambda w: agents_pb2.GetAgentRequest(name="coder"), "coder", DENIED, OK, OK
    ),
    "UpdateAgent": Case(
        A, "UpdateAgent",
        lambda w: agents_pb2.UpdateAgentRequest(
            name="coder",
            labels=["@coder", "@x"],
            update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
        ),
        "admin", DENIED, OK, OK,
    ),
    "RevokeAgent": Case(
        A, "RevokeAgent", lambda w: agents_pb2.RevokeAgentRequest(name="coder"),
        "admin", DENIED, OK, OK,
    ),
    "RotateKey": Case(
        A, "RotateKey", lambda w: agents_pb2.RotateKeyRequest(name="coder"), "coder", DENIED, OK, OK
    ),
    "WhoAmI": Case(A, "WhoAmI", lambda w: agents_pb2.WhoAmIRequest(), "coder", OK, OK, OK),
}  # fmt: skip


def expected(case: Case, caller: str) -> grpc.StatusCode:
    if caller in ("outsider", "right agent", "admin"):
        return {"outsider": case.outsider, "right agent": case.right, "admin": case.admin}[caller]
    return UNAUTHENTICATED


@pytest.fixture
async def channel(daemon: Daemon) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(daemon.config.address) as channel:
        yield channel


async def snapshot(admin: AsyncClient) -> tuple[Any, ...]:
    page = await admin.list_tasks(page_size=1000)
    agents = await admin.list_agents(include_revoked=True)
    return (
        page.cursor,
        sorted((t.id, t.version, t.status) for t in page.tasks),
        sorted((a.name, a.labels, a.role, a.revoked) for a in agents),
    )


async def call(
    channel: grpc.aio.Channel, case: Case, world: World, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.StatusCode, Any]:
    stub: Any = (
        tasks_pb2_grpc.TaskServiceStub(channel)
        if case.service == T
        else agents_pb2_grpc.AgentServiceStub(channel)
    )
    method = getattr(stub, case.method)
    try:
        if case.method == "WatchTasks":
            stream = method(case.request(world), metadata=metadata, timeout=5)
            first = await stream.read()
            stream.cancel()
            return OK, first
        return OK, await method(case.request(world), metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("rpc", list(CASES))
async def test_every_rpc_answers_every_caller_with_the_right_code(
    rpc: str, caller: str, world: World, admin: AsyncClient, channel: grpc.aio.Channel
) -> None:
    case = CASES[rpc]
    metadata = CALLERS[caller](world)
    if caller == "right agent":
        metadata = (("authorization", f"Bearer {world.keys[case.right_agent]}"),)
    want = expected(case, caller)
    before = await snapshot(admin)

    code, answer = await call(channel, case, world, metadata)

    assert code == want, f"{rpc} as {caller}: {code.name} ({answer}), expected {want.name}"
    if code != OK:
        assert await snapshot(admin) == before, f"refused {rpc} as {caller} changed something"
        assert isinstance(answer, str)
        for key in world.keys.values():
            assert key not in answer
        return
    # What an allowed call lets through must still respect the caller's view.
    if caller == "outsider" and rpc == "ListTasks":
        assert [t.id for t in answer.tasks] == [world.outsider_task_id]
    if caller == "outsider" and rpc == "WatchTasks by label":
        assert answer.task.id == world.outsider_task_id  # T's earlier events were skipped
    if rpc == "WhoAmI":
        expected_name = {"outsider": "outsider", "right agent": "coder", "admin": "admin"}[caller]
        assert answer.name == expected_name
