"""How every RPC handler answers errors: domain errors become their status codes
here, in one place; anything unexpected is logged and answered with INTERNAL,
so no request can bring the daemon down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
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


class PassThroughBytes(grpc.aio.ServerInterceptor):
    """Lets a streaming handler yield responses it already serialized.

    A watch event goes to every watcher with the same bytes: serializing it once
    for all of them, instead of once per stream, is what keeps fan-out to many
    watchers close to a bare broadcast.
    """

    def __init__(self) -> None:
        self._rebuilt: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_stream is None or handler.response_serializer is None:
            return handler
        cached = self._rebuilt.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            serialize = handler.response_serializer

            def bytes_or_serialized(response: Any) -> bytes:
                return response if isinstance(response, bytes) else serialize(response)

            rebuilt = grpc.unary_stream_rpc_method_handler(
                handler.unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=bytes_or_serialized,
            )
            cached = (handler, rebuilt)
            self._rebuilt[handler_call_details.method] = cached
        return cached[1]
