"""The client's exceptions: one tree, with gRPC status codes mapped in one place.

LegatoError
├── RPCError                      a call failed; `.code` is the grpc.StatusCode
│   ├── CancelledError            CANCELLED
│   ├── UnknownError              UNKNOWN
│   ├── InvalidArgumentError      INVALID_ARGUMENT
│   ├── DeadlineExceededError     DEADLINE_EXCEEDED, or a timeout= ran out before
│   │                             the answer came; also a builtin TimeoutError
│   ├── NotFoundError             NOT_FOUND
│   ├── AlreadyExistsError        ALREADY_EXISTS
│   ├── PermissionDeniedError     PERMISSION_DENIED
│   ├── ResourceExhaustedError    RESOURCE_EXHAUSTED
│   ├── FailedPreconditionError   FAILED_PRECONDITION
│   ├── AbortedError              ABORTED
│   ├── OutOfRangeError           OUT_OF_RANGE
│   ├── UnimplementedError        UNIMPLEMENTED
│   ├── InternalError             INTERNAL
│   ├── UnavailableError          UNAVAILABLE (e.g. the daemon is not running)
│   ├── DataLossError             DATA_LOSS
│   └── UnauthenticatedError      UNAUTHENTICATED
├── TaskOutcomeError              a task ended without a result; `.task` is it
│   ├── TaskFailedError           FAILED
│   └── TaskCanceledError         CANCELED
├── JobInterruptedError           a worker must stop work on a job it claimed
│                                 (canceled, deadline passed, lease lost); `.reason`
└── InexactValueError             a result or context value JSON cannot carry
                                  exactly (also a builtin ValueError)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from legato.client.models import Task


class LegatoError(Exception):
    """Root of every error the legato client raises."""


class RPCError(LegatoError):
    """A call to the daemon failed with a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.code.name})"


class CancelledError(RPCError):
    code = grpc.StatusCode.CANCELLED


class UnknownError(RPCError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(RPCError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(RPCError, TimeoutError):
    """A call or a wait took longer than its `timeout`; every timeout of the
    client raises this, so `except TimeoutError` catches them too."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(RPCError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(RPCError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(RPCError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(RPCError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(RPCError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(RPCError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(RPCError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(RPCError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(RPCError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(RPCError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(RPCError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(RPCError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[RPCError]] = {
    cls.code: cls
    for cls in (
        CancelledError, UnknownError, InvalidArgumentError, DeadlineExceededError,
        NotFoundError, AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError,
        FailedPreconditionError, AbortedError, OutOfRangeError, UnimplementedError,
        InternalError, UnavailableError, DataLossError, UnauthenticatedError,
    )
}  # fmt: skip


def from_rpc_error(exc: grpc.RpcError, *, address: str = "") -> RPCError:
    """The `RPCError` subclass for a failed call (sync or asyncio)."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE and address:
        details = (
            f"cannot reach the legato daemon at {address}: {details}. "
            "Start it with `legato serve` (or `make run`), or point LEGATO_ADDRESS at it"
        )
    return _BY_CODE.get(code, UnknownError)(details, code=code)


class TaskOutcomeError(LegatoError):
    """A task finished without a result."""

    def __init__(self, task: Task):
        super().__init__(f"task {task.id} {task.status.value}: {task.error or 'no reason given'}")
        self.task = task


class TaskFailedError(TaskOutcomeError):
    """The task ended FAILED; `task.error` says why."""


class TaskCanceledError(TaskOutcomeError):
    """The task was canceled; `task.error` holds the reason."""


class JobInterruptedError(LegatoError):
    """Work on a claimed task must stop: it was canceled or failed under the
    claim (e.g. its deadline passed), the lease was lost, or the client closed.

    Raised by a job's calls (`write`, `ask`, `heartbeat`) once the job is
    interrupted; `reason` says why and `task` is the task as last seen.
    """

    def __init__(self, task: Task, reason: str):
        super().__init__(reason)
        self.task = task
        self.reason = reason


class InexactValueError(LegatoError, ValueError):
    """A value in a task's context or result that the wire cannot carry exactly.

    Context and results travel as JSON numbers (doubles): an integer beyond
    ±(2**53 - 1) would come back rounded and NaN or infinity not at all, so
    they are refused before anything is sent. Send such a number as a string.
    """
