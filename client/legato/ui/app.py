"""The web UI's HTTP face: the page, its JSON endpoints and its event stream.

Every endpoint under /api/ needs a session (see `security`); the ones that
change something are POSTs with the CSRF header. The daemon is reached only
through the client, with the key `legato ui` was started with; the key never
reaches the browser.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from legato.client import (
    Agent,
    AsyncClient,
    EventType,
    LegatoError,
    Role,
    RPCError,
    Task,
    TaskEvent,
    TaskStatus,
)
from legato.client.errors import UnauthenticatedError
from legato.ui import wire
from legato.ui.feed import Follower, Stopped, keepalive, sse
from legato.ui.security import (
    CSRF_HEADER,
    Guard,
    HostNames,
    RequestGuard,
    Session,
    csrf_failed,
    unauthorized,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
# The list page loads at most this many tasks (oldest first, as ListTasks
# gives them); filters narrow it.
MAX_LISTED = 5000
# Children of a task whose output the task page loads.
MAX_TREE_OUTPUTS = 200
KEEPALIVE_SECONDS = 15.0
# How often at most a stream tells the page it has moved on past events it
# did not need (its resume point), when nothing else is sent.
CURSOR_EVERY = 1.0
RECONNECT_MS = 1000

_STATUS_OF = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNAUTHENTICATED: 502,
}

Handler = Callable[[Request], Awaitable[Response]]


def _error(exc: LegatoError) -> JSONResponse:
    status = _STATUS_OF.get(exc.code, 502) if isinstance(exc, RPCError) else 502
    message = exc.message if isinstance(exc, RPCError) else str(exc)
    if isinstance(exc, UnauthenticatedError):
        message = f"the daemon no longer accepts the key legato ui runs with: {message}"
    return JSONResponse({"error": message}, status_code=status)


def _no_store(response: Response) -> Response:
    response.headers["cache-control"] = "no-store"
    return response


@dataclass
class UI:
    """What the endpoints share: the client, the guard, who we are."""

    client: AsyncClient
    guard: Guard
    me: Agent
    hosts: HostNames
    followers: set[Follower] = field(default_factory=set)

    @property
    def admin(self) -> bool:
        return self.me.role is Role.ADMIN

    def stop_streams(self) -> None:
        """Ends every open event stream (on shutdown), so the server can stop at once."""
        for follower in list(self.followers):
            follower.stop()

    def app(self) -> Starlette:
        page = self._page
        routes = [
            Route("/", page),
            Route("/tasks/{task_id}", page),
            Route("/agents", page),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            Route("/api/session", self._session_open, methods=["POST"]),
            Route("/api/session", self._signed_in(self._session_show), methods=["GET"]),
            Route("/api/tasks", self._signed_in(self._tasks)),
            Route("/api/tasks/{task_id}", self._signed_in(self._task)),
            Route("/api/tasks/{task_id}/summary", self._signed_in(self._task_summary)),
            Route("/api/tasks/{task_id}/full", self._signed_in(self._task_full)),
            Route("/api/tasks/{task_id}/answer", self._changes(self._answer), methods=["POST"]),
            Route("/api/tasks/{task_id}/cancel", self._changes(self._cancel), methods=["POST"]),
            Route("/api/agents", self._signed_in(self._agents)),
            Route("/api/events", self._signed_in(self._events)),
        ]
        app = Starlette(routes=routes)
        app.add_middleware(RequestGuard, hosts=self.hosts)
        return app

    # -- sessions -------------------------------------------------------------------

    def _session_of(self, request: Request) -> Session | None:
        return self.guard.session(request.cookies.get(self.guard.cookie))

    def _signed_in(self, handler: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            if self._session_of(request) is None:
                return unauthorized()
            try:
                return _no_store(await handler(request))
            except LegatoError as exc:
                return _error(exc)

        return checked

    def _changes(self, handler: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            session = self._session_of(request)
            if session is None:
                return unauthorized()
            offered = request.headers.get(CSRF_HEADER, "")
            if not offered or not hmac.compare_digest(offered.encode(), session.csrf.encode()):
                return csrf_failed()
            try:
                return _no_store(await handler(request))
            except LegatoError as exc:
                return _error(exc)

        return checked

    def _whoami(self, session: Session) -> dict[str, Any]:
        return {
            "csrf": session.csrf,
            "agent": {"name": self.me.name, "role": self.me.role.value, "labels": self.me.labels},
        }

    async def _page(self, request: Request) -> Response:
        return _no_store(FileResponse(STATIC / "index.html"))

    async def _session_open(self, request: Request) -> Response:
        body = await _json_body(request)
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not self.guard.token_matches(token):
            return JSONResponse(
                {"error": "wrong token: open the link this start of `legato ui` printed"},
                status_code=401,
            )
        cookie, session = self.guard.new_cookie()
        response = _no_store(JSONResponse(self._whoami(session)))
        # No Max-Age: the cookie ends with the browser session; the signed
        # expiry inside ends it after SESSION_SECONDS anyway.
        response.set_cookie(self.guard.cookie, cookie, httponly=True, samesite="strict", path="/")
        return response

    async def _session_show(self, request: Request) -> Response:
        session = self._session_of(request)
        assert session is not None
        return JSONResponse(self._whoami(session))

    # -- reads ------------------------------------------------------------------------

    async def _tasks(self, request: Request) -> Response:
        label = request.query_params.get("label", "")
        tasks: list[Task] = []
        cursor, token = -1, ""
        while len(tasks) < MAX_LISTED:
            page = await self.client.list_tasks(
                labels=[label] if label else (),
                page_size=min(1000, MAX_LISTED - len(tasks)),
                page_token=token,
            )
            if cursor < 0:
                # Each later page is at least as new; events after the first
                # page's cursor are folded on by version.
                cursor = page.cursor
            tasks.extend(page.tasks)
            token = page.next_page_token
            if not token:
                break
        known = await self._agent_labels()
        return JSONResponse(
            {
                "cursor": cursor,
                "tasks": [wire.summary(task) for task in tasks],
                "truncated": bool(token),
                "labels": sorted(known | {label for task in tasks for label in task.labels}),
            }
        )

    async def _agent_labels(self) -> set[str]:
        """The labels agents hold: every agent's in an admin's view, else our own."""
        if self.admin:
            agents = await self.client.list_agents(include_revoked=True)
            return {label for agent in agents for label in agent.labels}
        return set((await self.client.whoami()).labels)

    async def _task_summary(self, request: Request) -> Response:
        task = await self.client.get_task(request.path_params["task_id"])
        return JSONResponse({"task": wire.summary(task)})

    async def _task_full(self, request: Request) -> Response:
        task = await self.client.get_task(request.path_params["task_id"])
        return JSONResponse({"task": wire.full(task)})

    async def _task(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        # The cursor first: whatever happens after it streams in, and the page
        # drops what these reads already show (by version, by seq).
        cursor = await self.client.get_cursor()
        task = await self.client.get_task(task_id)
        tree = await self.client.get_task_tree(task_id)
        history = await self.client.task_history(task_id)
        children = await self._with_outputs([t for t in tree if t.id != task_id])
        return JSONResponse(
            {
                "cursor": cursor,
                "task": wire.full(task),
                "tree": [wire.full(child) for child in children],
                "history": [wire.event(change, texts=True, chunk_text=False) for change in history],
            }
        )

    async def _with_outputs(self, tasks: list[Task]) -> list[Task]:
        """The tasks, the first `MAX_TREE_OUTPUTS` with output read again with it."""
        limit = asyncio.Semaphore(16)

        async def reread(task: Task) -> Task:
            async with limit:
                try:
                    return await self.client.get_task(task.id)
                except LegatoError:
                    return task

        wanted = [t for t in tasks if t.output_size][:MAX_TREE_OUTPUTS]
        fresh = {t.id: t for t in await asyncio.gather(*(reread(t) for t in wanted))}
        return [fresh.get(task.id, task) for task in tasks]

    async def _agents(self, request: Request) -> Response:
        if not self.admin:
            return JSONResponse(
                {
                    "error": f"the agents page needs the admin key; legato ui runs with the key "
                    f"of agent {self.me.name}. Start it without --key (it then uses admin.key "
                    "from the data dir) to see every agent."
                },
                status_code=403,
            )
        cursor = await self.client.get_cursor()
        agents = await self.client.list_agents(include_revoked=True)
        held: dict[str, list[Task]] = {}
        token = ""
        while True:
            page = await self.client.list_tasks(
                statuses=(TaskStatus.CLAIMED, TaskStatus.INPUT_REQUIRED),
                page_size=1000,
                page_token=token,
            )
            for task in page.tasks:
                held.setdefault(task.claimed_by, []).append(task)
            token = page.next_page_token
            if not token:
                break
        return JSONResponse(
            {
                "cursor": cursor,
                "agents": [wire.agent(agent, held.get(agent.name, [])) for agent in agents],
            }
        )

    # -- changes -----------------------------------------------------------------------

    async def _answer(self, request: Request) -> Response:
        body = await _json_body(request)
        answer = body.get("answer") if isinstance(body, dict) else None
        if not isinstance(answer, str) or not answer.strip():
            return JSONResponse({"error": "write an answer first"}, status_code=400)
        task = await self.client.provide_input(request.path_params["task_id"], answer)
        return JSONResponse({"task": wire.summary(task)})

    async def _cancel(self, request: Request) -> Response:
        body = await _json_body(request)
        options = body if isinstance(body, dict) else {}
        reason = options.get("reason", "")
        task = await self.client.cancel_task(
            request.path_params["task_id"],
            reason if isinstance(reason, str) else "",
            keep_children=options.get("keep_children") is True,
        )
        return JSONResponse({"task": wire.summary(task)})

    # -- the event stream ---------------------------------------------------------------

    async def _events(self, request: Request) -> Response:
        after = _resume_point(request)
        if after is None:
            after = await self.client.get_cursor()
        task_id = request.query_params.get("task", "")
        label = request.query_params.get("label", "")
        scope: _Scope = _ListScope()
        if task_id:
            tree = _TreeScope(self.client, await self.client.get_task(task_id))
            await tree.load()
            scope = tree
        # A task page follows the whole view: its descendants may carry any labels.
        follower = Follower(
            self.client, after=after, labels=[label] if label and not task_id else ()
        )
        body = self._stream(follower, scope, after)
        return StreamingResponse(
            body, media_type="text/event-stream", headers={"x-accel-buffering": "no"}
        )

    async def _stream(self, follower: Follower, scope: _Scope, after: int) -> AsyncIterator[bytes]:
        yield sse(retry=RECONNECT_MS, event="hello", data={"after": after})
        # `last`: the seq of the last event read; `sent`: the last one the page was told.
        sent = last = after
        moved_at = time.monotonic()
        async with follower:
            self.followers.add(follower)
            try:
                while True:
                    behind = last > sent
                    try:
                        change = await asyncio.wait_for(
                            follower.get(), CURSOR_EVERY if behind else KEEPALIVE_SECONDS
                        )
                    except TimeoutError:
                        yield sse(id=last) if behind else keepalive()
                        sent = last
                        continue
                    last = change.seq
                    document = await scope.shape(change)
                    now = time.monotonic()
                    if document is not None:
                        yield sse(id=last, event="task", data=document)
                        sent, moved_at = last, now
                    elif now - moved_at >= CURSOR_EVERY:
                        yield sse(id=last)
                        sent, moved_at = last, now
            except Stopped:
                return
            except LegatoError as exc:
                yield sse(event="fatal", data={"error": str(exc)})
            finally:
                self.followers.discard(follower)


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"{}")
    except ValueError:
        return None


def _resume_point(request: Request) -> int | None:
    """Last-Event-ID (the browser's reconnect), else `?after=` (the page's first open)."""
    for text in (request.headers.get("last-event-id"), request.query_params.get("after")):
        if text and text.isdigit():
            return int(text)
    return None


class _Scope:
    """Which events a stream passes on, shaped as its page needs them."""

    async def shape(self, change: TaskEvent) -> dict[str, Any] | None:
        raise NotImplementedError


class _ListScope(_Scope):
    async def shape(self, change: TaskEvent) -> dict[str, Any] | None:
        return wire.event(change, texts=False)


class _TreeScope(_Scope):
    """A task and its descendants, with texts and output; new children join as they come."""

    def __init__(self, client: AsyncClient, task: Task):
        self._client = client
        self._task = task
        self._members: set[str] = {task.id}

    async def load(self) -> None:
        self._members = {t.id for t in await self._client.get_task_tree(self._task.id)}

    async def shape(self, change: TaskEvent) -> dict[str, Any] | None:
        task = change.task
        if task.root_id != self._task.root_id:
            return None
        member = task.id in self._members or task.parent_id in self._members
        if not member and change.type is EventType.CREATED and task.depth >= self._task.depth + 2:
            # A descendant whose parent is not in this view (an agent's key sees
            # a grandchild, not the child between): ask the daemon.
            await self.load()
            member = task.id in self._members or task.parent_id in self._members
        if not member:
            return None
        self._members.add(task.id)
        return wire.event(change, texts=True)
