"""Who an agent is, as it is now: key rotations, revocations and label changes
hold across restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from legato.client import AsyncClient, Role
from legato.client.errors import UnauthenticatedError
from legato.server.agents import AgentRegistry
from legato.server.daemon import Config, Daemon
from legato.server.errors import FailedPrecondition
from legato.server.tasks import TaskManager

# -- helpers ----------------------------------------------------------------------------


def manager_of(daemon: Daemon) -> TaskManager:
    assert daemon.tasks is not None, "the daemon is not running"
    return daemon.tasks


def registry_of(daemon: Daemon) -> AgentRegistry:
    return manager_of(daemon).agents


@asynccontextmanager
async def as_admin(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    key = daemon.admin_key_path.read_text().strip()
    async with AsyncClient(daemon.config.address, api_key=key, timeout=10) as client:
        yield client


async def key_works(daemon: Daemon, key: str) -> bool:
    async with AsyncClient(daemon.config.address, api_key=key, timeout=10) as client:
        try:
            await client.whoami()
        except UnauthenticatedError:
            return False
    return True


# -- agent changes are not undone on disk -----------------------------------------------


async def test_a_rotation_as_the_agents_first_call_survives_a_restart(config: Config) -> None:
    async with Daemon(config) as daemon:
        async with as_admin(daemon) as admin:
            _, old = await admin.create_agent("worker", labels=["@work"])
        async with AsyncClient(config.address, api_key=old, timeout=10) as worker:
            _, new = await worker.rotate_key()  # its first call: last_seen_at is written too

    async with Daemon(config) as restarted:
        assert not await key_works(restarted, old)
        assert await key_works(restarted, new)


async def test_an_update_as_the_agents_first_call_survives_a_restart(config: Config) -> None:
    async with Daemon(config) as daemon:
        async with as_admin(daemon) as admin:
            _, key = await admin.create_agent("ops", labels=["@old"], role=Role.ADMIN)
        async with AsyncClient(config.address, api_key=key, timeout=10) as ops:
            await ops.update_agent("ops", labels=["@new"])  # its first call

    async with Daemon(config) as restarted, as_admin(restarted) as admin:
        assert (await admin.get_agent("ops")).labels == ("@new",)


async def test_a_revocation_survives_the_agents_first_call_landing_during_it(
    config: Config,
) -> None:
    async with Daemon(config) as daemon:
        async with as_admin(daemon) as admin:
            _, key = await admin.create_agent("worker", labels=["@work"])
        registry = registry_of(daemon)
        # The registry is driven directly to pin the interleaving of a race: the
        # worker's first call of the minute is authenticated while the revocation
        # is being written, before it takes effect.
        revoking = asyncio.create_task(registry.revoke("worker"))
        await asyncio.sleep(0)  # one step: the revocation is now in the writer's queue
        registry.authenticate(key)
        await revoking
        assert not await key_works(daemon, key)

    async with Daemon(config) as restarted, as_admin(restarted) as admin:
        assert not await key_works(restarted, key)
        assert (await admin.get_agent("worker")).revoked


async def test_concurrent_changes_of_one_agent_all_hold(config: Config) -> None:
    async with Daemon(config) as daemon:
        async with as_admin(daemon) as admin:
            await admin.create_agent("worker", labels=["@old"])
            await admin.create_agent("leaver", labels=["@old"])
        registry = registry_of(daemon)
        # Started together, each reads the agent before the other has written it.
        _, (_, new_key) = await asyncio.gather(
            registry.update("worker", labels=["@new"], role=None), registry.rotate("worker")
        )
        revoked, rotated = await asyncio.gather(
            registry.revoke("leaver"), registry.rotate("leaver"), return_exceptions=True
        )
        assert not isinstance(revoked, BaseException)
        # The revocation was written first: the rotation must not bring the agent back.
        assert isinstance(rotated, FailedPrecondition), rotated
        assert "revoked" in rotated.message
        assert registry.get("worker").labels == ("@new",)
        assert registry.get("leaver").revoked

    async with Daemon(config) as restarted, as_admin(restarted) as admin:
        assert await key_works(restarted, new_key)
        assert (await admin.get_agent("worker")).labels == ("@new",)
        assert (await admin.get_agent("leaver")).revoked
