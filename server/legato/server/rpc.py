"""How every RPC handler answers errors: domain errors become their status codes
here, in one place; anything unexpected is logged and answered with INTERNAL,
so no request can bring the daemon down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, TypeVar

import grpc
from legato.server.errors import DomainError
from legato.server.events import SubscriptionClosed, SubscriptionOverflow, SubscriptionRevoked

log = logging.getLogger(__name__)

Servicer = TypeVar("Servicer")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, DomainError):
        return exc.code, exc.message
    if isinstance(exc, SubscriptionOverflow):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the watcher fell too far behind and was cut off; "
            "resume with after_seq set to the last seq received",
        )
    if isinstance(exc, SubscriptionRevoked):
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            "the API key of this stream was revoked or rotated; reconnect with a current key",
        )
    if isinstance(exc, SubscriptionClosed):
        return (
            grpc.StatusCode.UNAVAILABLE,
            "the daemon is shutting down; resume with after_seq set to the last seq received",
        )
    log.error("request failed unexpectedly", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error in the legato daemon; see its log"


def unary(
    handler: Callable[[Servicer, Req, Context], Coroutine[Any, Any, Resp]],
) -> Callable[[Servicer, Req, Context], Coroutine[Any, Any, Resp]]:
    @wraps(handler)
    async def wrapped(self: Servicer, request: Req, context: Context) -> Resp:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
            raise AssertionError("abort() returned") from exc  # abort always raises

    return wrapped
