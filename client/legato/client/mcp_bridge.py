"""The MCP bridge: legato's tools for any MCP client (Claude Code, Codex, Cursor...).

Each agent starts one `legato mcp --agent NAME` over stdio; its key comes from
the agent's key file in the data dir (or `LEGATO_AGENT_KEY`), never from the
MCP client's configuration. The bridge keeps the lease
tokens of the tasks it claimed and heartbeats them in the background, so a
model never copies a token around. stdout carries only MCP messages: logs go
to stderr.

Waiting tools return well before clients give up on a tool call (Codex waits
60 s by default): every wait is capped at `MAX_WAIT_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, ParamSpec, TypeVar

from legato.client._async import AsyncClient, AsyncJob, AsyncTaskHandle
from legato.client.errors import LegatoError, UnauthenticatedError, UnavailableError
from legato.client.models import EventType, Task, TaskEvent, TaskStatus
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

log = logging.getLogger("legato.mcp")

MAX_WAIT_SECONDS = 45.0
# Leases of tasks claimed through the bridge; heartbeats renew them while it runs.
BRIDGE_LEASE = 120.0
# Output longer than this is cut in tool results, keeping the end (the freshest part).
MAX_OUTPUT_CHARS = 32_000

P = ParamSpec("P")
R = TypeVar("R")

INSTRUCTIONS = """\
legato lets you hand work to other agents and keep going. Tasks are routed by
labels like @researcher. As a delegator: delegate_task, then later
wait_for_task or get_task for the result; answer_task if the delegate asks you
something. As a delegate: claim_task, append_output as you go, ask_creator if
you must, then complete_task with a structured, sourced result (or fail_task).
"""


class TaskView(BaseModel):
    """A task as the model sees it."""

    id: str
    status: str = Field(description="pending, claimed, input_required, done, failed or canceled")
    request: str = Field(description="What was asked")
    labels: list[str]
    context: dict[str, Any]
    result: dict[str, Any] | None = Field(description="The answer, once done")
    error: str = Field(description="Why it failed or was canceled")
    output: str = Field(description="Text the delegate streamed so far (may be cut at the start)")
    question: str = Field(description="A question the delegate asked back, if any")
    answer: str = Field(description="The creator's answer to that question")
    created_by: str
    claimed_by: str
    parent_id: str
    deadline: datetime | None


class TaskList(BaseModel):
    tasks: list[TaskView]


class Claim(BaseModel):
    """What claim_task found."""

    claimed: bool = Field(description="False when no task was waiting")
    task: TaskView | None


class OutputWritten(BaseModel):
    output_size: int = Field(description="Bytes of output the task has now")


class Asked(BaseModel):
    answered: bool = Field(description="False if no answer came within the wait")
    answer: str = Field(description="The creator's answer, when answered")
    task: TaskView


def _cut(output: str) -> str:
    if len(output) <= MAX_OUTPUT_CHARS:
        return output
    return (
        f"[…{len(output) - MAX_OUTPUT_CHARS} earlier characters cut]" + output[-MAX_OUTPUT_CHARS:]
    )


def view(task: Task, output: str | None = None) -> TaskView:
    return TaskView(
        id=task.id,
        status=task.status.value,
        request=task.content,
        labels=list(task.labels),
        context=task.context,
        result=task.result,
        error=task.error,
        output=_cut(task.output if output is None else output),
        question=task.question,
        answer=task.answer,
        created_by=task.created_by,
        claimed_by=task.claimed_by,
        parent_id=task.parent_id,
        deadline=task.deadline,
    )


def _wait(seconds: float | None) -> float:
    return max(0.0, min(seconds or 0.0, MAX_WAIT_SECONDS))


class Bridge:
    """One bridge process: its client of the daemon and the claims it holds."""

    def __init__(self, address: str | None, api_key: str | None):
        self._address = address
        self._api_key = api_key
        self._client: AsyncClient | None = None
        self.jobs: dict[str, AsyncJob] = {}

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            try:
                self._client = AsyncClient(self._address, api_key=self._api_key)
            except ValueError as exc:
                raise ToolError(
                    f"legato is not configured: {exc}. Put LEGATO_AGENT_KEY in this MCP "
                    "server's env (`legato mcp config --client ...` prints the snippet)"
                ) from None
        return self._client

    def job(self, task_id: str) -> AsyncJob:
        job = self.jobs.get(task_id)
        if job is None or job.finished:
            raise ToolError(
                f"task {task_id} is not claimed through this session; claim it with claim_task "
                "first (only its claimant can write output, ask, complete or fail it)"
            )
        return job

    async def close(self) -> None:
        """Hands unfinished claims back and closes the connection (reopened on next use)."""
        for job in list(self.jobs.values()):
            with contextlib.suppress(LegatoError):
                await job._release_if_unfinished()
        self.jobs.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _tool_errors(
    bridge: Bridge,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Turns legato errors into tool errors with a message the model can act on."""

    def decorate(tool: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(tool)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await tool(*args, **kwargs)
            except UnavailableError:
                raise ToolError(
                    f"the legato daemon is not reachable at {bridge.client.address}. Ask the user "
                    "to start it with `legato serve` (or `make run` in the legato checkout)"
                ) from None
            except UnauthenticatedError as exc:
                raise ToolError(
                    f"legato refused this agent's key ({exc.message}). Ask the user for a current "
                    "key: `legato mcp config --client ... --agent NAME` prints a new snippet"
                ) from None
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


def build_server(*, address: str | None = None, api_key: str | None = None) -> MCPServer:
    """The legato MCP server; `address` and `api_key` default to LEGATO_ADDRESS and
    LEGATO_AGENT_KEY."""
    bridge = Bridge(address, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[None]) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await bridge.close()  # on the server's own loop, while its channel still works

    server: MCPServer[None] = MCPServer("legato", instructions=INSTRUCTIONS, lifespan=lifespan)
    tool_errors = _tool_errors(bridge)

    async def current(task_id: str) -> TaskView:
        return view(await bridge.client.get_task(task_id))

    async def settled(
        handle: AsyncTaskHandle, seconds: float, stop: Callable[[TaskEvent], bool], ctx: Context
    ) -> TaskView:
        """Waits up to `seconds` for `stop`, relaying streamed output as progress."""
        streamed = 0
        async for event in _events_until(handle, stop, seconds):
            if event.output is not None:
                streamed += len(event.output.text)
                with contextlib.suppress(Exception):  # progress is best effort
                    await ctx.report_progress(streamed, None, event.output.text)
        return await current(handle.id)

    def finished_or_asked(event: TaskEvent) -> bool:
        return event.task.status.terminal or event.type is EventType.INPUT_REQUESTED

    @server.tool(
        description=(
            "Hand a task to another agent by its label (e.g. '@researcher') and keep working. "
            "Returns the task at once (status 'pending'), or, with wait_seconds, waits up to that "
            "long (max 45) and returns the result if it finished or the question if the delegate "
            "asked one back. Streamed output arrives as progress notifications meanwhile. Pick "
            "the result up later with wait_for_task or get_task."
        )
    )
    @tool_errors
    async def delegate_task(
        label: Annotated[str, Field(description="Who should do it, e.g. '@researcher'")],
        request: Annotated[str, Field(description="What to do, self-contained")],
        context: Annotated[
            dict[str, Any] | None,
            Field(description="Structured input: files, constraints, what you already know"),
        ] = None,
        wait_seconds: Annotated[
            float, Field(description="Wait this long for the result (0 to 45)")
        ] = 0,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> TaskView:
        handle = await bridge.client.delegate(label, request, context=context)
        assert handle.task is not None
        for warning in handle.task.warnings:
            await ctx.warning(warning)
        if _wait(wait_seconds) == 0:
            return view(handle.task)
        return await settled(handle, _wait(wait_seconds), finished_or_asked, ctx)

    @server.tool(
        description=(
            "The current state of a task you can see: status, result, error, the output "
            "streamed so far, and any question asked back."
        )
    )
    @tool_errors
    async def get_task(id: Annotated[str, Field(description="The task id")]) -> TaskView:
        return await current(id)

    @server.tool(
        description=(
            "Wait (up to timeout_seconds, max 45) until a task needs you: for a task you "
            "delegated, until it finishes or its delegate asks a question (answer it with "
            "answer_task); for a task you claimed and asked about, until the answer arrives. "
            "Returns the task as it is then; if still running, call it again."
        )
    )
    @tool_errors
    async def wait_for_task(
        id: Annotated[str, Field(description="The task id")],
        timeout_seconds: Annotated[float, Field(description="How long to wait (0 to 45)")] = 30,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> TaskView:
        handle = bridge.client.get_handle(id)
        task = await bridge.client.get_task(id)
        claimant = id in bridge.jobs
        if task.status.terminal or (task.status is TaskStatus.INPUT_REQUIRED and not claimant):
            return view(task)
        version = task.version

        def needs_attention(event: TaskEvent) -> bool:
            if event.task.version <= version:
                return False
            if claimant:
                return event.task.status.terminal or event.type is EventType.INPUT_PROVIDED
            return finished_or_asked(event)

        return await settled(handle, _wait(timeout_seconds), needs_attention, ctx)

    @server.tool(
        description=(
            "Tasks in your view: those you created, those for your labels, those you claimed. "
            "Filter by status (pending, claimed, input_required, done, failed, canceled) and label."
        )
    )
    @tool_errors
    async def list_my_tasks(
        status: Annotated[str | None, Field(description="Only tasks in this state")] = None,
        label: Annotated[str | None, Field(description="Only tasks with this label")] = None,
    ) -> TaskList:
        try:
            statuses = [TaskStatus(status)] if status else []
        except ValueError:
            raise ToolError(
                f"status {status!r} is unknown; use one of "
                + ", ".join(s.value for s in TaskStatus)
            ) from None
        page = await bridge.client.list_tasks(
            labels=[label] if label else [], statuses=statuses, page_size=200
        )
        return TaskList(tasks=[view(t) for t in page.tasks])

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
            "Take the oldest task waiting for your labels (or the given ones) and start on it. "
            "With wait_seconds (max 45), waits for one to arrive. Returns claimed=false if none. "
            "This session keeps the claim alive until you complete_task or fail_task."
        )
    )
    @tool_errors
    async def claim_task(
        labels: Annotated[
            list[str] | None, Field(description="Claim from these labels; default: all yours")
        ] = None,
        wait_seconds: Annotated[float, Field(description="Wait this long for a task")] = 0,
    ) -> Claim:
        wait = _wait(wait_seconds)
        job = await bridge.client.claim(labels or (), lease=BRIDGE_LEASE, wait=wait or None)
        if job is None:
            return Claim(claimed=False, task=None)
        job._start_heartbeats(BRIDGE_LEASE)
        bridge.jobs[job.id] = job
        return Claim(claimed=True, task=view(job.task))

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
            "up to wait_seconds (max 45) for the answer. If it has not come, call wait_for_task "
            "later; the task waits for the answer meanwhile."
        )
    )
    @tool_errors
    async def ask_creator(
        id: Annotated[str, Field(description="The id of a task you claimed")],
        question: Annotated[str, Field(description="The question, self-contained")],
        wait_seconds: Annotated[float, Field(description="Wait this long (0 to 45)")] = 30,
    ) -> Asked:
        job = bridge.job(id)
        try:
            answer = await job.ask(question, timeout=_wait(wait_seconds) or 0.001)
        except TimeoutError:
            return Asked(answered=False, answer="", task=await current(id))
        return Asked(answered=True, answer=answer, task=await current(id))

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
            "sees only your final result; you get the child's with wait_for_task."
        )
    )
    @tool_errors
    async def create_child_task(
        parent_id: Annotated[str, Field(description="The id of the task you claimed")],
        label: Annotated[str, Field(description="Who should do it, e.g. '@specialist'")],
        request: Annotated[str, Field(description="What to do, self-contained")],
        context: Annotated[dict[str, Any] | None, Field(description="Structured input")] = None,
    ) -> TaskView:
        handle = await bridge.client.delegate(label, request, context=context, parent_id=parent_id)
        assert handle.task is not None
        return view(handle.task)

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
        api_key = read_agent_key(agent)
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
    build_server(address=address, api_key=api_key).run()
    return 0
