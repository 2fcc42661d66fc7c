"""Listings of large tasks come in pages that each fit a message.

A page ends before its tasks would pass the page budget (3 MiB) as well as at
its row count, so tasks with large contexts list completely, a few per page.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import keyed_channel
from legato.client import AsyncClient, cli
from legato.server import limits
from legato.server.daemon import Daemon
from legato.v1 import tasks_pb2, tasks_pb2_grpc

CONTEXT_BYTES = 900_000
# Room for a whole message each way on the raw test channels.
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
]


def large_context(tag: str) -> dict[str, Any]:
    return {"tag": tag, "blob": "x" * CONTEXT_BYTES}


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


# -- ListTasks ------------------------------------------------------------------------


async def test_ten_tasks_of_900_kb_list_completely_over_several_pages(coder: AsyncClient) -> None:
    created = [
        (await coder.create_task(f"large {i}", labels=["@coder"], context=large_context(str(i)))).id
        for i in range(10)
    ]
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await coder.list_tasks(page_token=token)
        pages.append([t.id for t in page.tasks])
        assert all(
            t.context is not None and len(t.context["blob"]) == CONTEXT_BYTES for t in page.tasks
        )
        token = page.next_page_token
        if not token:
            break
    listed = [task_id for page_ids in pages for task_id in page_ids]
    assert listed == created  # none lost, none repeated, oldest first
    assert len(pages) >= 4  # at most 3 of them fit the page budget
    assert all(page_ids for page_ids in pages)


async def test_every_page_of_large_tasks_stays_within_the_budget(
    coder: AsyncClient, raw_stub: Any, agent_key: Any
) -> None:
    for i in range(7):
        await coder.create_task(f"large {i}", labels=["@coder"], context=large_context(str(i)))
    stub = raw_stub(await agent_key("reader", ["@coder"]))
    sizes, token = [], ""
    while True:
        response = await stub.ListTasks(tasks_pb2.ListTasksRequest(page_token=token))
        sizes.append((len(response.tasks), response.ByteSize()))
        token = response.next_page_token
        if not token:
            break
    assert sum(count for count, _ in sizes) == 7
    assert all(size <= limits.PAGE_BUDGET_BYTES for _, size in sizes)


async def test_cli_task_list_follows_the_pages_of_large_tasks(
    daemon: Daemon, agent_key: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    key = await agent_key("lister")
    async with AsyncClient(daemon.config.address, api_key=key) as lister:
        created = [
            (await lister.create_task(f"t{i}", labels=["@lister"], context=large_context(""))).id
            for i in range(8)
        ]
    argv = ["task", "list", "--address", daemon.config.address, "--key", key]
    assert await asyncio.to_thread(cli.main, argv) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == created
