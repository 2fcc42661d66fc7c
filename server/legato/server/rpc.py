"""How every RPC handler answers errors: domain errors become their status codes
here, in one place; anything unexpected is logged and answered with INTERNAL,
so no request can bring the daemon down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from functools import wraps
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
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


class _Undecodable:
    """Stands in for a request whose bytes could not be parsed."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return parse


async def _refuse(context: Context, request: _Undecodable) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request could not be decoded ({request.error}): strings must be valid UTF-8, "
        "messages complete, and Struct values nested at most about 30 levels deep",
    )


class WireFormat(grpc.aio.ServerInterceptor):
    """What is about bytes on the wire, for every method, built once per method.

    - A request gRPC cannot parse (invalid UTF-8, a truncated message, a Struct
      nested too deep) would be answered UNKNOWN before any handler runs: it is
      INVALID_ARGUMENT with the parser's reason instead.
    - A streaming handler may yield responses it already serialized: a watch
      event goes to every watcher with the same bytes, and serializing it once
      for all of them, not once per stream, keeps fan-out close to a bare broadcast.
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
        if handler is None:
            return None
        cached = self._rebuilt.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._rebuild(handler))
            self._rebuilt[handler_call_details.method] = cached
        return cached[1]

    @staticmethod
    def _rebuild(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            behaviour: Any = handler.unary_unary  # an async callable under grpc.aio

            async def unary(request: Any, context: Context) -> Any:
                if isinstance(request, _Undecodable):
                    await _refuse(context, request)
                return await behaviour(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream_behaviour: Any = handler.unary_stream  # an async generator under grpc.aio
            serialize = handler.response_serializer

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _refuse(context, request)
                async for response in stream_behaviour(request, context):
                    yield response

            def bytes_or_serialized(response: Any) -> bytes:
                if isinstance(response, bytes) or serialize is None:
                    return response  # type: ignore[no-any-return]
                return serialize(response)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=bytes_or_serialized,
            )
        return handler
