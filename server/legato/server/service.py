"""The TaskService RPC handlers: protobuf in, domain call, protobuf out.

Handlers hold no rules of their own. Every domain error becomes its status
code here, in `_status_of`; anything unexpected is logged and answered with
INTERNAL, so no request can bring the daemon down.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from functools import wraps
from typing import Any, TypeVar

import grpc
from legato.server.convert import duration_us, event_proto, statuses, struct_bytes, task_proto
from legato.server.errors import DomainError
from legato.server.events import SubscriptionClosed, SubscriptionOverflow
from legato.server.tasks import TaskManager
from legato.v1 import tasks_pb2, tasks_pb2_grpc

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]

# Until agents authenticate, a caller may name itself in this metadata key; the
# name is recorded as created_by / claimed_by / actor.
AGENT_METADATA = "legato-agent"
ANONYMOUS = "anonymous"
_AGENT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, DomainError):
        return exc.code, exc.message
    if isinstance(exc, SubscriptionOverflow):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the watcher fell too far behind and was cut off; "
            "resume with after_seq set to the last seq received",
        )
    if isinstance(exc, SubscriptionClosed):
        return (
            grpc.StatusCode.UNAVAILABLE,
            "the daemon is shutting down; resume with after_seq set to the last seq received",
        )
    log.error("request failed unexpectedly", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error in the legato daemon; see its log"


def _unary(
    handler: Callable[[TaskService, Req, Context], Coroutine[Any, Any, Resp]],
) -> Callable[[TaskService, Req, Context], Coroutine[Any, Any, Resp]]:
    @wraps(handler)
    async def wrapped(self: TaskService, request: Req, context: Context) -> Resp:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = _status_of(exc)
            await context.abort(code, message)
            raise AssertionError("abort() returned") from exc  # abort always raises

    return wrapped


def caller(context: Context) -> str:
    """The agent name the caller gave in metadata, or 'anonymous'."""
    for key, value in context.invocation_metadata() or ():
        if key == AGENT_METADATA and isinstance(value, str) and _AGENT_NAME.fullmatch(value):
            return value
    return ANONYMOUS


class TaskService(tasks_pb2_grpc.TaskServiceServicer):
    """legato.v1.TaskService over a `TaskManager`."""

    def __init__(self, tasks: TaskManager):
        self._tasks = tasks

    @_unary
    async def CreateTask(
        self, request: tasks_pb2.CreateTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task, _ = await self._tasks.create(
            content=request.content,
            labels=list(request.labels),
            context=struct_bytes(request, "context"),
            parent_id=request.parent_id,
            idempotency_key=request.idempotency_key,
            max_attempts=request.max_attempts,
            actor=caller(context),
        )
        return task_proto(task)

    @_unary
    async def GetTask(self, request: tasks_pb2.GetTaskRequest, context: Context) -> tasks_pb2.Task:
        return task_proto(await self._tasks.get(request.id))

    @_unary
    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: Context
    ) -> tasks_pb2.ListTasksResponse:
        tasks, next_token, cursor = await self._tasks.list(
            labels=list(request.labels),
            statuses=statuses(list(request.statuses)),
            parent_id=request.parent_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return tasks_pb2.ListTasksResponse(
            tasks=[task_proto(t) for t in tasks], next_page_token=next_token, cursor=cursor
        )

    @_unary
    async def ClaimTask(
        self, request: tasks_pb2.ClaimTaskRequest, context: Context
    ) -> tasks_pb2.ClaimTaskResponse:
        task = await self._tasks.claim(
            labels=list(request.labels),
            task_id=request.id,
            lease_us=duration_us(request, "lease"),
            actor=caller(context),
        )
        if task is None:
            return tasks_pb2.ClaimTaskResponse()
        return tasks_pb2.ClaimTaskResponse(task=task_proto(task), lease_token=task.lease_token)

    @_unary
    async def Heartbeat(
        self, request: tasks_pb2.HeartbeatRequest, context: Context
    ) -> tasks_pb2.HeartbeatResponse:
        task, cancel_requested = await self._tasks.heartbeat(
            task_id=request.id,
            lease_token=request.lease_token,
            lease_us=duration_us(request, "lease"),
            actor=caller(context),
        )
        return tasks_pb2.HeartbeatResponse(task=task_proto(task), cancel_requested=cancel_requested)

    @_unary
    async def CompleteTask(
        self, request: tasks_pb2.CompleteTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.complete(
            task_id=request.id,
            lease_token=request.lease_token,
            result=struct_bytes(request, "result"),
            actor=caller(context),
        )
        return task_proto(task)

    @_unary
    async def FailTask(
        self, request: tasks_pb2.FailTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.fail(
            task_id=request.id,
            lease_token=request.lease_token,
            error=request.error,
            retryable=request.retryable,
            actor=caller(context),
        )
        return task_proto(task)

    @_unary
    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: Context
    ) -> tasks_pb2.Task:
        task = await self._tasks.cancel(
            task_id=request.id, reason=request.reason, actor=caller(context)
        )
        return task_proto(task)

    async def WatchTasks(
        self, request: tasks_pb2.WatchTasksRequest, context: Context
    ) -> AsyncIterator[tasks_pb2.TaskEvent]:
        events = self._tasks.watch(
            labels=list(request.labels),
            task_ids=list(request.task_ids),
            after_seq=request.after_seq if request.HasField("after_seq") else None,
        )
        # CancelledError (the client went away) is not caught here and must not
        # be: swallowing it in a streaming handler leaks the stream's memory.
        try:
            async with aclosing(events):
                async for event in events:
                    yield event_proto(event)
        except Exception as exc:
            code, message = _status_of(exc)
            await context.abort(code, message)
