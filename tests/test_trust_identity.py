"""Who an agent is, as it is now: key rotations, revocations and label changes
hold across restarts, reach calls already waiting, and a task outside a view
reads exactly like a missing one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest
from conftest import EVENT_GUARD, Connect, keyed_channel
from legato.client import AsyncClient, Role, TaskStatus
from legato.client.errors import PermissionDeniedError, UnauthenticatedError
from legato.server.agents import AgentRegistry
from legato.server.daemon import Config, Daemon
from legato.server.errors import FailedPrecondition, NotFound, PermissionDenied, Unauthenticated
from legato.server.tasks import TaskManager
from legato.v1 import tasks_pb2, tasks_pb2_grpc

if TYPE_CHECKING:
    from legato.v1.tasks_pb2_grpc import TaskServiceAsyncStub

# -- helpers ----------------------------------------------------------------------------


def manager_of(daemon: Daemon) -> TaskManager:
    assert daemon.tasks is not None, "the daemon is not running"
    return daemon.tasks


def registry_of(daemon: Daemon) -> AgentRegistry:
    return manager_of(daemon).agents


@asynccontextmanager
async def as_admin(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    key = daemon.admin_key_path.read_text().strip()
    async with AsyncClient(daemon.config.address, api_key=key, timeout=10) as client:
        yield client


async def key_works(daemon: Daemon, key: str) -> bool:
    async with AsyncClient(daemon.config.address, api_key=key, timeout=10) as client:
        try:
            await client.whoami()
        except UnauthenticatedError:
            return False
    return True


async def until_claim_waits(manager: TaskManager, attempts_before: int) -> None:
    """Returns once a claim call made after `attempts_before` was read is waiting.

    A claim registers as a waiter before its first look, and each look counts in
    `claim_attempts`, so a higher count means the claim is registered. Nothing
    of a waiting claim reaches a client, so this yields to the daemon (on this
    loop) until the count moves, bounded by EVENT_GUARD.
    """

    async def spin() -> None:
        while manager.claim_attempts == attempts_before:
            await asyncio.sleep(0)

    await asyncio.wait_for(spin(), EVENT_GUARD)


# -- agent changes are not undone on disk -----------------------------------------------


async def test_a_rotation_as_the_agents_first_call_survives_a_restart(config: Config) -> None:
    async with Daemon(config) as daemon:
        async with as_admin(daemon) as admin:
            _, old = await admin.create_agent("worker", labels=["@work"])
        async with AsyncClient(config.address, api_key=old, timeout=10) as worker:
            _, new = await worker.rotate_key()  # its first call: last_seen_at is written too

    async with Daemon(config) as restarted:
        assert not await key_works(restarted, old)
        assert await key_works(restarted, new)


async def test_an_update_as_the_agents_first_call_survives_a_restart(config: Config) -> None:
    async with Daemon(config) as daemon:
        async with as_admin(daemon) as admin:
            _, key = await admin.create_agent("ops", labels=["@old"], role=Role.ADMIN)
        async with AsyncClient(config.address, api_key=key, timeout=10) as ops:
            await ops.update_agent("ops", labels=["@new"])  # its first call

    async with Daemon(config) as restarted, as_admin(restarted) as admin:
        assert (await admin.get_agent("ops")).labels == ("@new",)


async def test_a_revocation_survives_the_agents_first_call_landing_during_it(
    config: Config,
) -> None:
    async with Daemon(config) as daemon:
        async with as_admin(daemon) as admin:
            _, key = await admin.create_agent("worker", labels=["@work"])
        registry = registry_of(daemon)
        # The registry is driven directly to pin the interleaving of a race: the
        # worker's first call of the minute is authenticated while the revocation
        # is being written, before it takes effect.
        revoking = asyncio.create_task(registry.revoke("worker"))
        await asyncio.sleep(0)  # one step: the revocation is now in the writer's queue
        registry.authenticate(key)
        await revoking
        assert not await key_works(daemon, key)

    async with Daemon(config) as restarted, as_admin(restarted) as admin:
        assert not await key_works(restarted, key)
        assert (await admin.get_agent("worker")).revoked


async def test_concurrent_changes_of_one_agent_all_hold(config: Config) -> None:
    async with Daemon(config) as daemon:
        async with as_admin(daemon) as admin:
            await admin.create_agent("worker", labels=["@old"])
            await admin.create_agent("leaver", labels=["@old"])
        registry = registry_of(daemon)
        # Started together, each reads the agent before the other has written it.
        _, (_, new_key) = await asyncio.gather(
            registry.update("worker", labels=["@new"], role=None), registry.rotate("worker")
        )
        revoked, rotated = await asyncio.gather(
            registry.revoke("leaver"), registry.rotate("leaver"), return_exceptions=True
        )
        assert not isinstance(revoked, BaseException)
        # The revocation was written first: the rotation must not bring the agent back.
        assert isinstance(rotated, FailedPrecondition), rotated
        assert "revoked" in rotated.message
        assert registry.get("worker").labels == ("@new",)
        assert registry.get("leaver").revoked

    async with Daemon(config) as restarted, as_admin(restarted) as admin:
        assert await key_works(restarted, new_key)
        assert (await admin.get_agent("worker")).labels == ("@new",)
        assert (await admin.get_agent("leaver")).revoked


# -- waiting claims follow their agent --------------------------------------------------


async def test_revoking_an_agent_ends_its_waiting_claim_and_the_next_task_stays_pending(
    daemon: Daemon, admin: AsyncClient, coder: AsyncClient, connect: Connect
) -> None:
    worker = await connect("worker", ["@work"])
    await worker.whoami()  # connected, so the claim below is the only thing in flight
    manager = manager_of(daemon)
    attempts = manager.claim_attempts
    claiming = asyncio.create_task(worker.claim(["@work"], wait=30))
    await until_claim_waits(manager, attempts)

    await admin.revoke_agent("worker")
    handle = await coder.create_task("for whoever holds @work", labels=["@work"])

    with pytest.raises(UnauthenticatedError, match="revoked"):
        await asyncio.wait_for(claiming, 5)
    assert (await coder.get_task(handle.id)).status is TaskStatus.PENDING


async def test_rotating_a_key_ends_the_claims_waiting_under_the_old_one(
    daemon: Daemon, admin: AsyncClient, coder: AsyncClient, connect: Connect
) -> None:
    worker = await connect("worker", ["@work"])
    await worker.whoami()
    manager = manager_of(daemon)
    attempts = manager.claim_attempts
    claiming = asyncio.create_task(worker.claim(["@work"], wait=30))
    await until_claim_waits(manager, attempts)

    _, new_key = await admin.rotate_key("worker")
    handle = await coder.create_task("for whoever holds @work", labels=["@work"])

    with pytest.raises(UnauthenticatedError, match="rotated"):
        await asyncio.wait_for(claiming, 5)
    assert (await coder.get_task(handle.id)).status is TaskStatus.PENDING
    async with AsyncClient(daemon.config.address, api_key=new_key, timeout=10) as renewed:
        job = await renewed.claim(["@work"])
        assert job is not None and job.id == handle.id


async def test_a_waiting_claim_on_a_label_taken_away_ends_permission_denied(
    daemon: Daemon, admin: AsyncClient, coder: AsyncClient, connect: Connect
) -> None:
    worker = await connect("worker", ["@work", "@other"])
    await worker.whoami()
    manager = manager_of(daemon)
    attempts = manager.claim_attempts
    claiming = asyncio.create_task(worker.claim(["@work"], wait=30))
    await until_claim_waits(manager, attempts)

    await admin.update_agent("worker", labels=["@other"])
    handle = await coder.create_task("for whoever holds @work", labels=["@work"])

    with pytest.raises(PermissionDeniedError, match="does not hold @work"):
        await asyncio.wait_for(claiming, 5)
    assert (await coder.get_task(handle.id)).status is TaskStatus.PENDING


async def test_a_waiting_claim_on_all_its_labels_follows_the_agents_labels(
    daemon: Daemon, admin: AsyncClient, coder: AsyncClient, connect: Connect
) -> None:
    worker = await connect("worker", ["@work", "@other"])
    await worker.whoami()
    manager = manager_of(daemon)
    attempts = manager.claim_attempts
    claiming = asyncio.create_task(worker.claim(wait=30))  # no labels: all of the agent's
    await until_claim_waits(manager, attempts)

    await admin.update_agent("worker", labels=["@other", "@new"])
    dropped = await coder.create_task("for @work, which worker no longer holds", labels=["@work"])
    added = await coder.create_task("for @new, which it holds now", labels=["@new"])

    job = await asyncio.wait_for(claiming, 5)
    assert job is not None and job.id == added.id
    assert (await coder.get_task(dropped.id)).status is TaskStatus.PENDING


async def test_a_claim_made_before_a_revocation_is_refused_when_it_runs_after(
    daemon: Daemon, admin: AsyncClient, coder: AsyncClient, connect: Connect
) -> None:
    """A call authenticated just before its agent was revoked (or lost a label)
    carries the agent as it was; the claim decides on the agent as it is now."""
    await connect("worker", ["@work"])
    manager = manager_of(daemon)
    as_authenticated = manager.agents.get("worker")
    handle = await coder.create_task("for whoever holds @work", labels=["@work"])

    await admin.update_agent("worker", labels=["@other"])
    with pytest.raises(PermissionDenied, match="does not hold @work"):
        await manager.claim(labels=["@work"], task_id="", lease_us=None, caller=as_authenticated)
    with pytest.raises(NotFound):  # @work no longer in its view: as if it did not exist
        await manager.claim(labels=[], task_id=handle.id, lease_us=None, caller=as_authenticated)

    await admin.update_agent("worker", labels=["@work"])
    await admin.revoke_agent("worker")
    for task_id in ("", handle.id):
        with pytest.raises(Unauthenticated, match="revoked"):
            await manager.claim(labels=[], task_id=task_id, lease_us=None, caller=as_authenticated)
    assert (await coder.get_task(handle.id)).status is TaskStatus.PENDING


# -- outside the view reads exactly like missing ----------------------------------------

Probe = Callable[["TaskServiceAsyncStub", str], Awaitable[object]]
LEASE = "l_" + "x" * 32


async def _watch_first(stub: TaskServiceAsyncStub, task_id: str) -> object:
    stream = stub.WatchTasks(tasks_pb2.WatchTasksRequest(task_ids=[task_id], after_seq=0))
    return await stream.read()


# Every RPC that takes a task id, and the id it is given.
PROBES: dict[str, Probe] = {
    "GetTask": lambda s, i: s.GetTask(tasks_pb2.GetTaskRequest(id=i)),
    "GetTaskTree": lambda s, i: s.GetTaskTree(tasks_pb2.GetTaskTreeRequest(id=i)),
    "ListTaskEvents": lambda s, i: s.ListTaskEvents(tasks_pb2.ListTaskEventsRequest(id=i)),
    "ClaimTask": lambda s, i: s.ClaimTask(tasks_pb2.ClaimTaskRequest(id=i)),
    "Heartbeat": lambda s, i: s.Heartbeat(tasks_pb2.HeartbeatRequest(id=i, lease_token=LEASE)),
    "CompleteTask": lambda s, i: s.CompleteTask(
        tasks_pb2.CompleteTaskRequest(id=i, lease_token=LEASE)
    ),
    "FailTask": lambda s, i: s.FailTask(
        tasks_pb2.FailTaskRequest(id=i, lease_token=LEASE, error="no")
    ),
    "ReleaseTask": lambda s, i: s.ReleaseTask(
        tasks_pb2.ReleaseTaskRequest(id=i, lease_token=LEASE)
    ),
    "CancelTask": lambda s, i: s.CancelTask(tasks_pb2.CancelTaskRequest(id=i)),
    "AppendOutput": lambda s, i: s.AppendOutput(
        tasks_pb2.AppendOutputRequest(id=i, lease_token=LEASE, text="x")
    ),
    "RequestInput": lambda s, i: s.RequestInput(
        tasks_pb2.RequestInputRequest(id=i, lease_token=LEASE, question="?")
    ),
    "ProvideInput": lambda s, i: s.ProvideInput(tasks_pb2.ProvideInputRequest(id=i, answer="a")),
    "CreateTask(parent_id)": lambda s, i: s.CreateTask(
        tasks_pb2.CreateTaskRequest(content="child", labels=["@outsider"], parent_id=i)
    ),
    "WatchTasks(task_ids)": _watch_first,
}


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    # The message with the id asked for replaced by "<id>": ids differ, nothing else may.
    message: str


async def refusal(probe: Probe, stub: TaskServiceAsyncStub, task_id: str) -> Refusal:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(probe(stub, task_id), EVENT_GUARD)
    details = refused.value.details() or ""
    return Refusal(refused.value.code(), details.replace(task_id, "<id>"))


@pytest.mark.parametrize("rpc", list(PROBES))
async def test_a_task_outside_the_view_reads_exactly_like_a_missing_one(
    rpc: str,
    daemon: Daemon,
    coder: AsyncClient,
    researcher: AsyncClient,
    agent_key: Callable[..., Awaitable[str]],
) -> None:
    hidden = await coder.create_task("not for outsiders", labels=["@researcher"])
    job = await researcher.claim()  # claimed, so every RPC meets it in a state it acts on
    assert job is not None and job.id == hidden.id
    missing = "t_" + "A" * (len(hidden.id) - 2)
    key = await agent_key("outsider")

    async with keyed_channel(daemon.config.address, key) as channel:
        stub: TaskServiceAsyncStub = tasks_pb2_grpc.TaskServiceStub(channel)
        of_missing = await refusal(PROBES[rpc], stub, missing)
        of_hidden = await refusal(PROBES[rpc], stub, hidden.id)

    assert of_missing.code == grpc.StatusCode.NOT_FOUND
    assert of_hidden == of_missing
