"""Which labels the UI watches so that it sees every task in its view.

WatchTasks streams the events of tasks carrying given labels (or ids); the
contract has no "everything I may see". So the UI watches every label it
knows of: the agents' (an admin's view) or its own, and those of the tasks in
its view. A task created for a label nobody held before (a new agent's, a
typo) is found by a doorbell: while pages are open, the daemon's cursor
(`GetCursor`, one index lookup) is read every `DOORBELL_SECONDS`; when it has
moved past every event the watches delivered, the newest tasks are listed and
any new labels join the watch.

Three scans, each with the cursor read before it (`before`):

- at start, the agents and the *open* tasks (those that can still change);
- then, in the background, every task, so that a page resuming from long ago
  also watches labels of tasks that finished since; this one can take a
  while on a large daemon, and it merges its labels page by page;
- on the doorbell, the agents and the newest tasks (from the last page on).

Replaying a new label's events: all events of a task a scan did not list come
after the `before` of that scan. Labels the full scan finds come from tasks
that were finished at the start (their events are not a live page's concern)
or created after it, so their `since` is the start's `before`; labels a
doorbell scan finds, the `before` of the scan before it. Every open stream
replays from `since` (`feed.Follower`); the page drops what it already has
by version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any

from legato.client import AsyncClient, LegatoError, Task, TaskStatus

log = logging.getLogger("legato.ui")

DOORBELL_SECONDS = 1.0
# The first scan lists these only: tasks that can still change.
OPEN = (TaskStatus.PENDING, TaskStatus.CLAIMED, TaskStatus.INPUT_REQUIRED)
SCAN_PAGE = 1000
# Re-reading the newest tasks: pages this small keep each look-up cheap.
TAIL_PAGE = 100


class Coverage:
    """The growing set of labels whose watches cover the UI's whole view."""

    def __init__(
        self, client: AsyncClient, *, admin: bool, doorbell_seconds: float = DOORBELL_SECONDS
    ):
        self._client = client
        self._admin = admin
        self._doorbell_seconds = doorbell_seconds
        self.labels: frozenset[str] = frozenset()
        # Grows each time `labels` does.
        self.generation = 0
        # For each generation: every event of a task with the labels it added
        # has a larger seq.
        self._sinces: list[int] = []
        self._grown = asyncio.Event()
        # The `before` of the start's scan, and of the last doorbell scan.
        self._started_at = 0
        self._last_look = 0
        # Every event up to here is accounted for: delivered, or seen by a scan.
        self._accounted = 0
        # Where the newest tasks start; set once the full scan has been through.
        self._tail_token: str | None = None
        self._look_lock = asyncio.Lock()
        self._listeners = 0
        self._wanted = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Scans the agents and the open tasks; the full scan and the doorbell run on."""
        before = await self._client.get_cursor()
        labels = await self._agent_labels()
        async for tasks, _, _ in self._pages(SCAN_PAGE, "", OPEN):
            labels.update(label for task in tasks for label in task.labels)
        self._started_at = self._last_look = before
        self._merge(labels, since=0, before=before)
        self._spawn(self._full_scan())
        self._spawn(self._doorbell())

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def since(self, generation: int) -> int:
        """A seq after which come all events of the tasks whose labels joined after `generation`."""
        return min(self._sinces[generation:], default=0)

    def saw(self, seq: int) -> None:
        """A watch over all of `labels` delivered the event `seq`."""
        self._accounted = max(self._accounted, seq)

    async def grown(self, generation: int) -> None:
        """Returns once `labels` has grown past `generation`."""
        while self.generation <= generation:
            self._grown.clear()
            await self._grown.wait()

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[None]:
        """While a page is open the doorbell rings, and a first look is taken now
        (labels may have come while no page was open)."""
        self._listeners += 1
        if self._listeners == 1:
            self._wanted.set()
            self._spawn(self._quiet_look())
        try:
            yield
        finally:
            self._listeners -= 1
            if not self._listeners:
                self._wanted.clear()

    def _merge(self, labels: set[str], *, since: int, before: int) -> None:
        new = labels - self.labels
        if new:
            self.labels = self.labels | new
            self._sinces.append(since)
            self.generation += 1
            self._grown.set()
            log.info("watching %d labels (new: %s)", len(self.labels), " ".join(sorted(new)))
        self._accounted = max(self._accounted, before)

    # -- scans --------------------------------------------------------------------

    async def _agent_labels(self) -> set[str]:
        if self._admin:
            agents = await self._client.list_agents(include_revoked=True)
            return {label for agent in agents for label in agent.labels}
        return set((await self._client.whoami()).labels)

    async def _pages(
        self, page_size: int, token: str, statuses: Iterable[TaskStatus] = ()
    ) -> AsyncIterator[tuple[list[Task], str, str]]:
        """Pages of tasks: each with the token that read it and the next one."""
        while True:
            page = await self._client.list_tasks(
                statuses=tuple(statuses), page_size=page_size, page_token=token
            )
            yield page.tasks, token, page.next_page_token
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def _full_scan(self) -> None:
        while True:
            try:
                before = await self._client.get_cursor()
                token = ""
                async for tasks, read_with, _ in self._pages(SCAN_PAGE, ""):
                    token = read_with
                    labels = {label for task in tasks for label in task.labels}
                    self._merge(labels, since=self._started_at, before=0)
                async with self._look_lock:
                    self._tail_token = token
                    self._last_look = max(self._last_look, before)
                    self._merge(set(), since=0, before=before)
                return
            except LegatoError as exc:
                log.warning("listing every task failed, trying again: %s", exc)
                await asyncio.sleep(self._doorbell_seconds)  # backoff while the daemon is away

    async def _look(self) -> None:
        """The agents and the newest tasks: their labels join, replayed from the last look."""
        async with self._look_lock:
            before = await self._client.get_cursor()
            labels = await self._agent_labels()
            tail = self._tail_token
            if tail is not None:
                async for tasks, token, _ in self._pages(TAIL_PAGE, tail):
                    labels.update(label for task in tasks for label in task.labels)
                    tail = token
                self._tail_token = tail
                since = self._last_look
                self._last_look = before
            else:
                since = self._started_at  # the full scan is still on its way
            self._merge(labels, since=since, before=before)

    async def _quiet_look(self) -> None:
        try:
            await self._look()
        except LegatoError as exc:
            log.debug("look: %s", exc)

    async def _doorbell(self) -> None:
        rung: int | None = None
        while True:
            await self._wanted.wait()
            await asyncio.sleep(self._doorbell_seconds)  # the doorbell's period
            try:
                # A cursor read a period ago that the watches still have not
                # reached: its event belongs to a task outside them.
                if rung is not None and rung > self._accounted:
                    await self._look()
                rung = await self._client.get_cursor()
            except LegatoError as exc:
                log.debug("doorbell: %s", exc)
                rung = None
