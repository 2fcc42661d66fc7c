"""The MCP bridge: legato's tools for any MCP client (Claude Code, Codex, Cursor...).

Each agent starts one `legato mcp --agent NAME` over stdio; its key comes from
the agent's key file in the data dir (or `LEGATO_AGENT_KEY`), never from the
MCP client's configuration, and is read again when the daemon refuses it (a
new key from `legato mcp config --new-key` is taken up without a restart). A
bridge of the user's default daemon starts it when it finds none, at launch
and when a call finds it gone. The bridge keeps the lease
tokens of the tasks it claimed and heartbeats them in the background, so a
model never copies a token around. stdout carries only MCP messages: logs go
to stderr.

What the model reads is the tool result, so everything it must act on is in
it: the daemon's warnings (a label nobody holds), a wait cut to the limit,
errors in the words of the tool's own parameters. Results are compact (the
id, the status and what changed: result, error, question, output); the
whole task comes with `full=true`, or with claim_task, whose claimant needs
all of it.

Waiting tools return well before clients give up on a tool call (Codex waits
60 s by default): every wait is capped at `MAX_WAIT_SECONDS`.
"""

# No `from __future__ import annotations`: the tools' annotations carry the wait limit
# of the server being built, so they are evaluated where the tools are defined.
import asyncio
import contextlib
import functools
import logging
import re
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, ParamSpec, TypeVar

from legato.client._async import AsyncClient, AsyncJob, AsyncTaskHandle
from legato.client.errors import (
    InvalidArgumentError,
    LegatoError,
    UnauthenticatedError,
    UnavailableError,
)
from legato.client.mcp_server import Context, Server, ToolError
from legato.client.models import EventType, Task, TaskEvent, TaskStatus
from pydantic import BaseModel, Field

log = logging.getLogger("legato.mcp")

MAX_WAIT_SECONDS = 45.0
# Leases of tasks claimed through the bridge; heartbeats renew them while it runs.
BRIDGE_LEASE = 120.0
# Output longer than this is cut in tool results, keeping the end (the freshest part).
MAX_OUTPUT_CHARS = 32_000
# A list shows this much of each task's request: enough to tell tasks apart.
REQUEST_PREVIEW_CHARS = 80

# The statuses whose `error` is the task's own: why it failed, or was canceled.
ENDED_WITH_ERROR = (TaskStatus.FAILED, TaskStatus.CANCELED)

P = ParamSpec("P")
R = TypeVar("R")

INSTRUCTIONS = """\
legato lets you hand work to other agents and keep going. Tasks are routed by
labels like @researcher. As a delegator: delegate_task, then later
wait_for_task or get_task for the result; answer_task if the delegate asks you
something. As a delegate: claim_task, append_output as you go, ask_creator if
you must, then complete_task with a structured, sourced result (or fail_task).
Read a result's `warnings`: they say what went differently from what you asked.
"""

WARNINGS = Field(
    default=None, description="What went differently from what you asked; read and act on them"
)


class TaskView(BaseModel):
    """A task as the model sees it. Compact by default: the id, the status and the
    outcome so far; `full=true` adds what was asked, by whom, for whom."""

    id: str
    status: str = Field(description="pending, claimed, input_required, done, failed or canceled")
    result: dict[str, Any] | None = Field(default=None, description="The answer, once done")
    error: str | None = Field(default=None, description="Why it failed or was canceled")
    question: str | None = Field(
        default=None, description="A question the delegate asked back, if any"
    )
    answer: str | None = Field(default=None, description="The creator's answer to that question")
    output: str | None = Field(
        default=None,
        description="What the current attempt streamed so far (may be cut at the start)",
    )
    output_size: int | None = Field(
        default=None,
        description="Bytes the current attempt streamed, where `output` is not shown: "
        "get_task shows the text",
    )
    parent_id: str | None = Field(default=None, description="The task this one was delegated under")
    request: str | None = Field(default=None, description="What was asked")
    labels: list[str] | None = None
    context: dict[str, Any] | None = None
    created_by: str | None = None
    claimed_by: str | None = None
    attempt: int | None = Field(
        default=None,
        description="Attempts so far, as counted toward max_attempts (handed-back ones are not)",
    )
    max_attempts: int | None = None
    deadline: datetime | None = None
    warnings: list[str] | None = WARNINGS


class TaskList(BaseModel):
    tasks: list[TaskView]


class Claim(BaseModel):
    """What claim_task found."""

    claimed: bool = Field(description="False when no task was waiting")
    task: TaskView | None = None
    warnings: list[str] | None = WARNINGS


class OutputWritten(BaseModel):
    output_size: int = Field(description="Bytes of output the task has now")


class Asked(BaseModel):
    answered: bool = Field(description="False if no answer came within the wait")
    answer: str | None = Field(default=None, description="The creator's answer, when answered")
    task: TaskView
    warnings: list[str] | None = WARNINGS


def _cut(output: str) -> str:
    if len(output) <= MAX_OUTPUT_CHARS:
        return output
    return (
        f"[…{len(output) - MAX_OUTPUT_CHARS} earlier characters cut]" + output[-MAX_OUTPUT_CHARS:]
    )


def _preview(text: str) -> str:
    if len(text) <= REQUEST_PREVIEW_CHARS:
        return text
    return text[: REQUEST_PREVIEW_CHARS - 1] + "…"


def view(
    task: Task,
    *,
    full: bool = False,
    listed: bool = False,
    with_output: bool = False,
    warnings: Sequence[str] = (),
) -> TaskView:
    """The model's view of `task`. `with_output`: `task` came from get_task, the only
    read that carries the output's text; other views give its size instead, never an
    empty text that is not the task's. `listed`: one of many, with a preview of its
    request so the model can tell them apart."""
    shown = TaskView(
        id=task.id,
        status=task.status.value,
        result=task.result,
        # Only an ended task's: a requeued one's is why the last attempt ended.
        error=task.error if task.error and task.status in ENDED_WITH_ERROR else None,
        question=task.question or None,
        answer=task.answer or None,
        parent_id=task.parent_id or None,
        warnings=list(warnings) or None,
    )
    if with_output:
        shown.output = _cut(task.output) if task.output else None
    elif task.output_size:
        shown.output_size = task.output_size
    if full:
        shown.request = task.content
        shown.labels = list(task.labels)
        shown.context = task.context
        shown.created_by = task.created_by
        shown.claimed_by = task.claimed_by or None
        shown.attempt = task.attempt - task.released  # as counted toward max_attempts
        shown.max_attempts = task.max_attempts
        shown.deadline = task.deadline
    elif listed:
        shown.request = _preview(task.content)
        shown.labels = list(task.labels)
    return shown


def _status(status: str) -> TaskStatus:
    """A status as a model may spell it: 'DONE', 'Input-Required', ' done '."""
    try:
        return TaskStatus(status.strip().lower().replace("-", "_").replace(" ", "_"))
    except ValueError:
        raise ToolError(
            f"status {status!r} is unknown; use one of " + ", ".join(s.value for s in TaskStatus)
        ) from None


class Bridge:
    """One bridge process: its client of the daemon and the claims it holds."""

    def __init__(
        self, address: str | None, api_key: str | None, max_wait: float, agent: str | None = None
    ):
        self._address = address
        self._api_key = api_key
        # Started as `legato mcp --agent NAME`: its key file may get a new key while
        # the bridge runs (`legato mcp config --new-key`, `legato agent rotate`).
        self.agent = agent
        self._client: AsyncClient | None = None
        self.max_wait = max_wait
        self.jobs: dict[str, AsyncJob] = {}

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            try:
                self._client = AsyncClient(self._address, api_key=self._api_key)
            except ValueError as exc:
                raise ToolError(
                    f"legato is not configured: {exc}. Ask the user to start this MCP server "
                    "as `legato mcp --agent NAME`: `legato mcp config --client ... --agent NAME` "
                    "prints the configuration and keeps the agent's key where it looks"
                ) from None
        return self._client

    def reload_key(self) -> bool:
        """Re-reads the agent's key file; True if it holds another key, now in use."""
        from legato.client.local import read_agent_key

        if self.agent is None:
            return False
        key = read_agent_key(self.agent)
        if not key or key == self._api_key:
            return False
        self._api_key = key
        if self._client is not None:
            # On the open client, not a new one: the claims it holds keep heartbeating
            # through it.
            self._client.use_key(key)
        return True

    async def restart_daemon(self) -> bool:
        """Starts this user's daemon if this bridge's address is the local default and
        nothing serves it; True if it was started now."""
        from legato.client.local import DaemonNotStarted, ensure_daemon

        try:
            started = await asyncio.to_thread(ensure_daemon, self._address)
        except DaemonNotStarted as exc:
            log.error("%s", exc)
            return False
        if started and self._client is not None:
            # The channel waits out its reconnect backoff (up to 2 s) before it tries
            # again: connected now, the model's next call goes through.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._client._channel.channel_ready(), 5.0)
        return started

    def job(self, task_id: str) -> AsyncJob:
        job = self.jobs.get(task_id)
        if job is None or job.finished:
            raise ToolError(
                f"task {task_id} is not claimed through this session; claim it with claim_task "
                "first (only its claimant can write output, ask, complete or fail it)"
            )
        return job

    def wait(self, seconds: float, parameter: str) -> tuple[float, list[str]]:
        """How long a call may wait for `seconds` asked in `parameter`, and a warning
        when that is not what was asked."""
        if seconds > self.max_wait:
            return self.max_wait, [
                f"{parameter}={seconds:g} is more than one call may wait: waited at most "
                f"{self.max_wait:g} s; call again to wait longer"
            ]
        if seconds < 0:
            return 0.0, [f"{parameter}={seconds:g} is below 0: did not wait"]
        return seconds, []

    async def close(self) -> None:
        """Hands unfinished claims back and closes the connection (reopened on next use)."""
        for job in list(self.jobs.values()):
            with contextlib.suppress(LegatoError):
                await job._release_if_unfinished()
        self.jobs.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# The daemon names fields as the gRPC contract does; the model knows the tool's parameters.
DELEGATION_TERMS = {"content": "request", "labels": "label"}


def _in_tool_terms(message: str, terms: Mapping[str, str]) -> str:
    """`message` with a leading contract field name put as the tool's parameter."""
    match = re.match(r"(\w+)\b", message)
    if match and match.group(1) in terms:
        return terms[match.group(1)] + message[match.end() :]
    return message


def _tool_errors(
    bridge: Bridge, terms: Mapping[str, str] | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Turns legato errors into tool errors with a message the model can act on,
    naming the tool's parameters (`terms`: contract field → parameter)."""

    def decorate(tool: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(tool)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                try:
                    return await tool(*args, **kwargs)
                except UnauthenticatedError:
                    if not bridge.reload_key():
                        raise
                # The key file has a new key: the refused call did nothing, so once more.
                return await tool(*args, **kwargs)
            except UnavailableError:
                if await bridge.restart_daemon():
                    # Not repeated here: a call cut off mid-way may have been applied.
                    raise ToolError(
                        "the legato daemon was not running and has been started again; call "
                        "the tool again"
                    ) from None
                raise ToolError(
                    f"the legato daemon is not reachable at {bridge.client.address}. Ask the user "
                    "to run `legato status`, which says why; `legato serve --detach` starts it"
                ) from None
            except UnauthenticatedError as exc:
                if bridge.agent is not None:
                    raise ToolError(
                        f"legato refused the key of agent {bridge.agent} in its key file "
                        f"({exc.message}). Ask the user to run `legato mcp config --client ... "
                        f"--agent {bridge.agent} --new-key`; this session picks the new key up"
                    ) from None
                raise ToolError(
                    f"legato refused this agent's key ({exc.message}). Ask the user to put a "
                    "current key in this MCP server's env and restart the MCP client, or to "
                    "start it as `legato mcp --agent NAME` (`legato mcp config` prints that)"
                ) from None
            except InvalidArgumentError as exc:
                raise ToolError(_in_tool_terms(exc.message, terms or {})) from None
            except LegatoError as exc:
                raise ToolError(str(exc)) from None
            except TimeoutError:
                raise ToolError("timed out waiting; call wait_for_task again") from None

        return run

    return decorate


async def _events_until(
    handle: AsyncTaskHandle, stop: Callable[[TaskEvent], bool], seconds: float
) -> AsyncGenerator[TaskEvent, None]:
    """The task's events (replayed, then live) until `stop` says so or time runs out."""
    events = handle.events()
    try:
        async with asyncio.timeout(seconds):
            async for event in events:
                yield event
                if stop(event):
                    return
    except TimeoutError:
        return
    finally:
        await events.aclose()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("legato")
    except PackageNotFoundError:
        return "unknown"


def build_server(
    *,
    address: str | None = None,
    api_key: str | None = None,
    max_wait_seconds: float = MAX_WAIT_SECONDS,
    agent: str | None = None,
) -> Server:
    """The legato MCP server; `address` and `api_key` default to LEGATO_ADDRESS and
    LEGATO_AGENT_KEY. No call waits longer than `max_wait_seconds`. With `agent`, a
    refused key is read again from that agent's key file, and the call tried once more."""
    bridge = Bridge(address, api_key, max_wait_seconds, agent)
    # On the server's own loop, while its channel still works.
    server = Server("legato", version=_version(), instructions=INSTRUCTIONS, on_close=bridge.close)
    tool_errors = _tool_errors(bridge)
    most = f"{max_wait_seconds:g}"

    async def current(
        task_id: str, *, full: bool = False, warnings: Sequence[str] = ()
    ) -> TaskView:
        task = await bridge.client.get_task(task_id)
        return view(task, full=full, with_output=True, warnings=warnings)

    async def settled(
        handle: AsyncTaskHandle,
        seconds: float,
        stop: Callable[[TaskEvent], bool],
        ctx: Context,
        *,
        full: bool = False,
        warnings: Sequence[str] = (),
    ) -> TaskView:
        """Waits up to `seconds` for `stop`, relaying the current attempt's output as progress."""
        streamed = 0
        attempt = 0
        async for event in _events_until(handle, stop, seconds):
            chunk = event.output
            if chunk is None or chunk.attempt < attempt:
                continue  # a replayed chunk of an attempt that was set aside
            attempt = chunk.attempt
            streamed += len(chunk.text)
            with contextlib.suppress(Exception):  # progress is best effort
                await ctx.report_progress(streamed, None, chunk.text)
        return await current(handle.id, full=full, warnings=warnings)

    def finished_or_asked(event: TaskEvent) -> bool:
        return event.task.status.terminal or event.type is EventType.INPUT_REQUESTED

    @server.tool(
        description=(
            "Hand a task to another agent by its label (e.g. '@researcher') and keep working. "
            "Returns the task's id at once (status 'pending'), or, with wait_seconds, waits up to "
            f"that long (max {most}) and returns the result if it finished or the question if "
            "the delegate asked one back. Streamed output arrives as progress notifications "
            "meanwhile. Pick the result up later with wait_for_task or get_task. Read the "
            "result's warnings: e.g. no agent holds the label."
        )
    )
    @_tool_errors(bridge, DELEGATION_TERMS)
    async def delegate_task(
        label: Annotated[str, Field(description="Who should do it, e.g. '@researcher'")],
        request: Annotated[str, Field(description="What to do, self-contained")],
        context: Annotated[
            dict[str, Any] | None,
            Field(description="Structured input: files, constraints, what you already know"),
        ] = None,
        wait_seconds: Annotated[
            float, Field(description=f"Wait this long for the result (0 to {most})")
        ] = 0,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> TaskView:
        wait, notes = bridge.wait(wait_seconds, "wait_seconds")
        handle = await bridge.client.delegate(label, request, context=context)
        assert handle.task is not None
        warnings = [*handle.task.warnings, *notes]
        for warning in handle.task.warnings:
            await ctx.warning(warning)  # for the user's log too
        if wait == 0:
            return view(handle.task, warnings=warnings)
        return await settled(handle, wait, finished_or_asked, ctx, warnings=warnings)

    @server.tool(
        description=(
            "The current state of a task you can see: status, result, error, the output "
            "streamed so far, and any question asked back. full=true adds the request, its "
            "context, labels, creator, claimant and attempts."
        )
    )
    @tool_errors
    async def get_task(
        id: Annotated[str, Field(description="The task id")],
        full: Annotated[bool, Field(description="The whole task, not only its outcome")] = False,
    ) -> TaskView:
        return await current(id, full=full)

    @server.tool(
        description=(
            f"Wait (up to timeout_seconds, max {most}) until a task needs you: for a task you "
            "delegated, until it finishes or its delegate asks a question (answer it with "
            "answer_task); for a task you claimed and asked about, until the answer arrives. "
            "Returns the task as it is then; if still running, call it again."
        )
    )
    @tool_errors
    async def wait_for_task(
        id: Annotated[str, Field(description="The task id")],
        timeout_seconds: Annotated[
            float, Field(description=f"How long to wait (0 to {most})")
        ] = 30,
        full: Annotated[bool, Field(description="The whole task, not only its outcome")] = False,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> TaskView:
        wait, warnings = bridge.wait(timeout_seconds, "timeout_seconds")
        handle = bridge.client.get_handle(id)
        task = await bridge.client.get_task(id)
        claimant = id in bridge.jobs
        if task.status.terminal or (task.status is TaskStatus.INPUT_REQUIRED and not claimant):
            return view(task, full=full, with_output=True)
        version = task.version

        def needs_attention(event: TaskEvent) -> bool:
            if event.task.version <= version:
                return False
            if claimant:
                return event.task.status.terminal or event.type is EventType.INPUT_PROVIDED
            return finished_or_asked(event)

        return await settled(handle, wait, needs_attention, ctx, full=full, warnings=warnings)

    @server.tool(
        description=(
            "Tasks in your view: those you created, those for your labels, those you claimed. "
            "Filter by status (pending, claimed, input_required, done, failed, canceled; any "
            "case) and label. Each shows a preview of its request; full=true shows all of it."
        )
    )
    @_tool_errors(bridge, {"labels": "label", "statuses": "status"})
    async def list_my_tasks(
        status: Annotated[str | None, Field(description="Only tasks in this state")] = None,
        label: Annotated[str | None, Field(description="Only tasks with this label")] = None,
        full: Annotated[bool, Field(description="Whole tasks, not previews")] = False,
    ) -> TaskList:
        statuses = [_status(status)] if status else []
        page = await bridge.client.list_tasks(
            labels=[label] if label else [], statuses=statuses, page_size=200
        )
        return TaskList(tasks=[view(t, full=full, listed=True) for t in page.tasks])

    @server.tool(description="Cancel a task you created, and the tasks delegated under it.")
    @tool_errors
    async def cancel_task(
        id: Annotated[str, Field(description="The task id")],
        reason: Annotated[str, Field(description="Why, for the delegate")] = "",
    ) -> TaskView:
        return view(await bridge.client.cancel_task(id, reason))

    @server.tool(
        description=(
            "Answer the question the delegate of your task asked back (the task's 'question'). "
            "The delegate continues with your answer."
        )
    )
    @tool_errors
    async def answer_task(
        id: Annotated[str, Field(description="The task id")],
        answer: Annotated[str, Field(description="Your answer")],
    ) -> TaskView:
        return view(await bridge.client.provide_input(id, answer))

    @server.tool(
        description=(
            "Take the oldest task waiting for your labels (or the given ones) and start on it: "
            f"the whole task. With wait_seconds (max {most}), waits for one to arrive. Returns "
            "claimed=false if none. This session keeps the claim alive until you complete_task "
            "or fail_task."
        )
    )
    @tool_errors
    async def claim_task(
        labels: Annotated[
            list[str] | None, Field(description="Claim from these labels; default: all yours")
        ] = None,
        wait_seconds: Annotated[
            float, Field(description=f"Wait this long for a task (0 to {most})")
        ] = 0,
    ) -> Claim:
        wait, warnings = bridge.wait(wait_seconds, "wait_seconds")
        job = await bridge.client.claim(labels or (), lease=BRIDGE_LEASE, wait=wait or None)
        if job is None:
            return Claim(claimed=False, warnings=warnings or None)
        job._start_heartbeats(BRIDGE_LEASE)
        bridge.jobs[job.id] = job
        return Claim(claimed=True, task=view(job.task, full=True), warnings=warnings or None)

    @server.tool(
        description=(
            "Stream part of your answer to the task's creator while you work (they see it "
            "live). Call it as you make progress; the final answer goes in complete_task."
        )
    )
    @tool_errors
    async def append_output(
        id: Annotated[str, Field(description="The id of a task you claimed")],
        text: Annotated[str, Field(description="The next piece of text")],
    ) -> OutputWritten:
        size = await bridge.client.append_output(id, bridge.job(id).lease_token, text)
        return OutputWritten(output_size=size)

    @server.tool(
        description=(
            "Ask the creator of a task you claimed a question you cannot decide alone, and wait "
            f"up to wait_seconds (max {most}) for the answer. If it has not come, call "
            "wait_for_task later; the task waits for the answer meanwhile."
        )
    )
    @tool_errors
    async def ask_creator(
        id: Annotated[str, Field(description="The id of a task you claimed")],
        question: Annotated[str, Field(description="The question, self-contained")],
        wait_seconds: Annotated[float, Field(description=f"Wait this long (0 to {most})")] = 30,
    ) -> Asked:
        job = bridge.job(id)
        wait, warnings = bridge.wait(wait_seconds, "wait_seconds")
        try:
            answer = await job.ask(question, timeout=wait or 0.001)
        except TimeoutError:
            return Asked(answered=False, task=await current(id), warnings=warnings or None)
        return Asked(
            answered=True, answer=answer, task=await current(id), warnings=warnings or None
        )

    @server.tool(
        description=(
            "Finish a task you claimed with its result: a JSON object, ideally with the answer "
            'and its sources, e.g. {"answer": ..., "sources": [...]}.'
        )
    )
    @tool_errors
    async def complete_task(
        id: Annotated[str, Field(description="The id of a task you claimed")],
        result: Annotated[dict[str, Any], Field(description="The structured, sourced result")],
    ) -> TaskView:
        job = bridge.job(id)
        task = await job.complete(result)
        del bridge.jobs[id]
        return view(task)

    @server.tool(description="Give up on a task you claimed, saying why.")
    @tool_errors
    async def fail_task(
        id: Annotated[str, Field(description="The id of a task you claimed")],
        error: Annotated[str, Field(description="Why it cannot be done")],
        retryable: Annotated[
            bool, Field(description="True to put it back for another attempt")
        ] = False,
    ) -> TaskView:
        job = bridge.job(id)
        task = await job.fail(error, retryable=retryable)
        del bridge.jobs[id]
        return view(task)

    @server.tool(
        description=(
            "Delegate part of a task you claimed to another agent (a child task). Its creator "
            "sees only your final result; you get the child's with wait_for_task. Read the "
            "result's warnings: e.g. no agent holds the label."
        )
    )
    @_tool_errors(bridge, DELEGATION_TERMS)
    async def create_child_task(
        parent_id: Annotated[str, Field(description="The id of the task you claimed")],
        label: Annotated[str, Field(description="Who should do it, e.g. '@specialist'")],
        request: Annotated[str, Field(description="What to do, self-contained")],
        context: Annotated[dict[str, Any] | None, Field(description="Structured input")] = None,
    ) -> TaskView:
        handle = await bridge.client.delegate(label, request, context=context, parent_id=parent_id)
        assert handle.task is not None
        return view(handle.task, warnings=handle.task.warnings)

    return server


def run(*, agent: str | None = None, address: str | None = None) -> int:
    """`legato mcp`: serve the tools over stdio until the client closes the pipe.

    As `agent`, with the key `legato mcp config` kept in its key file in the
    data dir; without one, as the agent of `LEGATO_AGENT_KEY`. Starts the
    daemon in the background when none serves this user's default socket, so
    that an MCP client is all it takes. Returns the exit status.
    """
    from legato.client.local import DaemonNotStarted, ensure_daemon, key_file, read_agent_key

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s legato-mcp: %(message)s"
    )
    api_key = None
    if agent:
        try:
            api_key = read_agent_key(agent)
        except ValueError as exc:
            print(f"legato mcp: --agent {exc}", file=sys.stderr)
            return 1
        if api_key is None:
            print(
                f"legato mcp: no key file for agent {agent} at {key_file(agent)}; run `legato "
                f"mcp config --client ... --agent {agent}` as the user who runs this MCP client",
                file=sys.stderr,
            )
            return 1
    try:
        ensure_daemon(address)
    except DaemonNotStarted as exc:
        # The tools say the daemon is unreachable, in words the model reads.
        logging.getLogger(__name__).error("%s", exc)
    build_server(address=address, api_key=api_key, agent=agent).run()
    return 0
