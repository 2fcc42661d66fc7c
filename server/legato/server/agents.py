"""The agents of the daemon: identity, keys, labels and roles.

All agents are held in memory (a developer machine has a handful) and every
change is written through to the store before it is acknowledged, so the
in-memory view is always the stored one: authentication costs no I/O.

A change is written as an UPDATE of what it changes and applied, once
committed and in commit order, to the agent as it is in memory then, never to
a copy taken before: two changes in flight at once (a rotation and the
last-seen bookkeeping of the call that asked for it, an update and a
revocation) both hold, in memory and on disk.

On a database shared with other daemons, agents also change elsewhere: the
store hands over each agent as stored when it changed (`_stored`), and says
when it can no longer vouch for what is in memory (`AgentStore.fresh`); keys
are then refused rather than trusted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

from legato.common.paths import ADMIN_KEY_FILE
from legato.server import keys, limits
from legato.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from legato.server.model import AgentRecord, Clock, Role
from legato.server.store import AgentStore

log = logging.getLogger(__name__)

ADMIN_NAME = "admin"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# last_seen_at is kept to the minute: a write per call would cost more than it tells.
SEEN_RESOLUTION_US = 60 * 1_000_000


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"name {name[:80]!r} is not a valid agent name: 1 to 63 of a-z, 0-9, '.', '_' "
            "or '-', starting with a letter or digit (e.g. 'researcher')"
        )
    return name


class AgentRegistry:
    """Agents by name and by key id, written through to the store."""

    def __init__(self, store: AgentStore, clock: Clock):
        self._store = store
        self._clock = clock
        self._by_name: dict[str, AgentRecord] = {}
        self._by_key_id: dict[str, str] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Called with an agent's name when its key stops working (revoke, rotate).
        self.on_key_invalidated: Callable[[str], None] = lambda name: None
        # Awaited with an agent's name once it is revoked: what it held goes back.
        self.on_revoked: Callable[[str], Awaitable[None]] = _nothing_held
        # Called with an agent's name when its labels or role changed.
        self.on_access_changed: Callable[[str], None] = lambda name: None

    @classmethod
    async def open(cls, store: AgentStore, clock: Clock) -> AgentRegistry:
        registry = cls(store, clock)
        for agent in await store.all():
            registry._remember(agent)
        store.on_changed = registry._stored
        return registry

    def _stored(self, agent: AgentRecord) -> None:
        """An agent as stored, changed by another daemon or re-read: memory follows,
        and whatever depends on its key or its access hears of it."""
        old = self._by_name.get(agent.name)
        seen = None if old is None else old.last_seen_at
        if seen is not None and (agent.last_seen_at is None or agent.last_seen_at < seen):
            agent = replace(agent, last_seen_at=seen)
        if old == agent:
            return
        self._remember(agent)
        if old is None:
            return
        if (agent.revoked and not old.revoked) or agent.key_id != old.key_id:
            log.info("agent %s changed elsewhere: its old key no longer works", agent.name)
            self.on_key_invalidated(agent.name)
        if agent.labels != old.labels or agent.role != old.role:
            self.on_access_changed(agent.name)

    def _remember(self, agent: AgentRecord) -> AgentRecord:
        old = self._by_name.get(agent.name)
        if old is not None:
            self._by_key_id.pop(old.key_id, None)
        self._by_name[agent.name] = agent
        if not agent.revoked:
            self._by_key_id[agent.key_id] = agent.name
        return agent

    # -- lookups --------------------------------------------------------------------

    def authenticate(self, key: str) -> AgentRecord:
        """The live agent this key belongs to; UNAUTHENTICATED otherwise.

        Messages never contain the key.
        """
        if not self._store.fresh():
            raise Unavailable(
                "this daemon has not been able to re-read its agents from the shared database "
                "lately, so it cannot tell whether this key still works; retry in a moment or "
                "use another daemon"
            )
        key_id = keys.key_id_of(key)
        if key_id is None:
            raise Unauthenticated(
                "malformed API key: send 'authorization: Bearer lgt_...' with the key "
                "`legato agent add` printed"
            )
        name = self._by_key_id.get(key_id)
        agent = self._by_name.get(name) if name else None
        if agent is None or agent.revoked or not keys.matches(key, agent.key_hash):
            raise Unauthenticated(
                "unknown, rotated or revoked API key; ask an admin for a new one "
                "(`legato agent rotate NAME`)"
            )
        self._seen(agent)
        return agent

    async def authenticate_anywhere(self, key: str) -> AgentRecord:
        """`authenticate`, and on a database shared with other daemons, a key this
        daemon does not know yet (its agent made or given it elsewhere a moment
        ago) is looked up before it is refused."""
        try:
            return self.authenticate(key)
        except Unauthenticated:
            key_id = keys.key_id_of(key)
            if key_id is None or self._key_known(key_id, key):
                raise
            stored = await self._store.by_key_id(key_id)
            if stored is None:
                raise
            self._stored(stored)
        return self.authenticate(key)

    def _key_known(self, key_id: str, key: str) -> bool:
        name = self._by_key_id.get(key_id)
        agent = self._by_name.get(name) if name else None
        return agent is not None and keys.matches(key, agent.key_hash)

    def get(self, name: str) -> AgentRecord:
        agent = self._by_name.get(name)
        if agent is None:
            raise NotFound(f"agent {name!r} not found")
        return agent

    def current(self, agent: AgentRecord) -> AgentRecord:
        """The agent as it is now (labels and role may have changed since a call began)."""
        return self._by_name.get(agent.name, agent)

    def live(self, agent: AgentRecord) -> AgentRecord:
        """The agent as it is now, while the key `agent` was authenticated with works.

        A call carries its agent as it was when it was authenticated; one that
        acts later (a claim that waited, a decision inside a transaction) asks
        here whether its agent was revoked or its key rotated meanwhile. Safe
        on the database thread: it only reads, and records are immutable.
        """
        current = self._by_name.get(agent.name)
        if current is None or current.revoked:
            raise Unauthenticated(
                f"agent {agent.name!r} was revoked while this call was in progress; its key no "
                "longer works (an admin can add a new agent: `legato agent add NAME`)"
            )
        if current.key_id != agent.key_id:
            raise Unauthenticated(
                f"the key of agent {agent.name!r} was rotated while this call was in progress; "
                "call again with the new key"
            )
        return current

    def list(self, *, include_revoked: bool) -> list[AgentRecord]:
        return [a for a in self._by_name.values() if include_revoked or not a.revoked]

    def label_held(self, label: str) -> bool:
        return any(label in a.labels for a in self._by_name.values() if not a.revoked)

    # -- changes --------------------------------------------------------------------

    async def create(self, name: str, labels: Sequence[str], role: Role) -> tuple[AgentRecord, str]:
        """A new agent and its key (the only time the key exists outside the caller)."""
        key, key_id, key_hash = keys.issue()
        agent = AgentRecord(
            name=check_name(name),
            labels=limits.check_labels("labels", labels, required=False),
            role=role,
            created_at=self._clock(),
            key_id=key_id,
            key_hash=key_hash,
        )
        await self._store.insert(agent, applied=lambda: self._remember(agent))
        log.info("agent %s created (%s)", agent.name, agent.role.name.lower())
        return agent, key

    async def update(
        self, name: str, *, labels: Sequence[str] | None, role: Role | None
    ) -> AgentRecord:
        checked = None if labels is None else limits.check_labels("labels", labels, required=False)
        updated = await self._change(
            name,
            "updated",
            lambda applied: self._store.set_labels_role(
                name, labels=checked, role=role, applied=applied
            ),
            lambda agent: replace(
                agent,
                labels=agent.labels if checked is None else checked,
                role=agent.role if role is None else role,
            ),
        )
        self.on_access_changed(name)
        return updated

    async def revoke(self, name: str) -> AgentRecord:
        revoked = await self._change(
            name,
            "revoked",
            lambda applied: self._store.revoke(name, applied=applied),
            lambda agent: replace(agent, revoked=True),
        )
        log.info("agent %s revoked", name)
        self.on_key_invalidated(name)
        await self.on_revoked(name)
        return revoked

    async def rotate(self, name: str) -> tuple[AgentRecord, str]:
        key, key_id, key_hash = keys.issue()
        rotated = await self._change(
            name,
            "given a new key",
            lambda applied: self._store.set_key(name, key_id, key_hash, applied=applied),
            lambda agent: replace(agent, key_id=key_id, key_hash=key_hash),
        )
        log.info("agent %s has a new key", name)
        self.on_key_invalidated(name)
        return rotated, key

    async def _change(
        self,
        name: str,
        action: str,
        write: Callable[[Callable[[], None]], Awaitable[bool]],
        change: Callable[[AgentRecord], AgentRecord],
    ) -> AgentRecord:
        """Writes a change of a live agent, then applies `change` to it in memory."""
        self._live(name, action)
        changed: list[AgentRecord] = []

        def applied() -> None:
            changed.append(self._remember(change(self._by_name[name])))

        if not await write(applied):
            # Revoked by a change written between the check above and this one.
            raise FailedPrecondition(f"agent {name!r} is revoked and cannot be {action}")
        return changed[0]

    def _live(self, name: str, action: str) -> AgentRecord:
        agent = self.get(name)
        if agent.revoked:
            raise FailedPrecondition(f"agent {name!r} is revoked and cannot be {action}")
        return agent

    def _seen(self, agent: AgentRecord) -> None:
        now = self._clock()
        if agent.last_seen_at is not None and now - agent.last_seen_at < SEEN_RESOLUTION_US:
            return
        self._remember(replace(agent, last_seen_at=now))
        # Only the one column: a whole record written here, after a change the
        # same call makes (its first of the minute may be a rotation), would
        # undo that change on disk.
        task = asyncio.create_task(self._store.touch_last_seen(agent.name, now))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def bootstrap_admin(self, data_dir: Path, *, shared: bool = False) -> Path:
        """Makes sure `admin.key` in the data dir holds a working admin key.

        On first start this creates the `admin` agent. If the file was deleted,
        the admin gets a new key: whoever may start the daemon on this data dir
        owns its database anyway. On a database `shared` with other daemons,
        see `_join`: the admin is never given a new key there.
        """
        path = data_dir / ADMIN_KEY_FILE
        if shared:
            return await self._join(path)
        if path.exists() and ADMIN_NAME in self._by_name:
            return path
        if ADMIN_NAME in self._by_name:
            admin = self._by_name[ADMIN_NAME]
            if admin.revoked or not admin.admin:
                await self._store.reinstate_admin(
                    ADMIN_NAME,
                    applied=lambda: self._remember(
                        replace(self._by_name[ADMIN_NAME], revoked=False, role=Role.ADMIN)
                    ),
                )
            _, key = await self.rotate(ADMIN_NAME)
        else:
            _, key = await self.create(ADMIN_NAME, (), Role.ADMIN)
        _write_private(path, key + "\n")
        log.info("admin key written to %s", path)
        return path

    async def _join(self, path: Path) -> Path:
        """The admin bootstrap on a shared database: the first daemon creates the
        admin and writes its key; every later one uses that admin as it is.

        A new key here would break the key every other daemon's users hold, so
        a daemon whose data dir has no admin.key only says where to get one.
        """
        if ADMIN_NAME not in self._by_name:
            try:
                _, key = await self.create(ADMIN_NAME, (), Role.ADMIN)
            except AlreadyExists:
                # Another daemon starting at the same moment made it first.
                for agent in await self._store.all():
                    self._stored(agent)
            else:
                _write_private(path, key + "\n")
                log.info("admin key written to %s", path)
                return path
        _check_joined_key(path, self._by_name.get(ADMIN_NAME))
        return path

    async def flush(self) -> None:
        """Waits for pending last-seen writes (before the database closes)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _check_joined_key(path: Path, admin: AgentRecord | None) -> None:
    """Says what to do when a daemon joining a shared database has no working admin.key."""
    if not path.exists():
        log.warning(
            "this database already has an admin, made by the first daemon that served it; "
            "its key is in that daemon's data dir (%s). Copy that file to %s (mode 0600) "
            "for `legato` commands run against this daemon, or pass --key; any admin can "
            "issue further keys (`legato agent add NAME --role admin`)",
            ADMIN_KEY_FILE,
            path,
        )
    elif (
        admin is None or admin.revoked or not keys.matches(path.read_text().strip(), admin.key_hash)
    ):
        log.warning(
            "%s does not hold the admin's current key (it was rotated or revoked through "
            "another daemon); copy the current one from wherever it was saved",
            path,
        )


async def _nothing_held(name: str) -> None:
    return None
