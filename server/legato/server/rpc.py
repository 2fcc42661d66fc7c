"""How every RPC handler is called: wrapped once, when its servicer is registered.

One wrapper per method does what is the same for every call, in one coroutine:

- authentication (`auth.Authenticator`), in the RPC's own task, so the agent it
  puts in `auth.current_agent` is the handler's;
- wire format: a request gRPC cannot parse (invalid UTF-8, a truncated message,
  a Struct nested too deep) would be answered UNKNOWN before any handler runs:
  it is INVALID_ARGUMENT with the parser's reason instead; and a streaming
  handler may yield responses it already serialized (a watch event goes to
  every watcher with the same bytes, serialized once for all of them);
- errors: domain errors become their status codes here, in one place; anything
  unexpected is logged and answered with INTERNAL, so no request can bring the
  daemon down.

This is not done with grpc.aio server interceptors: they run on every call, a
coroutine each plus a handler lookup, and the ladder measured two of them at
about a third of a bare echo's rate (BENCHMARKS.md, "The CreateTask ladder").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from legato.server.errors import DomainError
from legato.server.events import SubscriptionClosed, SubscriptionOverflow, SubscriptionRevoked

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# Checks the caller of an RPC, raising a DomainError to refuse it.
Authenticate = Callable[[Context], Awaitable[None]]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message an RPC that raised `exc` is answered with."""
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


def guard(handler: Handler, authenticate: Authenticate | None) -> Handler:
    """`handler` wrapped as every legato method is (see the module's docstring);
    `authenticate` None leaves the method open (health checking).

    Methods with a streaming request are returned as they are: legato serves none.
    """
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary(handler.unary_unary, authenticate),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        serialize = handler.response_serializer

        def bytes_or_serialized(response: Any) -> bytes:
            if isinstance(response, bytes) or serialize is None:
                return response  # type: ignore[no-any-return]
            return serialize(response)

        return grpc.unary_stream_rpc_method_handler(
            _guard_stream(handler.unary_stream, authenticate),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=bytes_or_serialized,
        )
    return handler


def _guard_unary(behaviour: Any, authenticate: Authenticate | None) -> Any:
    async def unary(request: Any, context: Context) -> Any:
        try:
            if authenticate is not None:
                await authenticate(context)
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
            raise AssertionError("abort() returned") from exc  # abort always raises

    return unary


def _guard_stream(behaviour: Any, authenticate: Authenticate | None) -> Any:
    # The stream's own errors are the handler's to answer: it knows when a
    # watch ended by the client going away (CancelledError, which must propagate).
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        if authenticate is not None:
            try:
                await authenticate(context)
            except Exception as exc:
                code, message = status_of(exc)
                await context.abort(code, message)
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        async for response in behaviour(request, context):
            yield response

    return stream


class _Registrar:
    """Stands in for the server while generated code registers a servicer, to
    take its method handlers by name."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, Handler]]] = []

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        # The same handlers come again, by name, through the call below.
        pass

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, Handler]
    ) -> None:
        self.services.append((service_name, method_handlers))


def register(
    server: grpc.aio.Server,
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    *,
    authenticate: Authenticate | None,
) -> None:
    """Registers `servicer` on `server` through its generated `add_..._to_server`,
    every method wrapped once by `guard`."""
    registrar = _Registrar()
    add_to_server(servicer, registrar)
    if not registrar.services:
        raise RuntimeError(
            f"{add_to_server.__name__} registered no method by name: the generated code is "
            "older than this daemon expects; run 'make proto'"
        )
    for service_name, handlers in registrar.services:
        guarded = {name: guard(handler, authenticate) for name, handler in handlers.items()}
        # Not also add_registered_method_handlers, as generated code does: with
        # it, a create cost more server CPU (304 vs 343 µs at 32 in flight, the
        # ladder's A/B in one run).
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, guarded),)
        )
