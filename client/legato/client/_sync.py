# Generated from _async.py by scripts/unasync.py (`make sync`); do not edit.
# `make sync-check` fails when this file is not what the script writes.
"""The blocking face of the client: `Client`, `TaskHandle`, `Job`, `Worker`.

The other face of the client is generated from `_async.py` by `scripts/unasync.py`
(`make sync`); where the two really differ, `_async.py` calls `_concurrency`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from datetime import datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import grpc
from legato.client._concurrency import (
    CallCancelledError,
    Cancellable,
    Event,
    Guard,
    HandlerCancelledError,
    HandlerRun,
    Spawned,
    Stream,
    on_signals,
    sleep,
    spawn,
    unary,
)
from legato.client._core import (
    CHANNEL_OPTIONS,
    CLOSED,
    DEFAULT_WORK_LEASE,
    DEFAULT_WORK_WAIT,
    HANDLER_STOP_WAIT,
    RETRY_ATTEMPTS,
    TRANSIENT,
    WORKER_STOPPING,
    Backoff,
    ClaimRetry,
    ClientCore,
    Deadline,
    LeaseClock,
    PathLike,
    Resume,
    answer_after,
    claim_may_have_ended,
    ended_under,
    lost_claim,
    method_name,
    new_idempotency_key,
    outcome,
)
from legato.client.errors import (
    JobInterruptedError,
    LegatoError,
    RPCError,
    UnavailableError,
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
Handler = Callable[["Job"], Mapping[str, Any] | None]
OnCall = Callable[[Cancellable], None]

log = logging.getLogger("legato.client")


class Client(ClientCore):
    """A blocking client of the legato daemon.

    Args:
        address: `unix:PATH` or `HOST:PORT`; default `LEGATO_ADDRESS` or the
            default daemon socket.
        api_key: this agent's key (default `LEGATO_AGENT_KEY`).
        timeout: seconds each call may take unless it is given its own
            `timeout=` (None: no limit). A call's `timeout=None` means this
            default; 0 is a timeout that has already run out. Every timeout
            raises `DeadlineExceededError`, which is also a `TimeoutError`.
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
            self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(
                self.address, self._credentials, options=CHANNEL_OPTIONS
            )
        self._stub = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._agents = agents_pb2_grpc.AgentServiceStub(self._channel)
        # Jobs whose background heartbeats run; closing the client stops them.
        self._jobs: set[Job] = set()
        self._jobs_guard = Guard()

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
        self,
        method: Callable[..., Response],
        request: Any,
        timeout: float | None = None,
    ) -> Response:
        """A unary call; `timeout` None is the client's. Every unary call passes
        through `_call_until`, the one place they are made."""
        deadline = Deadline(self._timeout_for(timeout), method_name(method))
        return self._call_until(method, request, deadline)

    def _call_until(
        self,
        method: Callable[..., Response],
        request: Any,
        deadline: Deadline,
        on_call: OnCall | None = None,
    ) -> Response:
        self._check_open()
        timeout = deadline.remaining()  # a timeout of 0 has run out before the call
        try:
            response: Response = unary(method, request, timeout, self._metadata, on_call)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc) from None
        except Exception as exc:
            if self._closed:  # closed during the call: the channel refused it
                raise RuntimeError(CLOSED) from exc
            raise
        return response

    def _call_retrying(
        self,
        method: Callable[..., Response],
        request: Any,
        timeout: float | None,
    ) -> Response:
        """A call that is safe to repeat (an idempotency key, a claim token makes
        a repeat answer what the first did), made again while the daemon is
        UNAVAILABLE: at most RETRY_ATTEMPTS times, with backoff, within `timeout`.

        So a reply lost with its connection (a daemon restarting, a network
        cut) costs a retry, never a duplicate.
        """
        deadline = Deadline(self._timeout_for(timeout), method_name(method))
        backoff = Backoff()
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                return self._call_until(method, request, deadline)
            except UnavailableError as exc:
                delay = backoff.next()
                left = deadline.left()
                if attempt == RETRY_ATTEMPTS or (left is not None and left <= delay):
                    raise
                log.debug(
                    "%s failed with %s; trying again in %.2f s", method_name(method), exc, delay
                )
                sleep(delay)  # backoff while the daemon comes back
        raise AssertionError("unreachable: the last attempt raises")

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
        timeout: float | None = None,
    ) -> TaskHandle:
        """Creates a task routed to `labels` and returns a handle to its result.

        `deadline` (a time, or a delay from now) fails the task if it has not
        finished by then. Without an `idempotency_key` the client makes one, so
        that the call can be retried while the daemon is unreachable: a reply
        lost on the way back never makes a second task. Pass your own key to
        make a repeat of the same request (e.g. after your process restarts)
        answer the task the first one made.
        """
        request = self._create_request(
            content,
            labels,
            context,
            parent_id,
            idempotency_key or new_idempotency_key(),
            max_attempts,
            deadline,
        )
        task = Task.from_proto(self._call_retrying(self._stub.CreateTask, request, timeout))
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
        timeout: float | None = None,
    ) -> TaskHandle:
        """Hands `content` to whoever holds `label`; returns the handle to follow it.

        `handle.result()` waits for the answer, `handle.output()` streams
        it as it is written, `handle.answer(...)` replies to a question back.
        """
        return self.create_task(
            content,
            labels=[label],
            context=context,
            parent_id=parent_id,
            idempotency_key=idempotency_key,
            deadline=deadline,
            timeout=timeout,
        )

    def get_handle(self, task_id: str) -> TaskHandle:
        """A handle to an existing task."""
        return TaskHandle(self, task_id)

    def get_task(self, task_id: str, *, timeout: float | None = None) -> Task:
        """The task as it is now."""
        request = tasks_pb2.GetTaskRequest(id=task_id)
        return Task.from_proto(self._call(self._stub.GetTask, request, timeout))

    def list_tasks(
        self,
        *,
        labels: Sequence[str] = (),
        statuses: Sequence[TaskStatus | str] = (),
        parent_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> TaskPage:
        """One page of tasks, oldest first, and the event cursor of the listing."""
        request = self._list_request(labels, statuses, parent_id, page_size, page_token)
        response = self._call(self._stub.ListTasks, request, timeout)
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
        timeout: float | None = None,
    ) -> Job | None:
        """Claims the oldest pending task with any of `labels` (default: all this
        agent's labels), or `task_id`. With nothing pending, waits up to `wait`
        seconds (at most 60) for a task; None if none came.

        Without a `timeout` of its own the call may run `wait` plus 10 s,
        however short the client's timeout is.
        """
        return self._claim(labels, task_id, lease, wait, timeout)

    def _claim(
        self,
        labels: Sequence[str],
        task_id: str,
        lease: float | None,
        wait: float | None,
        timeout: float | None,
        on_call: OnCall | None = None,
    ) -> Job | None:
        response = self._call_until(
            self._stub.ClaimTask,
            self._claim_request(labels, task_id, lease, wait),
            Deadline(self._claim_timeout(wait, timeout), "ClaimTask"),
            on_call,
        )
        if not response.HasField("task"):
            return None
        return Job(self, Task.from_proto(response.task), response.lease_token)

    def heartbeat(
        self,
        task_id: str,
        lease_token: str,
        *,
        lease: float | None = None,
        timeout: float | None = None,
    ) -> tuple[Task, bool]:
        """Extends a lease; returns the task and whether it was canceled (stop work if so)."""
        request = self._heartbeat_request(task_id, lease_token, lease)
        response = self._call(self._stub.Heartbeat, request, timeout)
        return Task.from_proto(response.task), response.cancel_requested

    def complete_task(
        self,
        task_id: str,
        lease_token: str,
        result: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Task:
        """Finishes a claimed task DONE with `result`.

        Retried while the daemon is unreachable: the daemon answers a repeat
        (same claim token, same result) with the DONE task, so a lost reply
        is no failure. A value JSON cannot carry exactly raises
        `InexactValueError` before anything is sent.
        """
        request = self._complete_request(task_id, lease_token, result)
        return Task.from_proto(self._call_retrying(self._stub.CompleteTask, request, timeout))

    def fail_task(
        self,
        task_id: str,
        lease_token: str,
        error: str,
        *,
        retryable: bool = False,
        timeout: float | None = None,
    ) -> Task:
        """Fails a claimed task; `retryable` requeues it while attempts remain."""
        request = tasks_pb2.FailTaskRequest(
            id=task_id, lease_token=lease_token, error=error, retryable=retryable
        )
        return Task.from_proto(self._call(self._stub.FailTask, request, timeout))

    def release_task(
        self, task_id: str, lease_token: str, reason: str = "", *, timeout: float | None = None
    ) -> Task:
        """Hands a claimed task back, PENDING for another worker; the attempt does not count."""
        request = tasks_pb2.ReleaseTaskRequest(id=task_id, lease_token=lease_token, reason=reason)
        return Task.from_proto(self._call(self._stub.ReleaseTask, request, timeout))

    def cancel_task(
        self,
        task_id: str,
        reason: str = "",
        *,
        keep_children: bool = False,
        timeout: float | None = None,
    ) -> Task:
        """Cancels a task and, unless `keep_children`, its unfinished descendants."""
        request = tasks_pb2.CancelTaskRequest(
            id=task_id, reason=reason, keep_children=keep_children
        )
        return Task.from_proto(self._call(self._stub.CancelTask, request, timeout))

    def append_output(
        self, task_id: str, lease_token: str, text: str, *, timeout: float | None = None
    ) -> int:
        """Appends a chunk to a claimed task's output; returns the output's size after it."""
        request = tasks_pb2.AppendOutputRequest(id=task_id, lease_token=lease_token, text=text)
        return (self._call(self._stub.AppendOutput, request, timeout)).output_size

    def request_input(
        self, task_id: str, lease_token: str, question: str, *, timeout: float | None = None
    ) -> Task:
        """Asks the creator a question; the task waits INPUT_REQUIRED for the answer."""
        request = tasks_pb2.RequestInputRequest(
            id=task_id, lease_token=lease_token, question=question
        )
        return Task.from_proto(self._call(self._stub.RequestInput, request, timeout))

    def provide_input(self, task_id: str, answer: str, *, timeout: float | None = None) -> Task:
        """Answers the question a task's claimant asked (creator or admin)."""
        request = tasks_pb2.ProvideInputRequest(id=task_id, answer=answer)
        return Task.from_proto(self._call(self._stub.ProvideInput, request, timeout))

    def get_task_tree(self, task_id: str, *, timeout: float | None = None) -> list[Task]:
        """The task and the descendants this agent sees, each after its parent
        (every page of them, all within `timeout`)."""
        deadline = Deadline(self._timeout_for(timeout), "GetTaskTree")
        tasks: list[Task] = []
        page_token = ""
        while True:
            # The most a page holds; the daemon cuts pages of large tasks shorter.
            request = tasks_pb2.GetTaskTreeRequest(
                id=task_id, page_size=1000, page_token=page_token
            )
            response = self._call_until(self._stub.GetTaskTree, request, deadline)
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
    ) -> Stream[Job]:
        """Jobs for `labels` (default: this agent's), claimed by long-poll, forever.

        Each job heartbeats in the background until it is finished, and watches
        its task: when the task ends under the claim (canceled, failed at its
        deadline) or the lease is lost, `job.interrupted` turns True,
        `job.wait_interrupted()` returns and the job's calls raise
        `JobInterruptedError`. Finish a job in the loop body with
        `job.complete(result)` or `job.fail(...)`; a job left
        unfinished when the loop moves on or stops is handed back with
        `job.release()` for another worker.

        The daemon restarting or answering slowly only delays the next claim.
        The loop ends with `RuntimeError` once the client is closed, and with
        the error of any other refused claim (e.g. `UnauthenticatedError`
        when the agent's key no longer works). For handlers run concurrently,
        with a graceful stop, use `Worker`.
        """
        retry = ClaimRetry()
        while True:
            try:
                job = self.claim(labels, lease=lease, wait=wait)
            except RPCError as exc:
                self._check_open()  # closed while the claim waited
                sleep(retry.failed(exc))  # backoff while the daemon comes back
                continue
            retry.succeeded()
            if job is None:
                continue
            job._start_heartbeats(lease)
            try:
                yield job
            finally:
                job._release_if_unfinished()

    def run_worker(
        self,
        handler: Handler,
        labels: Sequence[str] = (),
        *,
        lease: float = DEFAULT_WORK_LEASE,
        wait: float = DEFAULT_WORK_WAIT,
        max_concurrent: int = 1,
    ) -> None:
        """Runs `handler` on every job for `labels` until stopped: an `Worker`
        whose graceful stop SIGTERM and SIGINT ask for (where the program does not
        handle them itself and this runs in the main thread).

        See `Worker` for how a handler is interrupted, how the worker
        stops, and when the loop ends with an error.
        """
        worker = Worker(
            self,
            handler=handler,
            labels=labels,
            max_concurrent=max_concurrent,
            lease=lease,
            wait=wait,
        )
        with on_signals(worker.stop):
            worker.run()

    # -- history ----------------------------------------------------------------

    def task_history(self, task_id: str, *, timeout: float | None = None) -> list[TaskEvent]:
        """Every stored event of a task, oldest first: its chain of custody
        (every page of it, all within `timeout`)."""
        deadline = Deadline(self._timeout_for(timeout), "ListTaskEvents")
        events: list[TaskEvent] = []
        after_seq = 0
        while True:
            request = tasks_pb2.ListTaskEventsRequest(
                id=task_id, after_seq=after_seq, page_size=1000
            )
            response = self._call_until(self._stub.ListTaskEvents, request, deadline)
            events.extend(TaskEvent.from_proto(e) for e in response.events)
            after_seq = response.next_after_seq
            if not after_seq:
                return events

    # -- agents -----------------------------------------------------------------

    def whoami(self, *, timeout: float | None = None) -> Agent:
        """The agent this client's key belongs to."""
        request = agents_pb2.WhoAmIRequest()
        return Agent.from_proto(self._call(self._agents.WhoAmI, request, timeout))

    def create_agent(
        self,
        name: str,
        *,
        labels: Sequence[str] = (),
        role: Role | str = Role.AGENT,
        timeout: float | None = None,
    ) -> tuple[Agent, str]:
        """Creates an agent (admin only); returns it and its API key, shown this once."""
        request = agents_pb2.CreateAgentRequest(name=name, labels=labels, role=Role(role).proto)
        response = self._call(self._agents.CreateAgent, request, timeout)
        return Agent.from_proto(response.agent), response.api_key

    def list_agents(
        self, *, include_revoked: bool = False, timeout: float | None = None
    ) -> list[Agent]:
        """Every agent (admin only), revoked ones with `include_revoked`."""
        request = agents_pb2.ListAgentsRequest(include_revoked=include_revoked)
        response = self._call(self._agents.ListAgents, request, timeout)
        return [Agent.from_proto(a) for a in response.agents]

    def get_agent(self, name: str, *, timeout: float | None = None) -> Agent:
        """One agent by name."""
        request = agents_pb2.GetAgentRequest(name=name)
        return Agent.from_proto(self._call(self._agents.GetAgent, request, timeout))

    def update_agent(
        self,
        name: str,
        *,
        labels: Sequence[str] | None = None,
        role: Role | str | None = None,
        timeout: float | None = None,
    ) -> Agent:
        """Replaces an agent's labels and/or role (admin only)."""
        request = self._update_agent_request(name, labels, role)
        return Agent.from_proto(self._call(self._agents.UpdateAgent, request, timeout))

    def revoke_agent(self, name: str, *, timeout: float | None = None) -> Agent:
        """Revokes an agent for good: its key stops working, its watch streams end."""
        request = agents_pb2.RevokeAgentRequest(name=name)
        return Agent.from_proto(self._call(self._agents.RevokeAgent, request, timeout))

    def rotate_key(self, name: str = "", *, timeout: float | None = None) -> tuple[Agent, str]:
        """A new key for `name` (default: this client's agent); the old one stops at once."""
        request = agents_pb2.RotateKeyRequest(name=name)
        response = self._call(self._agents.RotateKey, request, timeout)
        return Agent.from_proto(response.agent), response.api_key

    def get_cursor(self, *, timeout: float | None = None) -> int:
        """The seq of the latest event: `watch(after_seq=cursor)` misses nothing from now on."""
        request = tasks_pb2.GetCursorRequest()
        return (self._call(self._stub.GetCursor, request, timeout)).cursor

    def watch(
        self,
        *,
        labels: Sequence[str] = (),
        task_ids: Sequence[str] = (),
        after_seq: int | None = None,
    ) -> Stream[TaskEvent]:
        """Task events in seq order, resuming by itself when the stream drops.

        With `after_seq`, stored events after it come first; without, events
        from when iteration starts (not when `watch` is called: to miss nothing
        after a point, pass `after_seq`, e.g. a `list_tasks` cursor). Either way
        no event is missed or repeated across reconnects. A stream has no
        timeout: it lasts until the loop leaves it.
        """
        return self._watch(labels, task_ids, after_seq, Deadline(None))

    def _watch(
        self,
        labels: Sequence[str],
        task_ids: Sequence[str],
        after_seq: int | None,
        deadline: Deadline,
        *,
        on_call: OnCall | None = None,
    ) -> Stream[TaskEvent]:
        """`watch`, ending by `deadline`; `on_call` gets each stream's call, so
        that someone else can end it."""
        if after_seq is None:
            after_seq = self.get_cursor(timeout=deadline.remaining())
        resume = Resume()
        while True:
            self._check_open()
            call = self._stub.WatchTasks(
                self._watch_request(labels, task_ids, after_seq),
                timeout=deadline.remaining(),
                metadata=self._metadata,
            )
            if on_call is not None:
                on_call(call)
            try:
                for message in call:
                    event = TaskEvent.from_proto(message)
                    after_seq = event.seq
                    resume.progressed()
                    yield event
            except grpc.RpcError as exc:
                delay = resume.delay_after(self._rpc_error(exc), deadline)
                sleep(delay)  # backoff before reconnecting
            finally:
                call.cancel()

    def close(self) -> None:
        """Closes the channel; the client cannot be used afterwards.

        The background heartbeats of its jobs stop before this returns, and
        their handlers are interrupted; the daemon requeues those tasks when
        their leases end.
        """
        if not self._closed:
            self._closed = True
            with self._jobs_guard:
                jobs = list(self._jobs)
            for job in jobs:
                job._interrupt("the client was closed")
                job._stop_guard_soon()
            self._channel.close()  # ends the calls the background work is in
            for job in jobs:
                job._guard_stopped()

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
    """A task this client can wait on, inspect or cancel.

    Waits (`result`, `events`, `output`) take `timeout=` as the most seconds
    they wait, None for no limit; calls (`get`, `answer`, `tree`, `cancel`)
    take it as the client's calls do.
    """

    def __init__(self, client: Client, task_id: str, task: Task | None = None):
        self._client = client
        self.id = task_id
        self.task = task

    def get(self, *, timeout: float | None = None) -> Task:
        """The task as it is now."""
        self.task = self._client.get_task(self.id, timeout=timeout)
        return self.task

    def result(self, *, timeout: float | None = None) -> Task:
        """Waits on the watch stream for the task to finish and returns it.

        Raises `TaskFailedError` or `TaskCanceledError` if it did not finish
        DONE, and `DeadlineExceededError` (a `TimeoutError`) after `timeout` seconds.
        """
        deadline = Deadline(timeout, f"waiting for task {self.id}")
        with closing(self._client._watch((), (self.id,), 0, deadline)) as events:
            for event in events:
                self.task = event.onto(self.task).task
                if self.task.status.terminal:
                    return outcome(self.task)
        raise AssertionError("the watch stream ended without an error")  # it resumes instead

    def events(self, *, timeout: float | None = None) -> Stream[TaskEvent]:
        """Every event of the task from its creation, live, until it finishes."""
        deadline = Deadline(timeout, f"following task {self.id}")
        with closing(self._client._watch((), (self.id,), 0, deadline)) as events:
            for event in events:
                # Events are deltas; replayed from CREATED on, they fold into
                # the whole task.
                event = event.onto(self.task)
                self.task = event.task
                yield event
                if event.task.status.terminal:
                    return

    def output(self, *, timeout: float | None = None) -> Stream[str]:
        """The task's output as it is written, chunk by chunk, until it finishes.

        It starts with the current attempt's output so far; what abandoned
        attempts (lease expired, handed back) wrote is not repeated. When a
        new attempt begins meanwhile, its output follows.
        """
        with closing(self.output_chunks(timeout=timeout)) as chunks:
            for chunk in chunks:
                yield chunk.text

    def output_chunks(self, *, timeout: float | None = None) -> Stream[OutputChunk]:
        """Like `output`, with each chunk's attempt and offset."""
        deadline = Deadline(timeout, f"following the output of task {self.id}")
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

    def answer(self, text: str, *, timeout: float | None = None) -> Task:
        """Answers the question the claimant asked (`task.question`)."""
        self.task = self._client.provide_input(self.id, text, timeout=timeout)
        return self.task

    def tree(self, *, timeout: float | None = None) -> list[Task]:
        """The task and the descendants this agent sees."""
        return self._client.get_task_tree(self.id, timeout=timeout)

    def cancel(
        self, reason: str = "", *, keep_children: bool = False, timeout: float | None = None
    ) -> Task:
        """Cancels the task and, unless `keep_children`, its unfinished descendants."""
        self.task = self._client.cancel_task(
            self.id, reason, keep_children=keep_children, timeout=timeout
        )
        return self.task

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"


class Job:
    """A task this worker holds a lease on.

    With background heartbeats (jobs from `work`, `run_worker` and `Worker`),
    the job learns when the task ends under the claim or the lease is lost:
    `interrupted` turns True, `interruption` says why, `wait_interrupted()`
    returns, and `write`, `ask` and `heartbeat` raise `JobInterruptedError`. An
    asyncio handler run by a worker is cancelled then; a blocking one, which
    cannot be cancelled from outside, is told by those means instead.
    """

    def __init__(self, client: Client, task: Task, lease_token: str):
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
        self._interrupted = Event()
        # While complete/fail/release is on its way, news of an ending is no
        # interruption: it may be this very call's own doing.
        self._finishing = False
        # A stopping worker hands the job back although it interrupted it; and
        # only once, whoever (the job's own runner or the worker) gets there first.
        self._hand_back = False
        self._handed_back = False
        self._lease: LeaseClock | None = None
        self._wake = Event()
        # Guards what the handler and the background work share (blocking face:
        # they are threads).
        self._lock = Guard()
        self._stop = Event()
        self._watch_call: Cancellable | None = None
        self._handler_run = HandlerRun()
        self._heartbeats: Spawned | None = None
        self._watching: Spawned | None = None

    @property
    def id(self) -> str:
        return self.task.id

    @property
    def interrupted(self) -> bool:
        """Whether work on the job must stop; `interruption` says why."""
        return self.interruption is not None

    def wait_interrupted(self, timeout: float | None = None) -> bool:
        """Waits until the job is interrupted, at most `timeout` seconds; whether it was."""
        self._interrupted.wait(timeout)
        return self.interrupted

    def heartbeat(self, *, lease: float | None = None, timeout: float | None = None) -> bool:
        """Extends the lease; True means the task was canceled and work should stop.

        `lease` (seconds) replaces the claim's lease length from now on.
        """
        self._check_interrupted()
        sent_at = time.monotonic()
        self.task, cancel_requested = self._client.heartbeat(
            self.id, self.lease_token, lease=lease, timeout=timeout
        )
        if self._lease is not None:
            self._lease.renewed(sent_at, lease)
        if cancel_requested:
            self._interrupt(ended_under(self.task), canceled=True)
        return cancel_requested

    def write(self, text: str, *, timeout: float | None = None) -> None:
        """Streams a chunk of the answer to whoever follows the task."""
        self._check_interrupted()
        self._client.append_output(self.id, self.lease_token, text, timeout=timeout)

    def ask(self, question: str, *, timeout: float | None = None) -> str:
        """Asks the creator `question` and waits for the answer, at most `timeout`
        seconds (None: no limit); the lease pauses meanwhile.

        Raises `TaskCanceledError` or `TaskFailedError` if the task ends instead.
        """
        self._check_interrupted()
        # The question is sent whatever the wait: `timeout` bounds the wait for the answer.
        asked = self._client.request_input(self.id, self.lease_token, question)
        deadline = Deadline(timeout, f"waiting for the answer to task {self.id}")
        with closing(self._client._watch((), (self.id,), 0, deadline)) as events:
            for event in events:
                answer = answer_after(event, asked.version)
                if answer is not None:
                    self.task = event.onto(self.task).task  # events are deltas
                    return answer
        raise AssertionError("the watch stream ended without an error")  # it resumes instead

    def delegate(
        self,
        label: str,
        content: str,
        *,
        context: Mapping[str, Any] | None = None,
        idempotency_key: str = "",
        deadline: datetime | timedelta | None = None,
        timeout: float | None = None,
    ) -> TaskHandle:
        """Hands part of this job to whoever holds `label`: a child task of this
        one, canceled with it; returns the handle to follow it."""
        return self._client.delegate(
            label,
            content,
            context=context,
            parent_id=self.id,
            idempotency_key=idempotency_key,
            deadline=deadline,
            timeout=timeout,
        )

    def complete(
        self, result: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Task:
        """Finishes the task DONE with `result` (a dict of JSON values)."""
        with self._finishing_call():
            self.task = self._client.complete_task(
                self.id, self.lease_token, result, timeout=timeout
            )
        self._finished()
        return self.task

    def fail(self, error: str, *, retryable: bool = False, timeout: float | None = None) -> Task:
        """Fails the task; `retryable` requeues it while attempts remain."""
        with self._finishing_call():
            self.task = self._client.fail_task(
                self.id, self.lease_token, error, retryable=retryable, timeout=timeout
            )
        self._finished()
        return self.task

    def release(self, reason: str, *, timeout: float | None = None) -> Task:
        """Hands the task back unfinished, PENDING for another worker; `reason` is for its history.

        Every hand-back of a work loop goes through here: the loop moving on
        or stopping, the worker being stopped. The attempt does not count
        against the task's `max_attempts`.
        """
        with self._finishing_call():
            self.task = self._client.release_task(
                self.id, self.lease_token, reason, timeout=timeout
            )
        self._finished()
        return self.task

    # -- running a handler ---------------------------------------------------------

    def _run(self, handler: Handler) -> None:
        """Runs `handler` on this job and finishes the task with its outcome."""
        try:
            result = self._handler_run.run(handler, self)
        except HandlerCancelledError:
            if self.interruption is None:  # not ours: the handler was cancelled by itself
                self._settle(None, "CancelledError: the handler was cancelled")
            return
        except Exception as exc:
            if self.interruption is None:
                self._settle(None, f"{type(exc).__name__}: {exc}")
            return
        if self.interruption is None:
            self._settle(result, None)

    def _settle(self, result: Mapping[str, Any] | None, error: str | None) -> None:
        """Completes (or, with `error`, fails) the task, unless the handler already did.

        A daemon that cannot be reached is tried again while the lease lasts;
        a refusal is logged, except one that ends the work loop altogether
        (the agent's key no longer works).
        """
        backoff = Backoff()
        while not self.finished and self.interruption is None:
            try:
                if error is None:
                    self.complete(result)
                else:
                    self.fail(error)
                return
            except (TypeError, ValueError) as exc:  # not JSON, or not exactly
                error = f"the handler's result was refused: {exc}"
            except RPCError as exc:
                left = self._lease.remaining() if self._lease is not None else 0.0
                if exc.code in TRANSIENT and left > 0:
                    delay = min(backoff.next(), left)
                    log.debug("finishing %s failed with %s; again in %.2f s", self.id, exc, delay)
                    sleep(delay)  # backoff while the daemon comes back
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
        with self._client._jobs_guard:
            self._client._jobs.add(self)
        self._heartbeats = spawn(self._beat, f"legato heartbeats {self.id}")
        self._watching = spawn(self._follow, f"legato watch {self.id}")

    def _beat(self) -> None:
        assert self._lease is not None
        backoff = Backoff()
        failures = 0
        wait = self._lease.every()
        while True:
            # The heartbeat's period, cut short by news from the watch or a stop.
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            left = self._lease.remaining()
            if left <= 0 and failures:
                why = "the lease ran out while heartbeats could not reach the daemon"
                self._interrupt(lost_claim(self.id, why), lost=True)
                return
            sent_at = time.monotonic()
            try:
                self.task, cancel_requested = self._client.heartbeat(
                    self.id, self.lease_token, timeout=self._client._heartbeat_timeout(left)
                )
            except RPCError as exc:
                if self._stop.is_set():
                    return  # the call was cut short by close()
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

    def _follow(self) -> None:
        backoff = Backoff()
        after_seq: int | None = None
        while not self._stop.is_set():
            try:
                if after_seq is None:
                    after_seq = self._client.get_cursor()
                    # An ending between the claim and this cursor is not in the
                    # watch: one heartbeat now tells.
                    self._wake.set()
                events = self._client._watch(
                    (), (self.id,), after_seq, Deadline(None), on_call=self._watching_on
                )
                with closing(events):
                    for event in events:
                        if claim_may_have_ended(event):
                            self._wake.set()
            except RPCError as exc:
                if self._stop.is_set():
                    return  # the stream was cancelled to stop the watch
                if exc.code not in TRANSIENT:  # out of sight, say: a heartbeat tells the rest
                    self._wake.set()
                    return
                self._stop.wait(backoff.next())  # backoff while the daemon comes back
            except RuntimeError:
                return  # the client was closed

    def _watching_on(self, call: Cancellable) -> None:
        # A blocked stream is left only by cancelling its call (from another thread).
        with self._lock:
            self._watch_call = call
            stopping = self._stop.is_set()
        if stopping:
            call.cancel()

    def _interrupt(
        self,
        reason: str,
        *,
        canceled: bool = False,
        lost: bool = False,
        hand_back: bool = False,
    ) -> None:
        with self._lock:
            if self.finished or self._finishing or self.interruption is not None:
                return
            self.interruption = reason
            self.cancel_requested = self.cancel_requested or canceled
            self.lost = self.lost or lost
            self._hand_back = hand_back
        self._interrupted.set()
        if self._handler_run.cancel():
            log.info("%s; its handler is cancelled", reason)
        else:
            log.info("%s; stop working on it", reason)
        self._stop_guard_soon()

    def _check_interrupted(self) -> None:
        if self.interruption is not None:
            raise JobInterruptedError(self.task, self.interruption)

    @contextlib.contextmanager
    def _finishing_call(self) -> Stream[None]:
        with self._lock:
            self._finishing = True
        try:
            yield
        except BaseException:
            self._finishing = False
            raise

    def _stop_guard_soon(self) -> None:
        """Stops the background heartbeats and watch without waiting for them."""
        with self._client._jobs_guard:
            self._client._jobs.discard(self)
        with self._lock:
            self._stop.set()
            call = self._watch_call
        self._wake.set()
        if call is not None:
            call.cancel()
        for spawned in (self._heartbeats, self._watching):
            if spawned is not None:
                spawned.cancel()

    def _guard_stopped(self) -> None:
        for spawned in (self._heartbeats, self._watching):
            if spawned is not None:
                spawned.join()

    def _finished(self) -> None:
        self.finished = True
        self._stop_guard_soon()
        self._guard_stopped()

    def _release_if_unfinished(
        self, reason: str = "the worker stopped before finishing the task"
    ) -> None:
        with self._lock:
            # Not while complete/fail is on its way: its outcome decides, and if
            # it fails the job's own runner hands the job back after it.
            release = not (
                self.finished
                or self._finishing
                or self._handed_back
                or (self.interruption is not None and not self._hand_back)
            )
            if release:
                self._handed_back = True
        if release:
            try:
                self.release(reason)
            except (LegatoError, RuntimeError) as exc:
                log.warning("could not hand %s back (%s); its lease will run out", self.id, exc)
        self._stop_guard_soon()
        self._guard_stopped()

    def __repr__(self) -> str:
        return f"Job({self.id!r})"


class Worker:
    """Runs `handler` on the tasks for `labels`, at most `max_concurrent` at a time.

    The task completes with what `handler` returns, or fails with the
    exception it raises (a result JSON cannot carry exactly fails it too).
    Each job heartbeats in the background and watches its task: when the
    task ends under the handler (its creator cancels it, its deadline
    passes) or the lease is lost, the job is interrupted. An asyncio handler
    is then cancelled, as an activity is in Temporal, and sees
    `asyncio.CancelledError`; a blocking handler cannot be cancelled from
    outside, so it is told: `job.interrupted` turns True,
    `job.wait_interrupted()` returns, and its next `job.write()`,
    `job.ask()` or `job.heartbeat()` raises `JobInterruptedError`. Either
    way the task is left as it is, the ending is logged on the
    `legato.client` logger, and the worker goes on with the next job.

    `stop()` (or `shutdown()`) stops it gracefully: no more claims, running
    handlers get `grace` seconds to finish, the rest are interrupted and
    their tasks handed back (ReleaseTask: PENDING again for another worker,
    the attempt not counted), then `run()` returns. Cancelling `run()`
    (asyncio) stops it the same way, without grace.

    `run()` ends with an error when the client is closed (`RuntimeError`)
    or the daemon refuses this agent altogether (e.g. `UnauthenticatedError`
    for a revoked key); a daemon restarting or answering slowly only delays
    the next claim.

    Args:
        client: the client to work through; its agent's key claims the tasks.
        handler: called with each `Job`; returns the result (a dict of
            JSON values, or None for an empty one).
        labels: the labels to claim for (default: all the agent's labels).
        max_concurrent: how many handlers run at once.
        lease: seconds each claim is leased for, renewed by heartbeats.
        wait: seconds each long-poll claim waits for a task.
    """

    def __init__(
        self,
        client: Client,
        handler: Handler,
        *,
        labels: Sequence[str] = (),
        max_concurrent: int = 1,
        lease: float = DEFAULT_WORK_LEASE,
        wait: float = DEFAULT_WORK_WAIT,
    ):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be 1 or more, not {max_concurrent}")
        self.client = client
        self.handler = handler
        self.labels: tuple[str, ...] = (labels,) if isinstance(labels, str) else tuple(labels)
        self.max_concurrent = max_concurrent
        self.lease = lease
        self.wait = wait
        self._guard = Guard()
        self._running: dict[Job, Spawned] = {}
        # Set when a job ends or a stop is asked for: the claim loop looks again.
        self._changed = Event()
        self._stopping = False
        self._grace = 0.0
        self._claim_call: Cancellable | None = None
        self._fatal: Exception | None = None
        self._started = False
        self._done = Event()

    @property
    def running(self) -> list[Job]:
        """The jobs whose handlers run now."""
        with self._guard:
            return list(self._running)

    def stop(self, *, grace: float = 0.0) -> None:
        """Asks the worker to stop and returns at once (safe in a signal handler).

        No more tasks are claimed; running handlers get `grace` seconds to
        finish, then they are interrupted and their tasks handed back.
        """
        with self._guard:
            if self._stopping:
                return
            self._stopping = True
            self._grace = grace
            call = self._claim_call
        if call is not None:
            call.cancel()  # ends the long-poll claim at once
        self._changed.set()

    def shutdown(self, *, grace: float = 0.0) -> None:
        """`stop(grace=grace)`, then waits until `run()` has handed back what it had."""
        self.stop(grace=grace)
        if self._started:
            self._done.wait()

    def run(self) -> None:
        """Claims and runs jobs until stopped; see the class for how it ends."""
        if self._started:
            raise RuntimeError("this worker has run already; create a new one")
        self._started = True
        try:
            self._claim_loop()
        finally:
            self._stop_jobs()
            self._done.set()
        if self._fatal is not None:
            raise self._fatal

    def _claim_loop(self) -> None:
        retry = ClaimRetry()
        while True:
            self._changed.clear()
            with self._guard:
                if self._stopping or self._fatal is not None:
                    return
                full = len(self._running) >= self.max_concurrent
            if full:
                self._changed.wait()
                continue
            try:
                job = self.client._claim(
                    self.labels, "", self.lease, self.wait, None, on_call=self._claiming
                )
            except CallCancelledError:
                continue  # stop() ended the long-poll
            except RPCError as exc:
                self.client._check_open()  # closed while the claim waited
                # Backoff while the daemon comes back, cut short by a stop.
                self._changed.wait(retry.failed(exc))
                continue
            finally:
                with self._guard:
                    self._claim_call = None
            retry.succeeded()
            if job is None:
                continue
            job._start_heartbeats(self.lease)
            with self._guard:
                stopping = self._stopping
                if not stopping:
                    name = f"legato handler {job.id}"
                    self._running[job] = spawn(partial(self._run_job, job), name)
            if stopping:  # the claim came back as the stop came in
                job._release_if_unfinished()

    def _claiming(self, call: Cancellable) -> None:
        with self._guard:
            self._claim_call = call
            stopping = self._stopping
        if stopping:
            call.cancel()

    def _run_job(self, job: Job) -> None:
        try:
            job._run(self.handler)
        except Exception as exc:  # the agent refused, the client closed: the worker ends
            with self._guard:
                if self._fatal is None:
                    self._fatal = exc
        finally:
            try:
                job._release_if_unfinished()
            finally:
                with self._guard:
                    self._running.pop(job, None)
                self._changed.set()

    def _stop_jobs(self) -> None:
        with self._guard:
            grace = self._grace if self._stopping else 0.0
            self._stopping = True
            running = dict(self._running)
        if grace > 0 and running:
            deadline = Deadline(grace)
            for spawned in running.values():
                left = deadline.left()
                spawned.join(max(left or 0.0, 0.0))
        with self._guard:
            running = dict(self._running)
        for job in running:
            job._interrupt(WORKER_STOPPING, hand_back=True)
        for job in running:
            job._release_if_unfinished()
        for job, spawned in running.items():
            if not spawned.join(HANDLER_STOP_WAIT):
                log.warning(
                    "the handler of task %s did not return within %.0f s of the stop; "
                    "its task was handed back",
                    job.id,
                    HANDLER_STOP_WAIT,
                )

    def __repr__(self) -> str:
        return f"Worker(labels={list(self.labels)!r}, max_concurrent={self.max_concurrent})"
