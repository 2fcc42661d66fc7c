"""The AgentService RPC handlers: agent management for admins, WhoAmI for all."""

from __future__ import annotations

from legato.server.agents import AgentRegistry
from legato.server.auth import current_agent
from legato.server.convert import agent_proto, role
from legato.server.errors import InvalidArgument, PermissionDenied
from legato.server.model import AgentRecord, Role
from legato.server.rpc import Context
from legato.v1 import agents_pb2, agents_pb2_grpc

UPDATABLE = frozenset({"labels", "role"})


def _require_admin(action: str) -> AgentRecord:
    caller = current_agent.get()
    if not caller.admin:
        raise PermissionDenied(f"only an admin can {action}; agent {caller.name!r} is not one")
    return caller


def _require_self_or_admin(name: str, action: str) -> AgentRecord:
    caller = current_agent.get()
    if not caller.admin and caller.name != name:
        raise PermissionDenied(f"only an admin or agent {name!r} itself can {action}")
    return caller


class AgentService(agents_pb2_grpc.AgentServiceServicer):
    """legato.v1.AgentService over the agent registry."""

    def __init__(self, agents: AgentRegistry):
        self._agents = agents

    async def CreateAgent(
        self, request: agents_pb2.CreateAgentRequest, context: Context
    ) -> agents_pb2.CreateAgentResponse:
        _require_admin("create agents")
        agent, key = await self._agents.create(
            request.name, list(request.labels), role(request.role, default=Role.AGENT) or Role.AGENT
        )
        return agents_pb2.CreateAgentResponse(agent=agent_proto(agent), api_key=key)

    async def ListAgents(
        self, request: agents_pb2.ListAgentsRequest, context: Context
    ) -> agents_pb2.ListAgentsResponse:
        _require_admin("list agents")
        agents = self._agents.list(include_revoked=request.include_revoked)
        return agents_pb2.ListAgentsResponse(agents=[agent_proto(a) for a in agents])

    async def GetAgent(
        self, request: agents_pb2.GetAgentRequest, context: Context
    ) -> agents_pb2.Agent:
        _require_self_or_admin(request.name, "see it")
        return agent_proto(self._agents.get(request.name))

    async def UpdateAgent(
        self, request: agents_pb2.UpdateAgentRequest, context: Context
    ) -> agents_pb2.Agent:
        caller = _require_admin("update agents")
        paths = set(request.update_mask.paths) or UPDATABLE
        unknown = paths - UPDATABLE
        if unknown:
            raise InvalidArgument(
                f"update_mask has {', '.join(sorted(unknown))}; only labels and role can change"
            )
        new_role = role(request.role, default=None) if "role" in paths else None
        if "role" in paths and new_role is None:
            raise InvalidArgument("role is required when update_mask names it")
        if request.name == caller.name and new_role not in (None, Role.ADMIN):
            raise InvalidArgument(
                "an admin cannot take away its own admin role; do it as another admin"
            )
        agent = await self._agents.update(
            request.name,
            labels=list(request.labels) if "labels" in paths else None,
            role=new_role,
        )
        return agent_proto(agent)

    async def RevokeAgent(
        self, request: agents_pb2.RevokeAgentRequest, context: Context
    ) -> agents_pb2.Agent:
        caller = _require_admin("revoke agents")
        if request.name == caller.name:
            raise InvalidArgument("an admin cannot revoke itself; use another admin")
        return agent_proto(await self._agents.revoke(request.name))

    async def RotateKey(
        self, request: agents_pb2.RotateKeyRequest, context: Context
    ) -> agents_pb2.RotateKeyResponse:
        name = request.name or current_agent.get().name
        _require_self_or_admin(name, "rotate its key")
        agent, key = await self._agents.rotate(name)
        return agents_pb2.RotateKeyResponse(agent=agent_proto(agent), api_key=key)

    async def WhoAmI(self, request: agents_pb2.WhoAmIRequest, context: Context) -> agents_pb2.Agent:
        return agent_proto(self._agents.current(current_agent.get()))
