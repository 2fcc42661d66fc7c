"""The delegation scenario end to end, through the public client."""

from __future__ import annotations

import asyncio

import pytest
from legato.client import AsyncClient, EventType, TaskFailedError, TaskStatus


async def test_researcher_result_reaches_coder_without_polling(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    handle = await coder.create_task(
        "current RPM for Tier 1?", labels=["@researcher"], context={"api": "anthropic", "tier": 1}
    )
    waiting = asyncio.create_task(handle.result(timeout=10))

    job = await researcher.claim(["@researcher"])
    assert job is not None and job.id == handle.id
    assert job.task.context == {"api": "anthropic", "tier": 1}
    assert job.task.status is TaskStatus.CLAIMED and job.task.claimed_by == "researcher"
    await job.complete({"rpm": 500, "source": "https://docs.example/limits"})

    task = await waiting
    assert task.status is TaskStatus.DONE
    assert task.result == {"rpm": 500, "source": "https://docs.example/limits"}
    assert task.created_by == "coder"


async def test_result_arrives_on_the_watch_as_a_completed_event(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    cursor = (await coder.list_tasks(page_size=1)).cursor  # list, then watch from its cursor
    events = coder.watch(labels=["@researcher"], after_seq=cursor)
    handle = await coder.create_task("summarise RFC 9113", labels=["@researcher"])
    created = await anext(events)
    assert (created.type, created.task.id) == (EventType.CREATED, handle.id)

    job = await researcher.claim(["@researcher"])
    assert job is not None
    await job.complete({"summary": "HTTP/2"})
    claimed, completed = await anext(events), await anext(events)
    assert [claimed.type, completed.type] == [EventType.CLAIMED, EventType.COMPLETED]
    assert completed.task.result == {"summary": "HTTP/2"}
    assert created.seq < claimed.seq < completed.seq
    await events.aclose()


async def test_failed_task_raises_on_result(coder: AsyncClient, researcher: AsyncClient) -> None:
    handle = await coder.create_task("impossible", labels=["@researcher"])
    job = await researcher.claim(["@researcher"])
    assert job is not None
    await job.fail("no source answers this")
    with pytest.raises(TaskFailedError, match="no source answers this") as raised:
        await handle.result(timeout=5)
    assert raised.value.task.status is TaskStatus.FAILED
