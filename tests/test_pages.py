"""Listings and trees of large tasks come in pages that each fit a message.

A page ends before its tasks would pass the page budget (3 MiB) as well as at
its row count, so tasks with large contexts list completely, a few per page,
and the client follows the pages. A partial view of a tree pages without
empty pages or hidden tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import Connect, keyed_channel
from legato.client import AsyncClient, Client, cli
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
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == created


# -- GetTaskTree ------------------------------------------------------------------------


async def test_tree_of_six_children_of_900_kb_comes_whole_from_the_client(
    coder: AsyncClient,
) -> None:
    root = await coder.create_task("plan", labels=["@coder"])
    children = [
        await coder.create_task(
            f"part {i}", labels=["@coder"], parent_id=root.id, context=large_context(str(i))
        )
        for i in range(6)
    ]
    grandchild = await coder.create_task("detail", labels=["@coder"], parent_id=children[0].id)
    expected = [root.id, *(c.id for c in children), grandchild.id]
    assert [t.id for t in await coder.get_task_tree(root.id)] == expected
    assert [t.id for t in await root.tree()] == expected
    assert [t.id for t in await children[0].tree()] == [children[0].id, grandchild.id]


async def test_sync_client_tree_follows_the_pages(daemon: Daemon, agent_key: Any) -> None:
    key = await agent_key("planner")
    async with AsyncClient(daemon.config.address, api_key=key) as planner:
        root = await planner.create_task("plan", labels=["@planner"])
        ids = [root.id]
        for i in range(5):
            child = await planner.create_task(
                f"part {i}", labels=["@planner"], parent_id=root.id, context=large_context("")
            )
            ids.append(child.id)
    with Client(daemon.config.address, api_key=key, timeout=10) as client:
        tree = await asyncio.to_thread(client.get_task_tree, root.id)
        handle_tree = await asyncio.to_thread(client.get_handle(root.id).tree)
    assert [t.id for t in tree] == ids
    assert [t.id for t in handle_tree] == ids


async def test_tree_pages_by_bytes_and_rows_parents_first(
    coder: AsyncClient, raw_stub: Any, agent_key: Any
) -> None:
    root = await coder.create_task("plan", labels=["@coder"])
    children = [
        await coder.create_task(
            f"part {i}", labels=["@coder"], parent_id=root.id, context=large_context(str(i))
        )
        for i in range(6)
    ]
    stub = raw_stub(await agent_key("viewer", ["@coder"]))
    pages, token = [], ""
    while True:
        response = await stub.GetTaskTree(
            tasks_pb2.GetTaskTreeRequest(id=root.id, page_token=token)
        )
        assert response.ByteSize() <= limits.PAGE_BUDGET_BYTES
        pages.append([t.id for t in response.tasks])
        token = response.next_page_token
        if not token:
            break
    assert [i for page in pages for i in page] == [root.id, *(c.id for c in children)]
    assert len(pages) >= 2 and all(pages)  # three large children a page at most
    # By rows: two a page.
    small = await coder.create_task("small plan", labels=["@coder"])
    small_children = [
        (await coder.create_task(f"s{i}", labels=["@coder"], parent_id=small.id)).id
        for i in range(3)
    ]
    first = await stub.GetTaskTree(tasks_pb2.GetTaskTreeRequest(id=small.id, page_size=2))
    second = await stub.GetTaskTree(
        tasks_pb2.GetTaskTreeRequest(id=small.id, page_size=2, page_token=first.next_page_token)
    )
    assert [t.id for t in first.tasks] == [small.id, small_children[0]]
    assert [t.id for t in second.tasks] == small_children[1:]
    assert second.next_page_token == ""


async def test_tree_pages_of_a_partial_view_are_never_empty_and_hide_the_rest(
    connect: Connect, raw_stub: Any, agent_key: Any
) -> None:
    owner = await connect("owner")
    root = await owner.create_task("plan", labels=["@owner", "@viewer"])
    # The viewer sees the root (its label) and the children with its label;
    # runs of hidden children lie between and after them.
    pattern = "hvhhvhhhvhh"
    children = [
        await owner.create_task(
            f"part {i}", labels=["@viewer" if kind == "v" else "@owner"], parent_id=root.id
        )
        for i, kind in enumerate(pattern)
    ]
    hidden = {c.id for c, kind in zip(children, pattern, strict=True) if kind == "h"}
    stub = raw_stub(await agent_key("viewer"))
    visible = [root.id] + [c.id for c, kind in zip(children, pattern, strict=True) if kind == "v"]
    for page_size in (1, 2, 3):
        seen: list[str] = []
        token, calls = "", 0
        while True:
            response = await stub.GetTaskTree(
                tasks_pb2.GetTaskTreeRequest(id=root.id, page_size=page_size, page_token=token)
            )
            calls += 1
            assert response.tasks, "a page with a next token or the first page is never empty"
            assert len(response.tasks) <= page_size
            seen.extend(t.id for t in response.tasks)
            token = response.next_page_token
            if not token:
                break
            assert calls <= len(visible), "the tokens went round in circles"
        assert seen == visible
        assert not hidden & set(seen)
        # Full pages but the last: no trailing empty page, no extra call.
        assert calls == -(-len(visible) // page_size)
    # The owner sees every child.
    assert [t.id for t in await owner.get_task_tree(root.id)] == [
        root.id,
        *(c.id for c in children),
    ]


@pytest.mark.parametrize(
    ("page_size", "page_token", "message"),
    [
        (1001, "", "page_size must be 1 to 1000"),
        (-1, "", "page_size must be 1 to 1000"),
        (0, "not-a-token", "page_token is not one this daemon issued"),
        (0, "cDEyYQ", "page_token is not one this daemon issued"),  # "p12a"
    ],
)
async def test_tree_page_arguments_are_checked(
    coder: AsyncClient, raw_stub: Any, agent_key: Any, page_size: int, page_token: str, message: str
) -> None:
    root = await coder.create_task("plan", labels=["@coder"])
    stub = raw_stub(await agent_key("checker", ["@coder"]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetTaskTree(
            tasks_pb2.GetTaskTreeRequest(id=root.id, page_size=page_size, page_token=page_token)
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (raised.value.details() or "")


async def test_tree_of_a_hidden_task_is_not_found_whatever_the_token(
    connect: Connect, raw_stub: Any, agent_key: Any
) -> None:
    owner = await connect("owner")
    root = await owner.create_task("plan", labels=["@owner"])
    await owner.create_task("part", labels=["@owner"], parent_id=root.id)
    first = await raw_stub(await agent_key("peer", ["@owner"])).GetTaskTree(
        tasks_pb2.GetTaskTreeRequest(id=root.id, page_size=1)
    )
    stranger = raw_stub(await agent_key("stranger"))
    assert first.next_page_token
    for token in ("", first.next_page_token):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stranger.GetTaskTree(tasks_pb2.GetTaskTreeRequest(id=root.id, page_token=token))
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
