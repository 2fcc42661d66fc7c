"""The blocking face of the client: `Client`, `TaskHandle`, `Job`.

Same methods, names and behaviour as the asyncio face in `_async`; only the
I/O differs. Shared logic lives in `_core`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import closing
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc
from legato.client._core import (
    CHANNEL_OPTIONS,
    DEFAULT_WORK_LEASE,
    DEFAULT_WORK_WAIT,
    HEARTBEATS_PER_LEASE,
    ClientCore,
    Deadline,
    PathLike,
    Resume,
    answer_after,
    duration,
    outcome,
)
from legato.client.errors import LegatoError, UnavailableError
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


class Client(ClientCore):
    """A blocking client of the legato daemon; see `AsyncClient` for the arguments."""

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
            self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(
                self.address, self._credentials, options=CHANNEL_OPTIONS
            )
        self._stub = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._agents = agents_pb2_grpc.AgentServiceStub(self._channel)

    @classmethod
    def connect(
        cls,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        connect_timeout: float = 5.0,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
    ) -> Client:
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
            client._call(client._agents.WhoAmI, agents_pb2.WhoAmIRequest(), connect_timeout)
        except BaseException:
            client.close()
            raise
        return client

    def _call(
        self, method: Callable[..., Response], request: Any, timeout: float | None = None
    ) -> Response:
        self._check_open()
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc) from None

    def create_task(
        self,
        content: str,
        *,
        labels: Sequence[str],
        context: Mapping[str, Any] | None = None,
        parent_id: str = "",
        idempotency_key: str = "",
        max_attempts: int = 0,
        deadline: datetime | timedelta | None = None,
    ) -> TaskHandle:
        """Creates a task routed to `labels` and returns a handle to wait for its result.

        `deadline` (a time, or a delay from now) fails the task if it has not
        finished by then.
        """
        request = self._create_request(
            content, labels, context, parent_id, idempotency_key, max_attempts, deadline
        )
        task = Task.from_proto(self._call(self._stub.CreateTask, request))
        return TaskHandle(self, task.id, task)

    def delegate(
        self,
        label: str,
        content: str,
        *,
        context: Mapping[str, Any] | None = None,
        parent_id: str = "",
        idempotency_key: str = "",
        deadline: datetime | timedelta | None = None,
    ) -> TaskHandle:
        """Hands `content` to whoever holds `label`; returns the handle to follow it."""
        return self.create_task(
            content,
            labels=[label],
            context=context,
            parent_id=parent_id,
            idempotency_key=idempotency_key,
            deadline=deadline,
        )

    def get_handle(self, task_id: str) -> TaskHandle:
        """A handle to an existing task."""
        return TaskHandle(self, task_id)

    def get_task(self, task_id: str) -> Task:
        return Task.from_proto(self._call(self._stub.GetTask, tasks_pb2.GetTaskRequest(id=task_id)))

    def list_tasks(
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
        response = self._call(self._stub.ListTasks, request)
        return TaskPage(
            [Task.from_proto(t) for t in response.tasks], response.next_page_token, response.cursor
        )

    def claim(
        self,
        labels: Sequence[str] = (),
        *,
        task_id: str = "",
        lease: float | None = None,
        wait: float | None = None,
    ) -> Job | None:
        """Claims the oldest pending task with any of `labels` (default: all this
        agent's labels), or `task_id`. With nothing pending, waits up to `wait`
        seconds (at most 60) for a task; None if none came."""
        response = self._call(
            self._stub.ClaimTask,
            self._claim_request(labels, task_id, lease, wait),
            self._claim_timeout(wait),
        )
        if not response.HasField("task"):
            return None
        return Job(self, Task.from_proto(response.task), response.lease_token)

    def heartbeat(
        self, task_id: str, lease_token: str, *, lease: float | None = None
    ) -> tuple[Task, bool]:
        """Extends a lease; returns the task and whether it was canceled (stop work if so)."""
        request = tasks_pb2.HeartbeatRequest(
            id=task_id, lease_token=lease_token, lease=duration(lease)
        )
        response = self._call(self._stub.Heartbeat, request)
        return Task.from_proto(response.task), response.cancel_requested

    def complete_task(
        self, task_id: str, lease_token: str, result: Mapping[str, Any] | None = None
    ) -> Task:
        request = self._complete_request(task_id, lease_token, result)
        return Task.from_proto(self._call(self._stub.CompleteTask, request))

    def fail_task(
        self, task_id: str, lease_token: str, error: str, *, retryable: bool = False
    ) -> Task:
        request = tasks_pb2.FailTaskRequest(
            id=task_id, lease_token=lease_token, error=error, retryable=retryable
        )
        return Task.from_proto(self._call(self._stub.FailTask, request))

    def cancel_task(self, task_id: str, reason: str = "", *, keep_children: bool = False) -> Task:
        """Cancels a task and, unless `keep_children`, its unfinished descendants."""
        request = tasks_pb2.CancelTaskRequest(
            id=task_id, reason=reason, keep_children=keep_children
        )
        return Task.from_proto(self._call(self._stub.CancelTask, request))

    def append_output(self, task_id: str, lease_token: str, text: str) -> int:
        """Appends a chunk to a claimed task's output; returns the output's size after it."""
        request = tasks_pb2.AppendOutputRequest(id=task_id, lease_token=lease_token, text=text)
        return self._call(self._stub.AppendOutput, request).output_size

    def request_input(self, task_id: str, lease_token: str, question: str) -> Task:
        """Asks the creator a question; the task waits INPUT_REQUIRED for the answer."""
        request = tasks_pb2.RequestInputRequest(
            id=task_id, lease_token=lease_token, question=question
        )
        return Task.from_proto(self._call(self._stub.RequestInput, request))

    def provide_input(self, task_id: str, answer: str) -> Task:
        """Answers the question a task's claimant asked (creator or admin)."""
        request = tasks_pb2.ProvideInputRequest(id=task_id, answer=answer)
        return Task.from_proto(self._call(self._stub.ProvideInput, request))

    def get_task_tree(self, task_id: str) -> list[Task]:
        """The task and the descendants this agent sees, each after its parent
        (every page of them)."""
        tasks: list[Task] = []
        page_token = ""
        while True:
            # The most a page holds; the daemon cuts pages of large tasks shorter.
            request = tasks_pb2.GetTaskTreeRequest(
                id=task_id, page_size=1000, page_token=page_token
            )
            response = self._call(self._stub.GetTaskTree, request)
            tasks.extend(Task.from_proto(t) for t in response.tasks)
            page_token = response.next_page_token
            if not page_token:
                return tasks

    def work(
        self,
        labels: Sequence[str] = (),
        *,
        lease: float = DEFAULT_WORK_LEASE,
        wait: float = DEFAULT_WORK_WAIT,
    ) -> Generator[Job, None, None]:
        """Jobs for `labels` (default: this agent's), claimed by long-poll, forever.

        Each job heartbeats in a background thread until it is finished. Finish
        it in the loop body with `job.complete(result)` or `job.fail(...)`; a job
        left unfinished when the loop moves on or stops is released for another
        worker (a retryable failure).
        """
        resume = Resume()
        while True:
            try:
                job = self.claim(labels, lease=lease, wait=wait)
            except UnavailableError as exc:  # the daemon restarts: keep waiting for it
                time.sleep(resume.delay_after(exc, Deadline(None)))
                continue
            resume.progressed()
            if job is None:
                continue
            job._start_heartbeats(lease)
            try:
                yield job
            finally:
                job._release_if_unfinished()

    def run_worker(
        self,
        handler: Callable[[Job], Mapping[str, Any] | None],
        labels: Sequence[str] = (),
        *,
        lease: float = DEFAULT_WORK_LEASE,
        wait: float = DEFAULT_WORK_WAIT,
    ) -> None:
        """Runs `handler` on every job for `labels`, until interrupted.

        The task completes with what `handler` returns, or fails with the
        exception it raises.
        """
        with closing(self.work(labels, lease=lease, wait=wait)) as jobs:
            for job in jobs:
                try:
                    result = handler(job)
                except Exception as exc:
                    if not job.finished:
                        job.fail(f"{type(exc).__name__}: {exc}")
                    continue
                if not job.finished:
                    job.complete(result)

    # -- history ----------------------------------------------------------------

    def task_history(self, task_id: str) -> list[TaskEvent]:
        """Every stored event of a task, oldest first: its chain of custody."""
        events: list[TaskEvent] = []
        after_seq = 0
        while True:
            request = tasks_pb2.ListTaskEventsRequest(
                id=task_id, after_seq=after_seq, page_size=1000
            )
            response = self._call(self._stub.ListTaskEvents, request)
            events.extend(TaskEvent.from_proto(e) for e in response.events)
            after_seq = response.next_after_seq
            if not after_seq:
                return events

    # -- agents -----------------------------------------------------------------

    def whoami(self) -> Agent:
        """The agent this client's key belongs to."""
        return Agent.from_proto(self._call(self._agents.WhoAmI, agents_pb2.WhoAmIRequest()))

    def create_agent(
        self, name: str, *, labels: Sequence[str] = (), role: Role | str = Role.AGENT
    ) -> tuple[Agent, str]:
        """Creates an agent (admin only); returns it and its API key, shown this once."""
        request = agents_pb2.CreateAgentRequest(name=name, labels=labels, role=Role(role).proto)
        response = self._call(self._agents.CreateAgent, request)
        return Agent.from_proto(response.agent), response.api_key

    def list_agents(self, *, include_revoked: bool = False) -> list[Agent]:
        request = agents_pb2.ListAgentsRequest(include_revoked=include_revoked)
        response = self._call(self._agents.ListAgents, request)
        return [Agent.from_proto(a) for a in response.agents]

    def get_agent(self, name: str) -> Agent:
        request = agents_pb2.GetAgentRequest(name=name)
        return Agent.from_proto(self._call(self._agents.GetAgent, request))

    def update_agent(
        self, name: str, *, labels: Sequence[str] | None = None, role: Role | str | None = None
    ) -> Agent:
        """Replaces an agent's labels and/or role (admin only)."""
        request = self._update_agent_request(name, labels, role)
        return Agent.from_proto(self._call(self._agents.UpdateAgent, request))

    def revoke_agent(self, name: str) -> Agent:
        """Revokes an agent for good: its key stops working, its watch streams end."""
        request = agents_pb2.RevokeAgentRequest(name=name)
        return Agent.from_proto(self._call(self._agents.RevokeAgent, request))

    def rotate_key(self, name: str = "") -> tuple[Agent, str]:
        """A new key for `name` (default: this client's agent); the old one stops at once."""
        request = agents_pb2.RotateKeyRequest(name=name)
        response = self._call(self._agents.RotateKey, request)
        return Agent.from_proto(response.agent), response.api_key

    def get_cursor(self) -> int:
        """The seq of the latest event: `watch(after_seq=cursor)` misses nothing from now on."""
        response = self._call(self._stub.GetCursor, tasks_pb2.GetCursorRequest())
        return response.cursor

    def watch(
        self,
        *,
        labels: Sequence[str] = (),
        task_ids: Sequence[str] = (),
        after_seq: int | None = None,
    ) -> Generator[TaskEvent, None, None]:
        """Task events in seq order, resuming by itself when the stream drops.

        With `after_seq`, stored events after it come first; without, events
        from when iteration starts (not when `watch` is called: to miss nothing
        after a point, pass `after_seq`, e.g. a `list_tasks` cursor). Either way
        no event is missed or repeated across reconnects.
        """
        return self._watch(labels, task_ids, after_seq, Deadline(None))

    def _watch(
        self,
        labels: Sequence[str],
        task_ids: Sequence[str],
        after_seq: int | None,
        deadline: Deadline,
    ) -> Generator[TaskEvent, None, None]:
        if after_seq is None:
            after_seq = self._call(self._stub.GetCursor, tasks_pb2.GetCursorRequest()).cursor
        resume = Resume()
        while True:
            self._check_open()
            call = self._stub.WatchTasks(
                self._watch_request(labels, task_ids, after_seq),
                timeout=deadline.remaining(),
                metadata=self._metadata,
            )
            try:
                for message in call:
                    event = TaskEvent.from_proto(message)
                    after_seq = event.seq
                    resume.progressed()
                    yield event
            except grpc.RpcError as exc:
                delay = resume.delay_after(self._rpc_error(exc), deadline)
                time.sleep(delay)  # backoff before reconnecting
            finally:
                call.cancel()

    def close(self) -> None:
        """Closes the channel; the client cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TaskHandle:
    """A task this client can wait on, inspect or cancel."""

    def __init__(self, client: Client, task_id: str, task: Task | None = None):
        self._client = client
        self.id = task_id
        self.task = task

    def get(self) -> Task:
        """The task as it is now."""
        self.task = self._client.get_task(self.id)
        return self.task

    def result(self, *, timeout: float | None = None) -> Task:
        """Waits on the watch stream for the task to finish and returns it.

        Raises `TaskFailedError` or `TaskCanceledError` if it did not finish
        DONE, and `TimeoutError` after `timeout` seconds.
        """
        with closing(self._client._watch((), (self.id,), 0, Deadline(timeout))) as events:
            for event in events:
                self.task = event.onto(self.task).task
                if self.task.status.terminal:
                    return outcome(self.task)
        raise AssertionError("the watch stream ended without an error")  # it resumes instead

    def events(self, *, timeout: float | None = None) -> Generator[TaskEvent, None, None]:
        """Every event of the task from its creation, live, until it finishes."""
        with closing(self._client._watch((), (self.id,), 0, Deadline(timeout))) as events:
            for event in events:
                # Events are deltas; replayed from CREATED on, they fold into
                # the whole task.
                event = event.onto(self.task)
                self.task = event.task
                yield event
                if event.task.status.terminal:
                    return

    def output(self, *, timeout: float | None = None) -> Generator[str, None, None]:
        """The task's output as it is written, chunk by chunk, until it finishes.

        It starts with the current attempt's output so far; what abandoned
        attempts (lease expired, handed back) wrote is not repeated. When a
        new attempt begins meanwhile, its output follows.
        """
        with closing(self.output_chunks(timeout=timeout)) as chunks:
            for chunk in chunks:
                yield chunk.text

    def output_chunks(self, *, timeout: float | None = None) -> Generator[OutputChunk, None, None]:
        """Like `output`, with each chunk's attempt and offset."""
        deadline = Deadline(timeout)
        # The cursor first, then the task: a chunk committed in between is both
        # in the task's output and after the cursor, and is skipped below.
        cursor = self._client.get_cursor()
        task = self.get()
        if task.output:
            yield OutputChunk(0, task.output, task.attempt)
        if task.status.terminal:
            return
        events = self._client._watch((), (self.id,), cursor, deadline)
        with closing(events):
            for event in events:
                self.task = event.onto(self.task).task
                chunk = event.output
                if chunk is not None and (chunk.attempt, chunk.offset) >= (
                    task.attempt,
                    task.output_size,
                ):
                    yield chunk
                if self.task.status.terminal:
                    return

    def answer(self, text: str) -> Task:
        """Answers the question the claimant asked (`task.question`)."""
        self.task = self._client.provide_input(self.id, text)
        return self.task

    def tree(self) -> list[Task]:
        """The task and the descendants this agent sees."""
        return self._client.get_task_tree(self.id)

    def cancel(self, reason: str = "", *, keep_children: bool = False) -> Task:
        self.task = self._client.cancel_task(self.id, reason, keep_children=keep_children)
        return self.task

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"


class Job:
    """A task this worker holds a lease on."""

    def __init__(self, client: Client, task: Task, lease_token: str):
        self._client = client
        self.task = task
        self.lease_token = lease_token
        self.finished = False
        # Set when a heartbeat learns the task was canceled or failed meanwhile.
        self.cancel_requested = False
        self._stop_beating = threading.Event()
        self._heartbeats: threading.Thread | None = None

    @property
    def id(self) -> str:
        return self.task.id

    def heartbeat(self, *, lease: float | None = None) -> bool:
        """Extends the lease; True means the task was canceled and work should stop."""
        self.task, cancel_requested = self._client.heartbeat(self.id, self.lease_token, lease=lease)
        self.cancel_requested = self.cancel_requested or cancel_requested
        return cancel_requested

    def write(self, text: str) -> None:
        """Streams a chunk of the answer to whoever follows the task."""
        self._client.append_output(self.id, self.lease_token, text)

    def ask(self, question: str, *, timeout: float | None = None) -> str:
        """Asks the creator `question` and waits for the answer; the lease pauses meanwhile.

        Raises `TaskCanceledError` or `TaskFailedError` if the task ends instead.
        """
        asked = self._client.request_input(self.id, self.lease_token, question)
        with closing(self._client._watch((), (self.id,), 0, Deadline(timeout))) as events:
            for event in events:
                answer = answer_after(event, asked.version)
                if answer is not None:
                    self.task = event.task
                    return answer
        raise AssertionError("the watch stream ended without an error")  # it resumes instead

    def complete(self, result: Mapping[str, Any] | None = None) -> Task:
        self.task = self._client.complete_task(self.id, self.lease_token, result)
        self._finished()
        return self.task

    def fail(self, error: str, *, retryable: bool = False) -> Task:
        self.task = self._client.fail_task(self.id, self.lease_token, error, retryable=retryable)
        self._finished()
        return self.task

    def _start_heartbeats(self, lease: float) -> None:
        self._heartbeats = threading.Thread(
            target=self._beat, args=(lease / HEARTBEATS_PER_LEASE,), daemon=True
        )
        self._heartbeats.start()

    def _beat(self, every: float) -> None:
        while not self._stop_beating.wait(every):
            try:
                if self.heartbeat():
                    return
            except UnavailableError:
                continue  # the daemon restarts; the lease may still hold when it is back
            except (LegatoError, RuntimeError):
                return  # the claim is gone, or the client closed

    def _finished(self) -> None:
        self.finished = True
        self._stop_beating.set()
        if self._heartbeats is not None and self._heartbeats is not threading.current_thread():
            self._heartbeats.join()
            self._heartbeats = None

    def _release_if_unfinished(self) -> None:
        if self.finished or self.cancel_requested:
            self._finished()
            return
        try:
            self.fail("the worker stopped before finishing the task", retryable=True)
        except LegatoError:
            self._finished()  # the claim had ended anyway

    def __repr__(self) -> str:
        return f"Job({self.id!r})"
