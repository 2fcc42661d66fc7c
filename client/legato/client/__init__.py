"""The legato Python client: delegate tasks to other agents and pick up results.

    from legato.client import AsyncClient

    async with AsyncClient(api_key=CODER_KEY) as coder:
        handle = await coder.create_task("current RPM for Tier 1?", labels=["@researcher"])
        task = await handle.result(timeout=60)

`Client` is the same API, blocking. `AsyncWorker` / `Worker` run a handler on
every task for some labels, several at once, and stop gracefully.
"""

from legato.client._async import AsyncClient, AsyncJob, AsyncTaskHandle, AsyncWorker
from legato.client._sync import Client, Job, TaskHandle, Worker
from legato.client.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InexactValueError,
    InternalError,
    InvalidArgumentError,
    JobInterruptedError,
    LegatoError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RPCError,
    TaskCanceledError,
    TaskFailedError,
    TaskOutcomeError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from legato.client.models import (
    Agent,
    EventType,
    OutputChunk,
    Role,
    Task,
    TaskEvent,
    TaskPage,
    TaskStatus,
)

__all__ = [
    "AbortedError",
    "Agent",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncJob",
    "AsyncTaskHandle",
    "AsyncWorker",
    "CancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "EventType",
    "FailedPreconditionError",
    "InexactValueError",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobInterruptedError",
    "LegatoError",
    "NotFoundError",
    "OutOfRangeError",
    "OutputChunk",
    "PermissionDeniedError",
    "RPCError",
    "ResourceExhaustedError",
    "Role",
    "Task",
    "TaskCanceledError",
    "TaskEvent",
    "TaskFailedError",
    "TaskHandle",
    "TaskOutcomeError",
    "TaskPage",
    "TaskStatus",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "Worker",
]
