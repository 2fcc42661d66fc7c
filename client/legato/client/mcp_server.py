"""A small MCP server over stdio: the handshake, tools, progress, logs, cancellation.

`legato mcp` is started by an MCP client that waits for the answer to
`initialize` before it shows any tool. The MCP SDK's server costs 0.6-0.7 s
to import on a quiet machine (it builds the pydantic models of every
protocol revision at import time), most of the bridge's start-up; the part
of the protocol a tools-only server speaks is small, so it is written here
and the bridge starts in a fraction of that. `make bench-mcp` measures it.

What it speaks (MCP revisions 2024-11-05 to 2025-11-25, newline-delimited
JSON-RPC 2.0 on stdin/stdout): `initialize` (answering the client's revision
when it is one of those, else the newest), `ping`, `tools/list`,
`tools/call` (arguments validated against the tool's signature; the result
as `structuredContent` and as JSON text; `ToolError` and bad arguments come
back as `isError` results the model reads), `logging/setLevel`,
`notifications/cancelled` (cancels the running call, which then gets no
answer), and progress notifications for calls that carry a progress token.
Anything else is answered with JSON-RPC's method-not-found. Calls run
concurrently: a long wait does not hold up the next call.

The SDK stays the reference: the tests drive this server with the SDK's
client, in memory and over stdio.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

log = logging.getLogger("legato.mcp")

# Revisions reachable through the `initialize` handshake, oldest first.
PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_PROTOCOL_VERSION = PROTOCOL_VERSIONS[-1]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# RFC 5424 severities, as MCP's logging names them.
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[bytes | None]]
Send = Callable[[bytes], Awaitable[None]]
ToolFunction = Callable[..., Awaitable[BaseModel]]
F = TypeVar("F", bound=ToolFunction)


class ToolError(Exception):
    """A tool's failure, shown to the model as the call's result (`isError`)."""


class Context:
    """What a running tool call may send back besides its result."""

    def __init__(self, server: Server, progress_token: str | int | None):
        self._server = server
        self._progress_token = progress_token

    async def report_progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        """A progress notification, when the caller asked for them (a progress token)."""
        if self._progress_token is None:
            return
        params: Message = {"progressToken": self._progress_token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await self._server.notify("notifications/progress", params)

    async def log(self, level: str, message: str) -> None:
        """A log message to the client (`notifications/message`)."""
        await self._server.log(level, message)

    async def warning(self, message: str) -> None:
        await self.log("warning", message)

    async def info(self, message: str) -> None:
        await self.log("info", message)


@dataclass(frozen=True)
class Tool:
    """A tool: its function, the model of its arguments and the model of its result."""

    name: str
    description: str
    function: ToolFunction
    arguments: type[BaseModel]
    result: type[BaseModel]
    context_parameter: str | None

    @classmethod
    def of(cls, function: ToolFunction, description: str) -> Tool:
        """The tool of `function`, read from its signature (parameters `Annotated` with
        pydantic `Field`s; a parameter typed `Context` receives the call's context)."""
        hints = typing.get_type_hints(function, include_extras=True)
        result = hints.pop("return")
        if not (isinstance(result, type) and issubclass(result, BaseModel)):
            raise TypeError(f"tool {function.__name__} must return a pydantic model")
        context_parameter = None
        fields: dict[str, Any] = {}
        for name, parameter in inspect.signature(function).parameters.items():
            if hints[name] is Context:
                context_parameter = name
                continue
            default = ... if parameter.default is inspect.Parameter.empty else parameter.default
            fields[name] = (hints[name], default)
        arguments = create_model(
            f"{function.__name__}Arguments",
            __config__=ConfigDict(extra="forbid"),
            **fields,
        )
        return cls(function.__name__, description, function, arguments, result, context_parameter)

    def definition(self) -> Message:
        """The tool as `tools/list` shows it."""
        return {
            "name": self.name,
            "description": self.description,
            "inputSchema": self.arguments.model_json_schema(),
            "outputSchema": self.result.model_json_schema(mode="serialization"),
        }

    def explain(self, error: ValidationError) -> str:
        """A validation error in the words of this tool's parameters."""
        parameters = ", ".join(self.arguments.model_fields)
        problems = []
        for problem in error.errors(include_url=False):
            where = ".".join(str(part) for part in problem["loc"]) or "arguments"
            if problem["type"] == "extra_forbidden":
                problems.append(
                    f"{where} is not a parameter of {self.name}; its parameters are {parameters}"
                )
            else:
                problems.append(f"{where}: {problem['msg']}")
        return "; ".join(problems)


class Server:
    """An MCP server of tools; `run()` serves it on stdin/stdout."""

    def __init__(
        self,
        name: str,
        *,
        version: str,
        instructions: str = "",
        on_close: Callable[[], Awaitable[None]] | None = None,
    ):
        self.name = name
        self.version = version
        self.instructions = instructions
        self.tools: dict[str, Tool] = {}
        self._tool_definitions: list[Message] | None = None
        self._on_close = on_close
        self._send: Send | None = None
        self._calls: dict[str | int, asyncio.Task[None]] = {}
        self._log_level = 0

    def tool(self, *, description: str) -> Callable[[F], F]:
        """Registers an async function as a tool named after it."""

        def register(function: F) -> F:
            tool = Tool.of(function, description)
            self.tools[tool.name] = tool
            self._tool_definitions = None
            return function

        return register

    # -- sending -----------------------------------------------------------------

    async def _write(self, message: Message) -> None:
        if self._send is None:
            return
        line = json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            await self._send(line.encode())
        except (OSError, EOFError):
            log.debug("the client went away before %s", message.get("method") or "an answer")

    async def notify(self, method: str, params: Message) -> None:
        """Sends a notification to the client."""
        await self._write({"jsonrpc": "2.0", "method": method, "params": params})

    async def log(self, level: str, message: str) -> None:
        """Sends a log message, if the client's `logging/setLevel` lets it through."""
        if LOG_LEVELS.index(level) >= self._log_level:
            await self.notify(
                "notifications/message", {"level": level, "logger": self.name, "data": message}
            )

    async def _answer(self, request_id: str | int, result: Message) -> None:
        await self._write({"jsonrpc": "2.0", "id": request_id, "result": result})

    async def _refuse(self, request_id: str | int | None, code: int, message: str) -> None:
        await self._write(
            {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
        )

    # -- receiving ---------------------------------------------------------------

    async def serve(self, receive: Receive, send: Send) -> None:
        """Serves messages from `receive` until it returns None (the client closed),
        then cancels the calls still running and runs `on_close`."""
        self._send = send
        try:
            while (line := await receive()) is not None:
                if line.strip():
                    await self._dispatch(line)
        finally:
            calls = list(self._calls.values())
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            if self._on_close is not None:
                await self._on_close()
            self._send = None

    async def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError as exc:
            await self._refuse(None, PARSE_ERROR, f"not JSON: {exc}")
            return
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            # JSON-RPC batches left MCP in 2025-06-18; none of the revisions' clients send them.
            await self._refuse(None, INVALID_REQUEST, "expected one JSON-RPC 2.0 message")
            return
        method = message.get("method")
        request_id = message.get("id")
        params = message.get("params") or {}
        if not isinstance(method, str):
            return  # a response: this server sends no requests, so it expects none
        if request_id is not None and not isinstance(request_id, str | int):
            await self._refuse(None, INVALID_REQUEST, "id must be a string or a number")
            return
        if not isinstance(params, dict):
            if request_id is not None:
                await self._refuse(request_id, INVALID_PARAMS, "params must be an object")
            return
        if request_id is None:
            self._notified(method, params)
            return
        call = asyncio.create_task(self._request(request_id, method, params))
        self._calls[request_id] = call

        def forget(done: asyncio.Task[None]) -> None:
            if self._calls.get(request_id) is done:  # not a later call reusing the id
                del self._calls[request_id]

        call.add_done_callback(forget)

    def _notified(self, method: str, params: Message) -> None:
        if method == "notifications/cancelled":
            request_id = params.get("requestId")
            call = self._calls.get(request_id) if isinstance(request_id, str | int) else None
            if call is not None:
                call.cancel()
        # notifications/initialized and the rest need nothing from a tools-only server.

    async def _request(self, request_id: str | int, method: str, params: Message) -> None:
        try:
            if method == "initialize":
                await self._answer(request_id, self._initialize(params))
            elif method == "ping":
                await self._answer(request_id, {})
            elif method == "tools/list":
                await self._answer(request_id, {"tools": self._definitions()})
            elif method == "tools/call":
                await self._call_tool(request_id, params)
            elif method == "logging/setLevel":
                level = params.get("level")
                if level not in LOG_LEVELS:
                    await self._refuse(
                        request_id, INVALID_PARAMS, f"level must be one of {', '.join(LOG_LEVELS)}"
                    )
                    return
                self._log_level = LOG_LEVELS.index(level)
                await self._answer(request_id, {})
            else:
                await self._refuse(request_id, METHOD_NOT_FOUND, f"method {method!r} not found")
        except asyncio.CancelledError:
            raise  # cancelled by the client, or the server is closing: no answer
        except Exception:
            log.exception("%s failed", method)
            await self._refuse(request_id, INTERNAL_ERROR, f"{method} failed; see the bridge's log")

    def _definitions(self) -> list[Message]:
        if self._tool_definitions is None:  # built once: their JSON schemas take a while
            self._tool_definitions = [tool.definition() for tool in self.tools.values()]
        return self._tool_definitions

    def _initialize(self, params: Message) -> Message:
        asked = params.get("protocolVersion")
        version = asked if asked in PROTOCOL_VERSIONS else LATEST_PROTOCOL_VERSION
        result: Message = {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}, "logging": {}},
            "serverInfo": {"name": self.name, "version": self.version},
        }
        if self.instructions:
            result["instructions"] = self.instructions
        return result

    async def _call_tool(self, request_id: str | int, params: Message) -> None:
        tool = self.tools.get(params.get("name"))  # type: ignore[arg-type]
        if tool is None:
            await self._refuse(
                request_id,
                INVALID_PARAMS,
                f"unknown tool {params.get('name')!r}; the tools are {', '.join(self.tools)}",
            )
            return
        meta = params.get("_meta") or {}
        try:
            arguments = tool.arguments.model_validate(params.get("arguments") or {})
        except ValidationError as exc:
            await self._answer(request_id, _error_result(tool.explain(exc)))
            return
        kwargs = {name: getattr(arguments, name) for name in type(arguments).model_fields}
        if tool.context_parameter is not None:
            kwargs[tool.context_parameter] = Context(self, meta.get("progressToken"))
        try:
            output = await tool.function(**kwargs)
        except ToolError as exc:
            await self._answer(request_id, _error_result(str(exc)))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("tool %s failed", tool.name)
            await self._answer(
                request_id,
                _error_result(f"{tool.name} failed inside the bridge ({type(exc).__name__})"),
            )
            return
        structured = output.model_dump(mode="json", exclude_none=True)
        text = json.dumps(structured, ensure_ascii=False)
        await self._answer(
            request_id,
            {
                "content": [{"type": "text", "text": text}],
                "structuredContent": structured,
                "isError": False,
            },
        )

    # -- stdio ---------------------------------------------------------------------

    def run(self) -> None:
        """Serves on stdin/stdout until stdin closes or SIGTERM/SIGINT comes.

        stdout carries only protocol messages: the protocol writes to a private
        copy of it, and fd 1 is pointed at stderr, so a stray print anywhere in
        the process lands in the log instead of corrupting the stream.
        """
        sys.stdout.flush()
        protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        asyncio.run(self._serve_stdio(sys.stdin.fileno(), protocol))

    async def _serve_stdio(self, stdin: int, protocol: typing.BinaryIO) -> None:
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()

        def read() -> None:
            # A daemon thread, not the loop's executor: a read blocked on a silent
            # client must not hold up the process's exit. Raw reads, not sys.stdin:
            # a daemon thread inside a buffered read at exit aborts the interpreter.
            pending = b""
            try:
                while chunk := os.read(stdin, 65536):
                    *complete, pending = (pending + chunk).split(b"\n")
                    for line in complete:
                        loop.call_soon_threadsafe(lines.put_nowait, line)
            except OSError:
                pass
            with contextlib.suppress(RuntimeError):  # the loop closed first
                if pending:
                    loop.call_soon_threadsafe(lines.put_nowait, pending)
                loop.call_soon_threadsafe(lines.put_nowait, None)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lines.put_nowait, None)
        threading.Thread(target=read, name="mcp-stdin", daemon=True).start()
        # One writer thread keeps messages in order and a full pipe off the loop.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcp-stdout")

        def write(data: bytes) -> None:
            protocol.write(data)
            protocol.flush()

        async def send(data: bytes) -> None:
            await loop.run_in_executor(writer, write, data)

        try:
            await self.serve(lines.get, send)
        finally:
            writer.shutdown(wait=True)
            with contextlib.suppress(OSError):
                protocol.close()


def _error_result(message: str) -> Message:
    return {"content": [{"type": "text", "text": message}], "isError": True}
