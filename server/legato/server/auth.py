"""Authentication: one server interceptor in front of every legato.v1 RPC.

It reads `authorization: Bearer <key>` metadata, resolves the agent and hands
it to the handler through `current_agent`. The check runs inside the wrapped
handler rather than in `intercept_service` itself: that way it runs in the
RPC's own task, where the context variable it sets is the handler's, and a
refusal is an ordinary abort of the right kind for unary and streaming calls.

Health checking and reflection stay open: probes carry no key, and neither
service reveals anything about tasks or agents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
from legato.server.agents import AgentRegistry
from legato.server.errors import DomainError, Unauthenticated
from legato.server.model import AgentRecord

current_agent: ContextVar[AgentRecord] = ContextVar("legato_current_agent")

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
Context = grpc.aio.ServicerContext[Any, Any]


def bearer_key(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer lgt_...'")
            return token.strip()
    raise Unauthenticated(
        "no API key: send 'authorization: Bearer lgt_...' metadata "
        "(the Python client and CLI read LEGATO_AGENT_KEY)"
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a live agent's key with UNAUTHENTICATED."""

    def __init__(self, agents: AgentRegistry):
        self._agents = agents
        # The guarded handler of each method, built once: rebuilding it on
        # every call showed in the profile of a busy daemon.
        self._guarded: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def _authenticate(self, context: Context) -> AgentRecord:
        agent = await self._agents.authenticate_anywhere(bearer_key(context))
        current_agent.set(agent)
        return agent

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._guard(method, handler))
            self._guarded[method] = cached
        return cached[1]

    def _guard(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"{method}: client-streaming methods are not served by legato")

    def _guard_unary(self, behaviour: Any) -> Any:
        async def guarded(request: Any, context: Context) -> Any:
            try:
                await self._authenticate(context)
            except DomainError as exc:
                await context.abort(exc.code, exc.message)
            return await behaviour(request, context)

        return guarded

    def _guard_stream(self, behaviour: Any) -> Any:
        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                await self._authenticate(context)
            except DomainError as exc:
                await context.abort(exc.code, exc.message)
            async for response in behaviour(request, context):
                yield response

        return guarded
