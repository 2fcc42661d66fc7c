"""The blocking `Client` runs the delegation scenario against a real daemon.

The daemon fixture serves on the test's event loop, so every blocking call runs
in a worker thread (`asyncio.to_thread`); called on the loop it would block
the very daemon it waits for. Agents and their keys are created on the loop,
through the async admin client, before any blocking client is used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import islice

import grpc
import pytest
from legato.client import (
    AsyncClient,
    Client,
    EventType,
    TaskCanceledError,
    TaskEvent,
    TaskHandle,
    TaskStatus,
)
from legato.client.errors import NotFoundError
from legato.server.daemon import Daemon

AgentKey = Callable[..., Awaitable[str]]


@pytest.fixture
async def clients(daemon: Daemon, agent_key: AgentKey) -> AsyncIterator[dict[str, Client]]:
    """A blocking client per agent (`coder` holds @coder, `researcher` @researcher),
    each with its own key, closed after the test."""
    keys = {agent: await agent_key(agent) for agent in ("coder", "researcher")}
    opened = {
        agent: Client(daemon.config.address, api_key=key, timeout=10) for agent, key in keys.items()
    }
    yield opened
    for client in opened.values():
        client.close()


@pytest.fixture
def coder(clients: dict[str, Client]) -> Client:
    return clients["coder"]


@pytest.fixture
def researcher(clients: dict[str, Client]) -> Client:
    return clients["researcher"]


async def test_researcher_result_reaches_coder(coder: Client, researcher: Client) -> None:
    handle = await asyncio.to_thread(
        coder.create_task, "current RPM for Tier 1?", labels=["@researcher"], context={"tier": 1}
    )
    waiting = asyncio.create_task(asyncio.to_thread(handle.result, timeout=10))

    def work() -> None:
        job = researcher.claim(["@researcher"])
        assert job is not None and job.id == handle.id
        assert job.task.context == {"tier": 1} and job.task.claimed_by == "researcher"
        job.complete({"rpm": 500, "source": "https://docs.example/limits"})

    await asyncio.to_thread(work)

    task = await waiting
    assert task.status is TaskStatus.DONE
    assert task.result == {"rpm": 500, "source": "https://docs.example/limits"}
    assert (task.created_by, task.claimed_by) == ("coder", "researcher")
    assert handle.task == task


async def test_watch_yields_each_change_in_order(coder: Client, researcher: Client) -> None:
    cursor = (await asyncio.to_thread(coder.list_tasks, page_size=1)).cursor

    def watch_three() -> list[TaskEvent]:
        events = coder.watch(labels=["@researcher"], after_seq=cursor)
        try:
            return list(islice(events, 3))
        finally:
            events.close()

    watching = asyncio.create_task(asyncio.to_thread(watch_three))

    def delegate() -> str:
        handle = coder.create_task("summarise RFC 9113", labels=["@researcher"])
        job = researcher.claim(["@researcher"])
        assert job is not None
        job.complete({"summary": "HTTP/2"})
        return handle.id

    task_id = await asyncio.to_thread(delegate)

    created, claimed, completed = await asyncio.wait_for(watching, 10)
    assert [created.type, claimed.type, completed.type] == [
        EventType.CREATED,
        EventType.CLAIMED,
        EventType.COMPLETED,
    ]
    assert {created.task.id, claimed.task.id, completed.task.id} == {task_id}
    assert cursor < created.seq < claimed.seq < completed.seq
    assert completed.task.result == {"summary": "HTTP/2"}


async def test_result_of_an_unfinished_task_times_out(coder: Client) -> None:
    handle = await asyncio.to_thread(coder.create_task, "nobody will do this", labels=["@idle"])

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(handle.result, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5

    task = await asyncio.to_thread(handle.get)
    assert task.status is TaskStatus.PENDING


async def test_canceled_task_raises_on_result(coder: Client) -> None:
    handle = await asyncio.to_thread(coder.create_task, "never mind", labels=["@researcher"])
    waiting = asyncio.create_task(asyncio.to_thread(handle.result, timeout=10))

    await asyncio.to_thread(handle.cancel, "no longer needed")

    with pytest.raises(TaskCanceledError, match="no longer needed") as raised:
        await waiting
    assert raised.value.task.status is TaskStatus.CANCELED
    assert raised.value.task.id == handle.id


async def test_unknown_task_raises_not_found(coder: Client) -> None:
    with pytest.raises(NotFoundError) as raised:
        await asyncio.to_thread(coder.get_task, "t_no_such_task")
    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    assert "t_no_such_task" in raised.value.message


async def test_a_closed_client_refuses_every_call(daemon: Daemon, agent_key: AgentKey) -> None:
    key = await agent_key("coder", ["@x"])

    def use_after_close() -> list[str]:
        with Client(daemon.config.address, api_key=key) as client:
            handle = client.create_task("one task", labels=["@x"])
        client.close()  # closing twice is harmless
        calls: dict[str, Callable[[], object]] = {
            "create_task": lambda: client.create_task("another", labels=["@x"]),
            "get_task": lambda: client.get_task(handle.id),
            "list_tasks": lambda: client.list_tasks(),
            "claim": lambda: client.claim(["@x"]),
            "cancel_task": lambda: client.cancel_task(handle.id),
            "watch": lambda: next(client.watch(labels=["@x"])),
            "result": lambda: TaskHandle(client, handle.id).result(timeout=5),
        }
        refused = []
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match="closed"):
                call()
            refused.append(name)
        return refused

    assert len(await asyncio.to_thread(use_after_close)) == 7


async def test_a_call_the_client_is_closed_under_raises_that_it_is_closed(
    daemon: Daemon, agent_key: AgentKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that passed the open check just before `close()` (a job's heartbeat
    thread, say) meets a closed channel: it raises the client's RuntimeError,
    which the heartbeat ends on quietly, not the channel's own error."""
    key = await agent_key("coder", ["@x"])

    def call_under_close() -> None:
        client = Client(daemon.config.address, api_key=key)
        handle = client.create_task("one task", labels=["@x"])
        client.close()
        monkeypatch.setattr(client, "_check_open", lambda: None)  # the check passed before
        with pytest.raises(RuntimeError, match="closed"):
            client.get_task(handle.id)

    await asyncio.to_thread(call_under_close)
    async with AsyncClient(daemon.config.address, api_key=key) as async_client:
        handle = await async_client.create_task("another", labels=["@x"])
    monkeypatch.setattr(async_client, "_check_open", lambda: None)
    with pytest.raises(RuntimeError, match="closed"):
        await async_client.get_task(handle.id)
