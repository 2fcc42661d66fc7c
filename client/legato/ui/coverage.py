"""Which labels the UI watches so that it sees every task in its view.

WatchTasks streams the events of tasks carrying given labels (or ids); the
contract has no "everything I may see". So the UI watches every label it
knows of: the agents' (an admin's view) or its own, and those of the tasks in
its view. A task created for a label nobody held before (a new agent's, a
typo) is found by a doorbell: while pages are open, the daemon's cursor
(`GetCursor`, one index lookup) is read every `DOORBELL_SECONDS`; when it has
moved past every event the watches delivered, the newest tasks are listed and
any new labels join the watch.

Replaying a new label's events: a task that a scan did not list was created
after that scan began, so all its events come after the cursor read before the
scan. When scan k finds new labels, `since` is that cursor of scan k-1, and
every open stream replays from it (`feed.Follower`); the page drops what it
already has by version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

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
        # Events of the tasks whose labels were added last all have a larger seq.
        self.since = 0
        # Grows each time `labels` does.
        self.generation = 0
        self._grown = asyncio.Event()
        self._scan_lock = asyncio.Lock()
        self._previous_scan_cursor = 0
        # Every event up to here is accounted for: delivered, or seen by a scan.
        self._accounted = 0
        self._tail_token = ""
        self._tail_ready = False
        self._listeners = 0
        self._wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Scans the agents and the open tasks; the full scan and the doorbell run on."""
        await self._scan(self._open_task_labels)
        self._tasks = [
            asyncio.create_task(self._full_scan()),
            asyncio.create_task(self._doorbell()),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
        """While a page is open: the doorbell rings, starting with a look now."""
        self._listeners += 1
        if self._listeners == 1:
            self._wanted.set()
            with contextlib.suppress(LegatoError):
                await self._scan(self._tail_labels)
        try:
            yield
        finally:
            self._listeners -= 1
            if not self._listeners:
                self._wanted.clear()

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

    async def _open_task_labels(self) -> set[str]:
        labels: set[str] = set()
        async for tasks, _, _ in self._pages(SCAN_PAGE, "", OPEN):
            labels.update(label for task in tasks for label in task.labels)
        return labels

    async def _all_task_labels(self) -> set[str]:
        labels: set[str] = set()
        async for tasks, token, _ in self._pages(SCAN_PAGE, ""):
            labels.update(label for task in tasks for label in task.labels)
            self._tail_token = token
        self._tail_ready = True
        return labels

    async def _tail_labels(self) -> set[str]:
        """Labels of the tasks created since the last scan (and of a few before)."""
        if not self._tail_ready:
            return set()
        labels: set[str] = set()
        async for tasks, token, _ in self._pages(TAIL_PAGE, self._tail_token):
            labels.update(label for task in tasks for label in task.labels)
            self._tail_token = token
        return labels

    async def _scan(self, task_labels: Callable[[], Awaitable[set[str]]]) -> None:
        async with self._scan_lock:
            before = await self._client.get_cursor()
            labels = await self._agent_labels() | await task_labels()
            new = labels - self.labels
            if new:
                self.labels = self.labels | new
                self.since = self._previous_scan_cursor
                self.generation += 1
                self._grown.set()
                log.info("watching %d labels (new: %s)", len(self.labels), " ".join(sorted(new)))
            self._previous_scan_cursor = before
            self._accounted = max(self._accounted, before)

    async def _full_scan(self) -> None:
        # Labels of finished tasks matter only to a page resuming from before
        # they finished; reading them all may take a while on a large daemon.
        while True:
            try:
                await self._scan(self._all_task_labels)
                return
            except LegatoError as exc:
                log.warning("listing all tasks failed, trying again: %s", exc)
                await asyncio.sleep(self._doorbell_seconds)  # backoff while the daemon is away

    async def _doorbell(self) -> None:
        rung: int | None = None
        while True:
            await self._wanted.wait()
            await asyncio.sleep(self._doorbell_seconds)  # the doorbell's period
            try:
                # A cursor read a period ago that the watches still have not
                # reached: its event belongs to a task outside them.
                if rung is not None and rung > self._accounted:
                    await self._scan(self._tail_labels)
                rung = await self._client.get_cursor()
            except LegatoError as exc:
                log.debug("doorbell: %s", exc)
                rung = None
