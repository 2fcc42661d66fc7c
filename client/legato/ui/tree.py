"""A task's subtree, all pages of it."""

from __future__ import annotations

from legato.client import AsyncClient, Task
from legato.v1 import tasks_pb2


async def task_tree(client: AsyncClient, task_id: str) -> list[Task]:
    """The task and the descendants the client sees, each after its parent.

    `AsyncClient.get_task_tree` returns only the first page of GetTaskTree
    (100 tasks); this reads every page, through the client's own call path.
    """
    tasks: list[Task] = []
    token = ""
    while True:
        request = tasks_pb2.GetTaskTreeRequest(id=task_id, page_size=1000, page_token=token)
        response = await client._call(client._stub.GetTaskTree, request)
        tasks.extend(Task.from_proto(message) for message in response.tasks)
        token = response.next_page_token
        if not token:
            return tasks
