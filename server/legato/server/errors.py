"""Domain errors of the daemon, each tied to the gRPC status code it becomes.

The service layer turns them into statuses in one place; their messages go to
the caller as they are, so each says what to change.
"""

from __future__ import annotations

import grpc


class DomainError(Exception):
    """A request that cannot be carried out; nothing was changed."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(DomainError):
    """The daemon cannot serve the call right now; retrying later may work."""

    code = grpc.StatusCode.UNAVAILABLE
