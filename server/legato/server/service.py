"""The TaskService RPC handlers: protobuf in, domain call, protobuf out.

Handlers hold no rules of their own: `access` and `lifecycle` decide, and
`rpc.register` wraps each of them once, turning refusals into status codes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing

from legato.server.auth import current_agent
from legato.server.convert import (
    duration_us,
    event_proto,
    statuses,
    struct_bytes,
    task_proto,
    timestamp_us,
)
from legato.server.model import Event
from legato.server.rpc import Context, status_of
from legato.server.tasks import TaskManager
from legato.v1 import tasks_pb2, tasks_pb2_grpc


class EncodedEvents:
    """Each event's wire form, made once for all the watchers it goes to.

    Bounded in bytes as well as in count: a burst of creates with large
    contexts must not pin their encodings.
    """

    def __init__(self, capacity: int = 4096, max_bytes: int = 16 * 1024 * 1024):
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._bytes = 0
        self._by_seq: OrderedDict[int, bytes] = OrderedDict()

    def __call__(self, event: Event) -> bytes:
        encoded = self._by_seq.get(event.seq)
        if encoded is None:
            encoded = event_proto(event).SerializeToString()
            self._by_seq[event.seq] = encoded
            self._bytes += len(encoded)
            while len(self._by_seq) > self._capacity or self._bytes > self._max_bytes:
                self._bytes -= len(self._by_seq.popitem(last=False)[1])
        return encoded


class TaskService(tasks_pb2_grpc.TaskServiceServicer):
    """legato.v1.TaskService over a `TaskManager`."""

    def __init__(self, tasks: TaskManager):
        self._tasks = tasks
        self._encoded = EncodedEvents()

    async def CreateTask(
        self, request: tasks_pb2.CreateTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task, _, warnings = await self._tasks.create(
            content=request.content,
            labels=list(request.labels),
            context=struct_bytes(request, "context"),
            parent_id=request.parent_id,
            idempotency_key=request.idempotency_key,
            max_attempts=request.max_attempts,
            deadline=timestamp_us(request, "deadline"),
            caller=current_agent.get(),
        )
        message = task_proto(task)
        message.warnings.extend(warnings)
        return message

    async def GetTask(self, request: tasks_pb2.GetTaskRequest, context: Context) -> tasks_pb2.Task:
        task, output = await self._tasks.get(request.id, caller=current_agent.get())
        message = task_proto(task)
        message.output = output
        return message

    async def GetTaskTree(
        self, request: tasks_pb2.GetTaskTreeRequest, context: Context
    ) -> tasks_pb2.GetTaskTreeResponse:
        tasks, next_token = await self._tasks.tree(
            request.id,
            caller=current_agent.get(),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return tasks_pb2.GetTaskTreeResponse(
            tasks=[task_proto(t) for t in tasks], next_page_token=next_token
        )

    async def AppendOutput(
        self, request: tasks_pb2.AppendOutputRequest, context: Context
    ) -> tasks_pb2.AppendOutputResponse:
        chunk = await self._tasks.append_output(
            task_id=request.id,
            lease_token=request.lease_token,
            text=request.text,
            caller=current_agent.get(),
        )
        size = chunk.offset + len(chunk.text.encode("utf-8", "surrogatepass"))
        return tasks_pb2.AppendOutputResponse(offset=chunk.offset, output_size=size)

    async def RequestInput(
        self, request: tasks_pb2.RequestInputRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.request_input(
            task_id=request.id,
            lease_token=request.lease_token,
            question=request.question,
            caller=current_agent.get(),
        )
        return task_proto(task)

    async def ProvideInput(
        self, request: tasks_pb2.ProvideInputRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.provide_input(
            task_id=request.id, answer=request.answer, caller=current_agent.get()
        )
        return task_proto(task)

    async def ListTaskEvents(
        self, request: tasks_pb2.ListTaskEventsRequest, context: Context
    ) -> tasks_pb2.ListTaskEventsResponse:
        events, next_after_seq = await self._tasks.history(
            request.id,
            caller=current_agent.get(),
            after_seq=request.after_seq,
            page_size=request.page_size,
        )
        return tasks_pb2.ListTaskEventsResponse(
            events=[event_proto(e) for e in events], next_after_seq=next_after_seq
        )

    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: Context
    ) -> tasks_pb2.ListTasksResponse:
        tasks, next_token, cursor = await self._tasks.list(
            caller=current_agent.get(),
            labels=list(request.labels),
            statuses=statuses(list(request.statuses)),
            parent_id=request.parent_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return tasks_pb2.ListTasksResponse(
            tasks=[task_proto(t) for t in tasks], next_page_token=next_token, cursor=cursor
        )

    async def ClaimTask(
        self, request: tasks_pb2.ClaimTaskRequest, context: Context
    ) -> tasks_pb2.ClaimTaskResponse:
        task = await self._tasks.claim(
            labels=list(request.labels),
            task_id=request.id,
            lease_us=duration_us(request, "lease"),
            wait_us=duration_us(request, "wait"),
            caller=current_agent.get(),
        )
        if task is None:
            return tasks_pb2.ClaimTaskResponse()
        return tasks_pb2.ClaimTaskResponse(task=task_proto(task), lease_token=task.lease_token)

    async def Heartbeat(
        self, request: tasks_pb2.HeartbeatRequest, context: Context
    ) -> tasks_pb2.HeartbeatResponse:
        task, cancel_requested = await self._tasks.heartbeat(
            task_id=request.id,
            lease_token=request.lease_token,
            lease_us=duration_us(request, "lease"),
            caller=current_agent.get(),
        )
        return tasks_pb2.HeartbeatResponse(task=task_proto(task), cancel_requested=cancel_requested)

    async def CompleteTask(
        self, request: tasks_pb2.CompleteTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.complete(
            task_id=request.id,
            lease_token=request.lease_token,
            result=struct_bytes(request, "result"),
            caller=current_agent.get(),
        )
        return task_proto(task)

    async def FailTask(
        self, request: tasks_pb2.FailTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.fail(
            task_id=request.id,
            lease_token=request.lease_token,
            error=request.error,
            retryable=request.retryable,
            caller=current_agent.get(),
        )
        return task_proto(task)

    async def ReleaseTask(
        self, request: tasks_pb2.ReleaseTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.release(
            task_id=request.id,
            lease_token=request.lease_token,
            reason=request.reason,
            caller=current_agent.get(),
        )
        return task_proto(task)

    async def GetCursor(
        self, request: tasks_pb2.GetCursorRequest, context: Context
    ) -> tasks_pb2.GetCursorResponse:
        return tasks_pb2.GetCursorResponse(cursor=await self._tasks.cursor())

    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.cancel(
            task_id=request.id,
            reason=request.reason,
            keep_children=request.keep_children,
            caller=current_agent.get(),
        )
        return task_proto(task)

    # Yields each TaskEvent already serialized (rpc.guard sends the bytes as
    # they are), which the generated servicer's TaskEvent return type cannot say.
    async def WatchTasks(  # type: ignore[override]
        self, request: tasks_pb2.WatchTasksRequest, context: Context
    ) -> AsyncIterator[bytes]:
        events = self._tasks.watch(
            labels=list(request.labels),
            task_ids=list(request.task_ids),
            after_seq=request.after_seq if request.HasField("after_seq") else None,
            caller=current_agent.get(),
        )
        # CancelledError (the client went away) is not caught here and must not
        # be: swallowing it in a streaming handler leaks the stream's memory.
        try:
            async with aclosing(events):
                async for event in events:
                    yield self._encoded(event)  # see rpc.guard
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
