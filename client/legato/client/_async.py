"""The asyncio face of the client: `AsyncClient`, `AsyncTaskHandle`, `AsyncJob`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc
from legato.client._core import (
    CHANNEL_OPTIONS,
    DEFAULT_WORK_LEASE,
    DEFAULT_WORK_WAIT,
    TRANSIENT,
    Backoff,
    ClientCore,
    Deadline,
    LeaseClock,
    PathLike,
    Resume,
    answer_after,
    claim_may_have_ended,
    ended_under,
    lost_claim,
    outcome,
)
from legato.client.errors import (
    JobInterruptedError,
    LegatoError,
    RPCError,
)
from legato.client.models import (
    Agent,
    OutputChunk,
    Role,
    Task,
    TaskEvent,
    TaskPage,
    TaskStatus,
)
from legato.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2, tasks_pb2_grpc

Response = TypeVar("Response")
Handler = Callable[["AsyncJob"], Awaitable[Mapping[str, Any] | None]]

log = logging.getLogger("legato.client")


class AsyncClient(ClientCore):
    """An asyncio client of the legato daemon.

    Args:
        address: `unix:PATH` or `HOST:PORT`; default `LEGATO_ADDRESS` or the
            default daemon socket.
        api_key: this agent's key (default `LEGATO_AGENT_KEY`).
        timeout: seconds each unary call may take (None: no limit).
        tls_ca: for a daemon serving TLS: the CA certificate that signed its
            certificate (default `LEGATO_TLS_CA`). Setting any `tls_` argument
            makes the connection TLS; without `tls_ca` the system's CAs are trusted.
        tls_cert: this client's certificate, for a daemon that requires client
            certificates (mutual TLS; default `LEGATO_TLS_CERT`).
        tls_key: that certificate's private key, mode 0600 (default `LEGATO_TLS_KEY`).

    The API key travels as call metadata in either case; with TLS it is encrypted.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
    ):
        super().__init__(
            address, api_key, timeout, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(
                self.address, self._credentials, options=CHANNEL_OPTIONS
            )
        self._stub = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._agents = agents_pb2_grpc.AgentServiceStub(self._channel)
        # Jobs whose background heartbeats run; closing the client stops them.
        self._jobs: set[AsyncJob] = set()

    @classmethod
    async def connect(
        cls,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        connect_timeout: float = 5.0,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
    ) -> AsyncClient:
        """Creates a client and waits until the daemon answers; UnavailableError if it does
        not, UnauthenticatedError if it does not know the key."""
        client = cls(
            address,
            api_key=api_key,
            timeout=timeout,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        try:
            # WhoAmI: it checks the key and costs the same however long the history is.
            await client._call(client._agents.WhoAmI, agents_pb2.WhoAmIRequest(), connect_timeout)
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _call(
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        timeout: float | None = None,
    ) -> Response:
        self._check_open()
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_error(exc) from None

    async def create_task(
        self,
        content: str,
        *,
        labels: Sequence[str],
        context: Mapping[str, Any] | None = None,
        parent_id: str = "",
        idempotency_key: str = "",
        max_attempts: int = 0,
        deadline: datetime | timedelta | None = None,
    ) -> AsyncTaskHandle:
        """Creates a task routed to `labels` and returns a handle to await its result.

        `deadline` (a time, or a delay from now) fails the task if it has not
        finished by then.
        """
        request = self._create_request(
            content, labels, context, parent_id, idempotency_key, max_attempts, deadline
        )
        task = Task.from_proto(await self._call(self._stub.CreateTask, request))
        return AsyncTaskHandle(self, task.id, task)

    async def delegate(
        self,
        label: str,
        content: str,
        *,
        context: Mapping[str, Any] | None = None,
        parent_id: str = "",
        idempotency_key: str = "",
        deadline: datetime | timedelta | None = None,
    ) -> AsyncTaskHandle:
        """Hands `content` to whoever holds `label`; returns the handle to follow it.

        `await handle.result()` waits for the answer, `handle.output()` streams
        it as it is written, `await handle.answer(...)` replies to a question back.
        """
        return await self.create_task(
            content,
            labels=[label],
            context=context,
            parent_id=parent_id,
            idempotency_key=idempotency_key,
            deadline=deadline,
        )

    def get_handle(self, task_id: str) -> AsyncTaskHandle:
        """A handle to an existing task."""
        return AsyncTaskHandle(self, task_id)

    async def get_task(self, task_id: str) -> Task:
        return Task.from_proto(
            await self._call(self._stub.GetTask, tasks_pb2.GetTaskRequest(id=task_id))
        )

    async def list_tasks(
        self,
        *,
        labels: Sequence[str] = (),
        statuses: Sequence[TaskStatus | str] = (),
        parent_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> TaskPage:
        """One page of tasks, oldest first, and the event cursor of the listing."""
        request = self._list_request(labels, statuses, parent_id, page_size, page_token)
        response = await self._call(self._stub.ListTasks, request)
        return TaskPage(
            [Task.from_proto(t) for t in response.tasks], response.next_page_token, response.cursor
        )

    async def claim(
        self,
        labels: Sequence[str] = (),
        *,
        task_id: str = "",
        lease: float | None = None,
        wait: float | None = None,
    ) -> AsyncJob | None:
        """Claims the oldest pending task with any of `labels` (default: all this
        agent's labels), or `task_id`. With nothing pending, waits up to `wait`
        seconds (at most 60) for a task; None if none came."""
        response = await self._call(
            self._stub.ClaimTask,
            self._claim_request(labels, task_id, lease, wait),
            self._claim_timeout(wait),
        )
        if not response.HasField("task"):
            return None
        return AsyncJob(self, Task.from_proto(response.task), response.lease_token)

    async def heartbeat(
        self, task_id: str, lease_token: str, *, lease: float | None = None
    ) -> tuple[Task, bool]:
        """Extends a lease; returns the task and whether it was canceled (stop work if so)."""
        return await self._heartbeat(task_id, lease_token, lease, None)

    async def _heartbeat(
        self, task_id: str, lease_token: str, lease: float | None, timeout: float | None
    ) -> tuple[Task, bool]:
        request = self._heartbeat_request(task_id, lease_token, lease)
        response = await self._call(self._stub.Heartbeat, request, timeout)
        return Task.from_proto(response.task), response.cancel_requested

    async def complete_task(
        self, task_id: str, lease_token: str, result: Mapping[str, Any] | None = None
    ) -> Task:
        request = self._complete_request(task_id, lease_token, result)
        return Task.from_proto(await self._call(self._stub.CompleteTask, request))

    async def fail_task(
        self, task_id: str, lease_token: str, error: str, *, retryable: bool = False
    ) -> Task:
        request = tasks_pb2.FailTaskRequest(
            id=task_id, lease_token=lease_token, error=error, retryable=retryable
        )
        return Task.from_proto(await self._call(self._stub.FailTask, request))

    async def release_task(self, task_id: str, lease_token: str, reason: str = "") -> Task:
        """Hands a claimed task back, PENDING for another worker; the attempt does not count."""
        request = tasks_pb2.ReleaseTaskRequest(id=task_id, lease_token=lease_token, reason=reason)
        return Task.from_proto(await self._call(self._stub.ReleaseTask, request))

    async def cancel_task(
        self, task_id: str, reason: str = "", *, keep_children: bool = False
    ) -> Task:
        """Cancels a task and, unless `keep_children`, its unfinished descendants."""
        request = tasks_pb2.CancelTaskRequest(
            id=task_id, reason=reason, keep_children=keep_children
        )
        return Task.from_proto(await self._call(self._stub.CancelTask, request))

    async def append_output(self, task_id: str, lease_token: str, text: str) -> int:
        """Appends a chunk to a claimed task's output; returns the output's size after it."""
        request = tasks_pb2.AppendOutputRequest(id=task_id, lease_token=lease_token, text=text)
        return (await self._call(self._stub.AppendOutput, request)).output_size

    async def request_input(self, task_id: str, lease_token: str, question: str) -> Task:
        """Asks the creator a question; the task waits INPUT_REQUIRED for the answer."""
        request = tasks_pb2.RequestInputRequest(
            id=task_id, lease_token=lease_token, question=question
        )
        return Task.from_proto(await self._call(self._stub.RequestInput, request))

    async def provide_input(self, task_id: str, answer: str) -> Task:
        """Answers the question a task's claimant asked (creator or admin)."""
        request = tasks_pb2.ProvideInputRequest(id=task_id, answer=answer)
        return Task.from_proto(await self._call(self._stub.ProvideInput, request))

    async def get_task_tree(self, task_id: str) -> list[Task]:
        """The task and the descendants this agent sees, each after its parent
        (every page of them)."""
        tasks: list[Task] = []
        page_token = ""
        while True:
            # The most a page holds; the daemon cuts pages of large tasks shorter.
            request = tasks_pb2.GetTaskTreeRequest(
                id=task_id, page_size=1000, page_token=page_token
            )
            response = await self._call(self._stub.GetTaskTree, request)
            tasks.extend(Task.from_proto(t) for t in response.tasks)
            page_token = response.next_page_token
            if not page_token:
                return tasks

    async def work(
        self,
        labels: Sequence[str] = (),
        *,
        lease: float = DEFAULT_WORK_LEASE,
        wait: float = DEFAULT_WORK_WAIT,
    ) -> AsyncGenerator[AsyncJob, None]:
        """Jobs for `labels` (default: this agent's), claimed by long-poll, forever.

        Each job heartbeats in the background until it is finished, and watches
        its task: when the task ends under the claim (canceled, failed at its
        deadline) or the lease is lost, `job.interrupted` turns True and the
        job's calls raise `JobInterruptedError`. Finish a job in the loop body
        with `await job.complete(result)` or `await job.fail(...)`; a job left
        unfinished when the loop moves on or stops is handed back with
        `job.release()` for another worker.

        The daemon restarting or answering slowly only delays the next claim.
        The loop ends with `RuntimeError` once the client is closed, and with
        the error of any other refused claim (e.g. `UnauthenticatedError`
        when the agent's key no longer works).
        """
        backoff = Backoff()
        failures = 0
        while True:
            try:
                job = await self.claim(labels, lease=lease, wait=wait)
            except RPCError as exc:
                self._check_open()  # closed while the claim waited
                if exc.code not in TRANSIENT:
                    raise
                delay = backoff.next()
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "claiming failed with %s; trying again in %.2f s", exc, delay)
                await asyncio.sleep(delay)  # backoff while the daemon comes back
                continue
            if failures:
                log.info("claims go through again after %d failed", failures)
                failures = 0
            backoff.reset()
            if job is None:
                continue
            job._start_heartbeats(lease)
            try:
                yield job
            finally:
                await job._release_if_unfinished()

    async def run_worker(
        self,
        handler: Handler,
        labels: Sequence[str] = (),
        *,
        lease: float = DEFAULT_WORK_LEASE,
        wait: float = DEFAULT_WORK_WAIT,
    ) -> None:
        """Runs `handler` on every job for `labels`, until cancelled.

        The task completes with what `handler` returns, or fails with the
        exception it raises. The handler runs in its own asyncio task: when
        the task ends under it (its creator cancels it, its deadline passes)
        or the lease is lost, that task is cancelled, as an activity is in
        Temporal, so the handler sees `asyncio.CancelledError`; the task is
        then left as it is (not completed), the ending is logged on the
        `legato.client` logger, and the loop takes the next job. The watch
        of the task brings such news at once; heartbeats (a third of
        `lease` apart) are the fallback.

        Cancelling `run_worker` cancels a running handler and hands its job
        back for another worker. The loop also ends when the client is
        closed (`RuntimeError`) or when the daemon refuses this agent
        altogether (e.g. `UnauthenticatedError` for a revoked key).
        """
        async with aclosing(self.work(labels, lease=lease, wait=wait)) as jobs:
            async for job in jobs:
                await job._run(handler)

    # -- history ----------------------------------------------------------------

    async def task_history(self, task_id: str) -> list[TaskEvent]:
        """Every stored event of a task, oldest first: its chain of custody."""
        events: list[TaskEvent] = []
        after_seq = 0
        while True:
            request = tasks_pb2.ListTaskEventsRequest(
                id=task_id, after_seq=after_seq, page_size=1000
            )
            response = await self._call(self._stub.ListTaskEvents, request)
            events.extend(TaskEvent.from_proto(e) for e in response.events)
            after_seq = response.next_after_seq
            if not after_seq:
                return events

    # -- agents -----------------------------------------------------------------

    async def whoami(self) -> Agent:
        """The agent this client's key belongs to."""
        return Agent.from_proto(await self._call(self._agents.WhoAmI, agents_pb2.WhoAmIRequest()))

    async def create_agent(
        self, name: str, *, labels: Sequence[str] = (), role: Role | str = Role.AGENT
    ) -> tuple[Agent, str]:
        """Creates an agent (admin only); returns it and its API key, shown this once."""
        request = agents_pb2.CreateAgentRequest(name=name, labels=labels, role=Role(role).proto)
        response = await self._call(self._agents.CreateAgent, request)
        return Agent.from_proto(response.agent), response.api_key

    async def list_agents(self, *, include_revoked: bool = False) -> list[Agent]:
        request = agents_pb2.ListAgentsRequest(include_revoked=include_revoked)
        response = await self._call(self._agents.ListAgents, request)
        return [Agent.from_proto(a) for a in response.agents]

    async def get_agent(self, name: str) -> Agent:
        request = agents_pb2.GetAgentRequest(name=name)
        return Agent.from_proto(await self._call(self._agents.GetAgent, request))

    async def update_agent(
        self, name: str, *, labels: Sequence[str] | None = None, role: Role | str | None = None
    ) -> Agent:
        """Replaces an agent's labels and/or role (admin only)."""
        request = self._update_agent_request(name, labels, role)
        return Agent.from_proto(await self._call(self._agents.UpdateAgent, request))

    async def revoke_agent(self, name: str) -> Agent:
        """Revokes an agent for good: its key stops working, its watch streams end."""
        request = agents_pb2.RevokeAgentRequest(name=name)
        return Agent.from_proto(await self._call(self._agents.RevokeAgent, request))

    async def rotate_key(self, name: str = "") -> tuple[Agent, str]:
        """A new key for `name` (default: this client's agent); the old one stops at once."""
        request = agents_pb2.RotateKeyRequest(name=name)
        response = await self._call(self._agents.RotateKey, request)
        return Agent.from_proto(response.agent), response.api_key

    async def get_cursor(self) -> int:
        """The seq of the latest event: `watch(after_seq=cursor)` misses nothing from now on."""
        response = await self._call(self._stub.GetCursor, tasks_pb2.GetCursorRequest())
        return response.cursor

    def watch(
        self,
        *,
        labels: Sequence[str] = (),
        task_ids: Sequence[str] = (),
        after_seq: int | None = None,
    ) -> AsyncGenerator[TaskEvent, None]:
        """Task events in seq order, resuming by itself when the stream drops.

        With `after_seq`, stored events after it come first; without, events
        from when iteration starts (not when `watch` is called: to miss nothing
        after a point, pass `after_seq`, e.g. a `list_tasks` cursor). Either way
        no event is missed or repeated across reconnects.
        """
        return self._watch(labels, task_ids, after_seq, Deadline(None))

    async def _watch(
        self,
        labels: Sequence[str],
        task_ids: Sequence[str],
        after_seq: int | None,
        deadline: Deadline,
    ) -> AsyncGenerator[TaskEvent, None]:
        if after_seq is None:
            cursor = await self._call(self._stub.GetCursor, tasks_pb2.GetCursorRequest())
            after_seq = cursor.cursor
        resume = Resume()
        while True:
            self._check_open()
            call = self._stub.WatchTasks(
                self._watch_request(labels, task_ids, after_seq),
                timeout=deadline.remaining(),
                metadata=self._metadata,
            )
            try:
                async for message in call:
                    event = TaskEvent.from_proto(message)
                    after_seq = event.seq
                    resume.progressed()
                    yield event
            except grpc.aio.AioRpcError as exc:
                delay = resume.delay_after(self._rpc_error(exc), deadline)
                await asyncio.sleep(delay)  # backoff before reconnecting
            finally:
                call.cancel()

    async def aclose(self) -> None:
        """Closes the channel; the client cannot be used afterwards.

        The background heartbeats of its jobs stop, and their handlers are
        interrupted; the daemon requeues those tasks when their leases end.
        """
        if not self._closed:
            self._closed = True
            jobs = list(self._jobs)
            for job in jobs:
                job._interrupt("the client was closed")
                job._stop_guard_soon()
            await self._channel.close()
            for job in jobs:
                await job._guard_stopped()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncTaskHandle:
    """A task this client can wait on, inspect or cancel."""

    def __init__(self, client: AsyncClient, task_id: str, task: Task | None = None):
        self._client = client
        self.id = task_id
        self.task = task

    async def get(self) -> Task:
        """The task as it is now."""
        self.task = await self._client.get_task(self.id)
        return self.task

    async def result(self, *, timeout: float | None = None) -> Task:
        """Waits on the watch stream for the task to finish and returns it.

        Raises `TaskFailedError` or `TaskCanceledError` if it did not finish
        DONE, and `TimeoutError` after `timeout` seconds.
        """
        deadline = Deadline(timeout)
        events = self._client._watch((), (self.id,), 0, deadline)
        async with aclosing(events):
            async for event in events:
                self.task = event.onto(self.task).task
                if self.task.status.terminal:
                    return outcome(self.task)
        raise AssertionError("the watch stream ended without an error")  # it resumes instead

    async def events(self, *, timeout: float | None = None) -> AsyncGenerator[TaskEvent, None]:
        """Every event of the task from its creation, live, until it finishes."""
        events = self._client._watch((), (self.id,), 0, Deadline(timeout))
        async with aclosing(events):
            async for event in events:
                # Events are deltas; replayed from CREATED on, they fold into
                # the whole task.
                event = event.onto(self.task)
                self.task = event.task
                yield event
                if event.task.status.terminal:
                    return

    async def output(self, *, timeout: float | None = None) -> AsyncGenerator[str, None]:
        """The task's output as it is written, chunk by chunk, until it finishes.

        It starts with the current attempt's output so far; what abandoned
        attempts (lease expired, handed back) wrote is not repeated. When a
        new attempt begins meanwhile, its output follows.
        """
        async with aclosing(self.output_chunks(timeout=timeout)) as chunks:
            async for chunk in chunks:
                yield chunk.text

    async def output_chunks(
        self, *, timeout: float | None = None
    ) -> AsyncGenerator[OutputChunk, None]:
        """Like `output`, with each chunk's attempt and offset."""
        deadline = Deadline(timeout)
        # The cursor first, then the task: a chunk committed in between is both
        # in the task's output and after the cursor, and is skipped below.
        cursor = await self._client.get_cursor()
        task = await self.get()
        if task.output:
            yield OutputChunk(0, task.output, task.attempt)
        if task.status.terminal:
            return
        events = self._client._watch((), (self.id,), cursor, deadline)
        async with aclosing(events):
            async for event in events:
                self.task = event.onto(self.task).task
                chunk = event.output
                if chunk is not None and (chunk.attempt, chunk.offset) >= (
                    task.attempt,
                    task.output_size,
                ):
                    yield chunk
                if self.task.status.terminal:
                    return

    async def answer(self, text: str) -> Task:
        """Answers the question the claimant asked (`task.question`)."""
        self.task = await self._client.provide_input(self.id, text)
        return self.task

    async def tree(self) -> list[Task]:
        """The task and the descendants this agent sees."""
        return await self._client.get_task_tree(self.id)

    async def cancel(self, reason: str = "", *, keep_children: bool = False) -> Task:
        self.task = await self._client.cancel_task(self.id, reason, keep_children=keep_children)
        return self.task

    def __repr__(self) -> str:
        return f"AsyncTaskHandle({self.id!r})"


class AsyncJob:
    """A task this worker holds a lease on.

    With background heartbeats (jobs from `work` and `run_worker`), the job
    learns when the task ends under the claim or the lease is lost:
    `interrupted` turns True, `interruption` says why, the handler that
    `run_worker` runs is cancelled, and `write`, `ask` and `heartbeat` raise
    `JobInterruptedError`.
    """

    def __init__(self, client: AsyncClient, task: Task, lease_token: str):
        self._client = client
        self.task = task
        self.lease_token = lease_token
        self.finished = False
        # Set when the task was canceled, or failed (its deadline), under this claim.
        self.cancel_requested = False
        # Set when the claim ended otherwise: lease expired, task reclaimed, out of sight.
        self.lost = False
        # Why work on the job must stop, once it must.
        self.interruption: str | None = None
        self._interrupted = asyncio.Event()
        # While complete/fail/release is on its way, news of an ending is no
        # interruption: it may be this very call's own doing.
        self._finishing = False
        self._lease: LeaseClock | None = None
        self._wake = asyncio.Event()
        self._handler: asyncio.Future[Mapping[str, Any] | None] | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.task.id

    @property
    def interrupted(self) -> bool:
        """Whether work on the job must stop; `interruption` says why."""
        return self.interruption is not None

    async def wait_interrupted(self, timeout: float | None = None) -> bool:
        """Waits until the job is interrupted, at most `timeout` seconds; whether it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._interrupted.wait(), timeout)
        return self.interrupted

    async def heartbeat(self, *, lease: float | None = None) -> bool:
        """Extends the lease; True means the task was canceled and work should stop.

        `lease` (seconds) replaces the claim's lease length from now on.
        """
        self._check_interrupted()
        sent_at = time.monotonic()
        self.task, cancel_requested = await self._client.heartbeat(
            self.id, self.lease_token, lease=lease
        )
        if self._lease is not None:
            self._lease.renewed(sent_at, lease)
        if cancel_requested:
            self._interrupt(ended_under(self.task), canceled=True)
        return cancel_requested

    async def write(self, text: str) -> None:
        """Streams a chunk of the answer to whoever follows the task."""
        self._check_interrupted()
        await self._client.append_output(self.id, self.lease_token, text)

    async def ask(self, question: str, *, timeout: float | None = None) -> str:
        """Asks the creator `question` and waits for the answer; the lease pauses meanwhile.

        Raises `TaskCanceledError` or `TaskFailedError` if the task ends instead.
        """
        self._check_interrupted()
        asked = await self._client.request_input(self.id, self.lease_token, question)
        events = self._client._watch((), (self.id,), 0, Deadline(timeout))
        async with aclosing(events):
            async for event in events:
                answer = answer_after(event, asked.version)
                if answer is not None:
                    self.task = event.onto(self.task).task  # events are deltas
                    return answer
        raise AssertionError("the watch stream ended without an error")  # it resumes instead

    async def complete(self, result: Mapping[str, Any] | None = None) -> Task:
        """Finishes the task DONE with `result` (a dict of JSON values)."""
        async with self._finishing_call():
            self.task = await self._client.complete_task(self.id, self.lease_token, result)
        await self._finished()
        return self.task

    async def fail(self, error: str, *, retryable: bool = False) -> Task:
        """Fails the task; `retryable` requeues it while attempts remain."""
        async with self._finishing_call():
            self.task = await self._client.fail_task(
                self.id, self.lease_token, error, retryable=retryable
            )
        await self._finished()
        return self.task

    async def release(self, reason: str) -> Task:
        """Hands the task back unfinished, PENDING for another worker; `reason` is for its history.

        Every hand-back of a work loop goes through here: the loop moving on
        or stopping, the worker being cancelled. The attempt does not count
        against the task's `max_attempts`.
        """
        async with self._finishing_call():
            self.task = await self._client.release_task(self.id, self.lease_token, reason)
        await self._finished()
        return self.task

    # -- running a handler ---------------------------------------------------------

    async def _run(self, handler: Handler) -> None:
        """Runs `handler` on this job and finishes the task with its outcome."""
        running = asyncio.ensure_future(handler(self))
        self._handler = running
        try:
            result = await running
        except asyncio.CancelledError:
            if _cancelling():
                raise  # the worker is being stopped: the work loop hands the job back
            if self.interruption is None:  # not ours: the handler was cancelled by itself
                await self._settle(None, "CancelledError: the handler was cancelled")
            return
        except Exception as exc:
            if self.interruption is None:
                await self._settle(None, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._handler = None
        if self.interruption is None:
            await self._settle(result, None)
        if _cancelling():
            # The handler swallowed the cancel that stops the worker, and finished.
            raise asyncio.CancelledError

    async def _settle(self, result: Mapping[str, Any] | None, error: str | None) -> None:
        """Completes (or, with `error`, fails) the task, unless the handler already did.

        A daemon that cannot be reached is tried again while the lease lasts;
        a refusal is logged, except one that ends the work loop altogether
        (the agent's key no longer works).
        """
        backoff = Backoff()
        while not self.finished and self.interruption is None:
            try:
                if error is None:
                    await self.complete(result)
                else:
                    await self.fail(error)
                return
            except TypeError as exc:  # the handler returned something that is not JSON
                error = f"the handler's result was refused: {exc}"
            except RPCError as exc:
                left = self._lease.remaining() if self._lease is not None else 0.0
                if exc.code in TRANSIENT and left > 0:
                    delay = min(backoff.next(), left)
                    log.debug("finishing %s failed with %s; again in %.2f s", self.id, exc, delay)
                    await asyncio.sleep(delay)  # backoff while the daemon comes back
                elif exc.code is grpc.StatusCode.INVALID_ARGUMENT and error is None:
                    error = f"the daemon refused the handler's result: {exc.message}"
                elif exc.code is grpc.StatusCode.UNAUTHENTICATED:
                    raise
                else:
                    what = "complete" if error is None else "fail"
                    log.warning("could not %s task %s: %s", what, self.id, exc)
                    return

    # -- background heartbeats and watch -------------------------------------------

    def _start_heartbeats(self, lease: float) -> None:
        """Keeps the claim alive in the background until the job is finished,
        and watches the task so that an ending under the claim is known at once."""
        self._lease = LeaseClock(lease)
        self._client._jobs.add(self)
        self._heartbeats = asyncio.create_task(self._beat(), name=f"legato heartbeats {self.id}")
        self._watching = asyncio.create_task(self._follow(), name=f"legato watch {self.id}")

    async def _beat(self) -> None:
        assert self._lease is not None
        backoff = Backoff()
        failures = 0
        wait = self._lease.every()
        while True:
            # The heartbeat's period, cut short by news from the watch.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            left = self._lease.remaining()
            if left <= 0 and failures:
                why = "the lease ran out while heartbeats could not reach the daemon"
                self._interrupt(lost_claim(self.id, why), lost=True)
                return
            sent_at = time.monotonic()
            try:
                self.task, cancel_requested = await self._client._heartbeat(
                    self.id, self.lease_token, None, self._client._heartbeat_timeout(left)
                )
            except RPCError as exc:
                if exc.code not in TRANSIENT:  # e.g. FAILED_PRECONDITION: the lease is gone
                    self._interrupt(lost_claim(self.id, str(exc)), lost=True)
                    return
                failures += 1
                wait = min(backoff.next(), left)
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "heartbeat of task %s failed with %s; trying again for up to %.1f s, "
                    "until the lease would end",
                    self.id,
                    exc.code.name,
                    left,
                )
                continue
            except RuntimeError:
                return  # the client was closed
            if failures:
                log.info("heartbeats of task %s resumed after %d failed", self.id, failures)
                failures = 0
                backoff.reset()
            self._lease.renewed(sent_at)
            if cancel_requested:
                self._interrupt(ended_under(self.task), canceled=True)
                return
            wait = self._lease.every()

    async def _follow(self) -> None:
        backoff = Backoff()
        after_seq: int | None = None
        while True:
            try:
                if after_seq is None:
                    after_seq = await self._client.get_cursor()
                    # An ending between the claim and this cursor is not in the
                    # watch: one heartbeat now tells.
                    self._wake.set()
                events = self._client._watch((), (self.id,), after_seq, Deadline(None))
                async with aclosing(events):
                    async for event in events:
                        if claim_may_have_ended(event):
                            self._wake.set()
            except RPCError as exc:
                if exc.code not in TRANSIENT:  # out of sight, say: a heartbeat tells the rest
                    self._wake.set()
                    return
                await asyncio.sleep(backoff.next())  # backoff while the daemon comes back
            except RuntimeError:
                return  # the client was closed

    def _interrupt(self, reason: str, *, canceled: bool = False, lost: bool = False) -> None:
        if self.finished or self._finishing or self.interruption is not None:
            return
        self.interruption = reason
        self.cancel_requested = self.cancel_requested or canceled
        self.lost = self.lost or lost
        self._interrupted.set()
        handler = self._handler
        if handler is not None and not handler.done() and handler is not asyncio.current_task():
            handler.cancel()
            log.info("%s; its handler is cancelled", reason)
        else:
            log.info("%s; stop working on it", reason)
        self._stop_guard_soon()

    def _check_interrupted(self) -> None:
        if self.interruption is not None:
            raise JobInterruptedError(self.task, self.interruption)

    @contextlib.asynccontextmanager
    async def _finishing_call(self) -> AsyncGenerator[None, None]:
        self._finishing = True
        try:
            yield
        except BaseException:
            self._finishing = False
            raise

    def _stop_guard_soon(self) -> None:
        """Stops the background heartbeats and watch without waiting for them."""
        self._client._jobs.discard(self)
        for task in (self._heartbeats, self._watching):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def _guard_stopped(self) -> None:
        # asyncio.wait, not `await task` under suppress(CancelledError): that would
        # also swallow a cancel aimed at us (e.g. at run_worker) and carry on.
        tasks = [
            task
            for task in (self._heartbeats, self._watching)
            if task is not None and task is not asyncio.current_task()
        ]
        if tasks:
            await asyncio.wait(tasks)

    async def _finished(self) -> None:
        self.finished = True
        self._stop_guard_soon()
        await self._guard_stopped()

    async def _release_if_unfinished(
        self, reason: str = "the worker stopped before finishing the task"
    ) -> None:
        if self.finished or self.interruption is not None:
            self._stop_guard_soon()
            await self._guard_stopped()
            return
        try:
            await self.release(reason)
        except (LegatoError, RuntimeError) as exc:
            log.warning("could not hand %s back (%s); its lease will run out", self.id, exc)
        finally:
            self._stop_guard_soon()
        await self._guard_stopped()

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"


def _cancelling() -> bool:
    """Whether the running asyncio task is being cancelled (from the outside)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
