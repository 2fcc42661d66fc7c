"""Authentication of every legato.v1 RPC.

It reads `authorization: Bearer <key>` metadata, resolves the agent and hands
it to the handler through `current_agent`. `rpc.register` calls it from the
wrapper of each method, inside the RPC's own task, where the context variable
it sets is the handler's, and a refusal is an ordinary abort of the right kind
for unary and streaming calls.

Health checking and reflection stay open: probes carry no key, and neither
service reveals anything about tasks or agents.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import grpc
from legato.server.agents import AgentRegistry
from legato.server.errors import Unauthenticated
from legato.server.model import AgentRecord

current_agent: ContextVar[AgentRecord] = ContextVar("legato_current_agent")

Context = grpc.aio.ServicerContext[Any, Any]


def bearer_key(context: Context) -> str:
    """The API key of the call's `authorization: Bearer` metadata."""
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


class Authenticator:
    """Refuses calls without a live agent's key with UNAUTHENTICATED (an
    `rpc.Authenticate`)."""

    def __init__(self, agents: AgentRegistry):
        self._agents = agents

    async def __call__(self, context: Context) -> None:
        """Sets `current_agent` to the caller, or raises Unauthenticated."""
        current_agent.set(await self._agents.authenticate_anywhere(bearer_key(context)))
