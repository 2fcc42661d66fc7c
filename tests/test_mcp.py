"""The MCP bridge: every tool through the SDK's client against a real daemon,
one end-to-end run of `legato mcp` over stdio, and bad inputs that must come
back as tool errors, never as a crash of the bridge.

The bridge speaks MCP with its own small server (`legato.client.mcp_server`);
the SDK's client is the reference it is held to: in memory (`mcp_harness`)
and over stdio in the end-to-end test."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from legato.client import AsyncClient
from legato.client.mcp_bridge import build_server
from legato.server.daemon import Daemon
from mcp import Client, StdioServerParameters
from mcp_harness import mcp_client

GUARD = 20.0

Bridge = Callable[[str], Awaitable[Client]]


@pytest.fixture
def bridge(daemon: Daemon, agent_key: Callable[..., Awaitable[str]]) -> Bridge:
    """`async with await bridge("coder") as coder`: an MCP client of a bridge acting as a
    new agent `coder`. Entered in the test itself: the SDK's task groups must be left
    in the task that entered them."""

    async def open_bridge(name: str) -> Client:
        key = await agent_key(name)
        return mcp_client(build_server(address=daemon.config.address, api_key=key))

    return open_bridge


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Calls a tool that must succeed; its structured result."""
    result = await asyncio.wait_for(client.call_tool(tool, arguments), GUARD)
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    """Calls a tool that must fail; the message the model reads."""
    result = await asyncio.wait_for(client.call_tool(tool, arguments), GUARD)
    assert result.is_error, result.structured_content
    text = result.content[0].text  # type: ignore[union-attr]
    assert isinstance(text, str)
    return text


async def test_coder_delegates_and_researcher_answers_through_mcp(bridge: Bridge) -> None:
    async with await bridge("coder") as coder, await bridge("researcher") as researcher:
        await delegation_with_a_question(coder, researcher)


async def delegation_with_a_question(coder: Client, researcher: Client) -> None:
    tools = {t.name for t in (await coder.list_tools()).tools}
    assert tools == {
        "delegate_task", "get_task", "wait_for_task", "list_my_tasks", "cancel_task",
        "answer_task", "claim_task", "append_output", "ask_creator", "complete_task",
        "fail_task", "create_child_task",
    }  # fmt: skip

    task = await call(
        coder, "delegate_task", label="@researcher", request="Tier 1 RPM?", context={"api": "x"}
    )
    assert task["status"] == "pending"

    claim = await call(researcher, "claim_task")
    assert claim["claimed"] is True
    assert claim["task"]["id"] == task["id"]
    assert claim["task"]["context"] == {"api": "x"}
    assert (await call(researcher, "append_output", id=task["id"], text="reading docs; "))[
        "output_size"
    ] == len("reading docs; ")

    # The researcher asks back; the coder's wait returns with the question.
    asking = asyncio.create_task(
        call(researcher, "ask_creator", id=task["id"], question="Tier 1 or 2?", wait_seconds=20)
    )
    waited = await call(coder, "wait_for_task", id=task["id"], timeout_seconds=20)
    assert waited["status"] == "input_required"
    assert waited["question"] == "Tier 1 or 2?"
    await call(coder, "answer_task", id=task["id"], answer="Tier 1")
    asked = await asking
    assert asked["answered"] is True
    assert asked["answer"] == "Tier 1"

    await call(researcher, "complete_task", id=task["id"], result={"rpm": 500, "source": "docs"})
    done = await call(coder, "wait_for_task", id=task["id"], timeout_seconds=20)
    assert done["status"] == "done"
    assert done["result"] == {"rpm": 500, "source": "docs"}
    assert done["output"] == "reading docs; "
    assert (await call(coder, "get_task", id=task["id"]))["result"] == {
        "rpm": 500,
        "source": "docs",
    }


async def test_delegate_waits_for_the_result_and_relays_output_as_progress(
    bridge: Bridge,
) -> None:
    async with await bridge("coder") as coder, await bridge("researcher") as researcher:
        await delegation_followed_through_progress(coder, researcher)


async def delegation_followed_through_progress(coder: Client, researcher: Client) -> None:
    relayed: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        relayed.append(message or "")

    delegating = asyncio.create_task(
        coder.call_tool(
            "delegate_task",
            {"label": "@researcher", "request": "summarise", "wait_seconds": 30},
            progress_callback=on_progress,
        )
    )
    claim = await call(researcher, "claim_task", wait_seconds=20)
    task_id = claim["task"]["id"]
    for piece in ("first part, ", "second part"):
        await call(researcher, "append_output", id=task_id, text=piece)
    await call(researcher, "complete_task", id=task_id, result={"summary": "done"})

    result = await asyncio.wait_for(delegating, GUARD)
    assert not result.is_error
    assert isinstance(result.structured_content, dict)
    assert result.structured_content["status"] == "done"
    assert result.structured_content["result"] == {"summary": "done"}
    assert relayed == ["first part, ", "second part"]


async def test_delegate_can_delegate_further_and_creator_sees_only_its_task(
    bridge: Bridge,
) -> None:
    async with (
        await bridge("coder") as coder,
        await bridge("researcher") as researcher,
        await bridge("specialist") as specialist,
    ):
        await delegation_under_a_claim(coder, researcher, specialist)


async def delegation_under_a_claim(coder: Client, researcher: Client, specialist: Client) -> None:
    root = await call(coder, "delegate_task", label="@researcher", request="big question")
    await call(researcher, "claim_task")
    child = await call(
        researcher, "create_child_task", parent_id=root["id"], label="@specialist", request="part"
    )
    assert child["parent_id"] == root["id"]

    claim = await call(specialist, "claim_task")
    assert claim["task"]["id"] == child["id"]
    await call(specialist, "fail_task", id=child["id"], error="no data for that")
    failed = await call(researcher, "wait_for_task", id=child["id"], timeout_seconds=10)
    assert failed["status"] == "failed"
    assert failed["error"] == "no data for that"

    mine = await call(coder, "list_my_tasks")
    assert [t["id"] for t in mine["tasks"]] == [root["id"]]
    assert "not found" in await refused(coder, "get_task", id=child["id"])
    assert [
        t["id"] for t in (await call(researcher, "list_my_tasks", status="failed"))["tasks"]
    ] == [child["id"]]

    canceled = await call(coder, "cancel_task", id=root["id"], reason="no longer needed")
    assert canceled["status"] == "canceled"


async def test_bad_inputs_are_tool_errors_the_model_can_act_on(bridge: Bridge) -> None:
    async with await bridge("coder") as coder, await bridge("researcher") as researcher:
        await bad_inputs(coder, researcher)


async def bad_inputs(coder: Client, researcher: Client) -> None:
    assert "not found" in await refused(coder, "get_task", id="t_no-such-task")
    assert "is not a label" in await refused(
        coder, "delegate_task", label="researcher", request="x"
    )
    assert "required" in await refused(coder, "delegate_task", label="@researcher", request="")
    assert "unknown" in await refused(coder, "list_my_tasks", status="finished")
    task = await call(coder, "delegate_task", label="@researcher", request="x")
    assert "claim it with claim_task first" in await refused(
        coder, "complete_task", id=task["id"], result={}
    )
    assert "INPUT_REQUIRED" in await refused(coder, "answer_task", id=task["id"], answer="?")
    assert "does not hold @coder" in await refused(researcher, "claim_task", labels=["@coder"])
    assert (await call(researcher, "claim_task", labels=["@researcher"]))["claimed"] is True
    assert (await call(researcher, "claim_task", wait_seconds=0.2))["claimed"] is False


async def test_a_stopped_daemon_and_a_revoked_key_give_useful_tool_errors(
    daemon: Daemon, admin: AsyncClient, agent_key: Callable[..., Awaitable[str]], short_tmp: Path
) -> None:
    key = await agent_key("coder")
    nowhere = f"unix:{short_tmp}/nothing.sock"
    async with mcp_client(build_server(address=nowhere, api_key=key)) as down:
        message = await refused(down, "list_my_tasks")
        assert "not reachable" in message
        assert "legato serve" in message
    async with mcp_client(build_server(address=daemon.config.address, api_key=key)) as coder:
        await call(coder, "list_my_tasks")
        await admin.revoke_agent("coder")
        message = await refused(coder, "list_my_tasks")
        assert "refused this agent's key" in message
        # The bridge keeps serving: the next call is answered, not crashed.
        assert "refused this agent's key" in await refused(coder, "get_task", id="t_x")
    async with mcp_client(build_server(address=daemon.config.address, api_key="")) as unset:
        unconfigured = await refused(unset, "list_my_tasks")
        assert "LEGATO_AGENT_KEY" in unconfigured and "legato mcp --agent NAME" in unconfigured


async def test_legato_mcp_over_stdio_carries_only_protocol_on_stdout(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]], short_tmp: Path
) -> None:
    """Both sides of the seed flow through real `legato mcp` subprocesses."""
    legato = Path(sys.executable).with_name("legato")
    stdout_copies = {name: short_tmp / f"{name}.stdout" for name in ("coder", "researcher")}

    def server(name: str, key: str) -> StdioServerParameters:
        # A tee keeps a copy of everything the bridge wrote to stdout.
        command = (
            f"exec {shlex.quote(str(legato))} mcp | tee {shlex.quote(str(stdout_copies[name]))}"
        )
        return StdioServerParameters(
            command="sh",
            args=["-c", command],
            env={
                "PATH": os.environ["PATH"],
                "LEGATO_AGENT_KEY": key,
                "LEGATO_ADDRESS": daemon.config.address,
            },
        )

    coder_key, researcher_key = await agent_key("coder"), await agent_key("researcher")
    async with (
        Client(server("coder", coder_key)) as coder,
        Client(server("researcher", researcher_key)) as researcher,
    ):
        task = await call(coder, "delegate_task", label="@researcher", request="RPM for Tier 1?")
        claim = await call(researcher, "claim_task", wait_seconds=10)
        assert claim["task"]["id"] == task["id"]
        await call(researcher, "append_output", id=task["id"], text="checking the docs")
        await call(researcher, "complete_task", id=task["id"], result={"rpm": 500})
        done = await call(coder, "wait_for_task", id=task["id"], timeout_seconds=20)
        assert done["status"] == "done"
        assert done["result"] == {"rpm": 500}
        assert done["output"] == "checking the docs"

    for path in stdout_copies.values():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        assert lines, f"{path.name} is empty"
        for line in lines:
            message = json.loads(line)  # anything that is not JSON fails here
            assert message.get("jsonrpc") == "2.0", line


async def run_cli(daemon: Daemon, *args: str) -> tuple[int, str, str]:
    """The real `legato` CLI as the admin of the test daemon (awaited, so the daemon serves)."""
    env = {
        **os.environ,
        "LEGATO_ADDRESS": daemon.config.address,
        "LEGATO_DATA_DIR": str(daemon.config.data_dir),
    }
    env.pop("LEGATO_AGENT_KEY", None)
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("legato")),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), GUARD)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_mcp_config_prints_working_snippets_for_each_client(daemon: Daemon) -> None:
    code, out, err = await run_cli(daemon, "mcp", "config", "--client", "codex", "--agent", "coder")
    assert code == 0, err
    table = tomllib.loads(out)["mcp_servers"]["legato"]
    assert Path(table["command"]).is_absolute()
    assert Path(table["command"]).exists()
    assert table["args"] == ["mcp", "--agent", "coder"]
    assert table["env"]["LEGATO_ADDRESS"] == daemon.config.address
    assert "LEGATO_AGENT_KEY" not in table["env"]  # the bridge reads the key file
    key_file = Path(table["env"]["LEGATO_DATA_DIR"]) / "keys" / "coder.key"
    key = key_file.read_text().strip()
    async with AsyncClient(daemon.config.address, api_key=key) as c:
        me = await c.whoami()
        assert (me.name, me.labels) == ("coder", ("@coder",))

    # Asking again keeps the key: nothing the first snippet started stops working.
    code, out, err = await run_cli(
        daemon, "mcp", "config", "--client", "claude", "--agent", "coder"
    )
    assert code == 0, err
    assert "keeps its key" in err
    entry = json.loads(out)["mcpServers"]["legato"]
    assert entry["type"] == "stdio"
    assert entry["args"] == ["mcp", "--agent", "coder"]
    assert key_file.read_text().strip() == key
    async with AsyncClient(daemon.config.address, api_key=key) as c:
        assert (await c.whoami()).name == "coder"

    code, out, err = await run_cli(
        daemon, "agent", "add", "researcher", "-l", "@researcher", "--mcp", "cursor"
    )
    assert code == 0, err
    snippet = json.loads(out[out.index("{") :])
    assert "type" not in snippet["mcpServers"]["legato"]
    assert snippet["mcpServers"]["legato"]["args"] == ["mcp", "--agent", "researcher"]

    code, _, err = await run_cli(daemon, "mcp", "config", "--client", "codex")
    assert code == 1
    assert "--agent NAME" in err


# -- what the model reads ------------------------------------------------------------


async def test_a_label_nobody_holds_is_a_warning_in_the_result_the_model_reads(
    bridge: Bridge,
) -> None:
    async with await bridge("coder") as coder:
        task = await call(coder, "delegate_task", label="@nobody", request="anyone there?")
        assert task["status"] == "pending"
        assert any("@nobody" in warning for warning in task["warnings"]), task
        held = await call(coder, "delegate_task", label="@coder", request="to myself")
        assert "warnings" not in held, held
        await call(coder, "claim_task", labels=["@coder"])
        child = await call(
            coder, "create_child_task", parent_id=held["id"], label="@nobody", request="part"
        )
        assert any("@nobody" in warning for warning in child["warnings"]), child


async def test_status_filters_read_any_case(bridge: Bridge) -> None:
    async with await bridge("coder") as coder:
        task = await call(coder, "delegate_task", label="@coder", request="x")
        for spelling in ("PENDING", "Pending", " pending "):
            listed = await call(coder, "list_my_tasks", status=spelling)
            assert [t["id"] for t in listed["tasks"]] == [task["id"]], spelling
        assert (await call(coder, "list_my_tasks", status="DONE"))["tasks"] == []
        assert "input_required" in await refused(coder, "list_my_tasks", status="finished")


async def test_errors_name_the_tools_own_parameters(bridge: Bridge) -> None:
    async with await bridge("coder") as coder:
        message = await refused(coder, "delegate_task", label="@coder", request="  ")
        assert message.startswith("request is required"), message
        assert "content" not in message
        message = await refused(coder, "delegate_task", label="coder", request="x")
        assert message.startswith("label: 'coder' is not a label"), message
        message = await refused(
            coder, "create_child_task", parent_id="t_x", label="@coder", request=""
        )
        assert message.startswith("request is required"), message
        message = await refused(coder, "delegate_task", label="@coder")
        assert message.startswith("request:"), message
        assert "required" in message
        message = await refused(coder, "list_my_tasks", label="coder")
        assert message.startswith("label: 'coder' is not a label"), message


async def test_a_wait_longer_than_one_call_may_take_says_it_was_clamped(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]]
) -> None:
    key = await agent_key("coder")
    server = build_server(address=daemon.config.address, api_key=key, max_wait_seconds=0.2)
    async with mcp_client(server) as coder:
        claimed = await call(coder, "claim_task", wait_seconds=5)
        assert claimed["claimed"] is False
        assert any("5" in w and "0.2" in w for w in claimed["warnings"]), claimed
        task = await call(coder, "delegate_task", label="@coder", request="slow")
        waited = await call(coder, "wait_for_task", id=task["id"], timeout_seconds=30)
        assert waited["status"] == "pending"
        assert any("30" in w and "0.2" in w for w in waited["warnings"]), waited
        # A wait within the limit says nothing.
        quiet = await call(coder, "wait_for_task", id=task["id"], timeout_seconds=0.1)
        assert "warnings" not in quiet, quiet


async def test_results_are_compact_unless_the_full_task_is_asked_for(bridge: Bridge) -> None:
    async with await bridge("coder") as coder, await bridge("researcher") as researcher:
        context = {"files": ["a.py"] * 50}
        task = await call(
            coder, "delegate_task", label="@researcher", request="long " * 100, context=context
        )
        assert set(task) == {"id", "status"}, task
        claim = await call(researcher, "claim_task")
        assert claim["task"]["request"] == "long " * 100  # the claimant needs all of it
        assert claim["task"]["context"] == context
        done = await call(researcher, "complete_task", id=task["id"], result={"answer": 1})
        assert set(done) == {"id", "status", "result"}, done

        compact = await call(coder, "get_task", id=task["id"])
        assert set(compact) == {"id", "status", "result"}, compact
        full = await call(coder, "get_task", id=task["id"], full=True)
        assert full["request"] == "long " * 100
        assert full["context"] == context
        assert full["labels"] == ["@researcher"]
        assert full["claimed_by"] == "researcher"
        listed = (await call(coder, "list_my_tasks"))["tasks"]
        assert [set(t) for t in listed] == [{"id", "status", "request", "labels", "result"}]
        assert len(listed[0]["request"]) < 100  # a preview, not the whole request
        listed_full = (await call(coder, "list_my_tasks", full=True))["tasks"]
        assert listed_full[0]["context"] == context


async def test_the_output_shown_is_the_current_attempts_real_output(bridge: Bridge) -> None:
    async with await bridge("coder") as coder, await bridge("researcher") as researcher:
        task = await call(coder, "delegate_task", label="@researcher", request="x")
        await call(researcher, "claim_task")
        await call(researcher, "append_output", id=task["id"], text="first try")
        await call(researcher, "fail_task", id=task["id"], error="flaky", retryable=True)
        await call(researcher, "claim_task")
        await call(researcher, "append_output", id=task["id"], text="second")

        # Views built from a task without its text say how much there is, never "".
        listed = (await call(coder, "list_my_tasks", full=True))["tasks"]
        assert listed[0]["output_size"] == len("second")
        assert "output" not in listed[0], listed[0]
        done = await call(researcher, "complete_task", id=task["id"], result={"a": 1})
        assert "output" not in done, done

        for shown in (
            await call(coder, "get_task", id=task["id"]),
            await call(coder, "wait_for_task", id=task["id"], timeout_seconds=5),
        ):
            assert shown["output"] == "second", shown


def test_legato_mcp_starts_without_importing_the_mcp_sdk() -> None:
    """The SDK's import was most of the bridge's start (0.6-0.7 s): it is the tests'
    reference client, and a runtime dependency no more."""
    probe = (
        "import sys, legato.client.cli, legato.client.mcp_bridge as bridge\n"
        "bridge.build_server()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'mcp_types')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=GUARD
    )
    assert found.stdout.strip() == "[]", found.stdout


# -- the protocol, spoken raw to a real `legato mcp` ------------------------------------


class RawBridge:
    """`legato mcp` as a subprocess, spoken to in raw JSON-RPC lines."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.answers: dict[Any, dict[str, Any]] = {}

    @classmethod
    async def start(cls, env: dict[str, str]) -> RawBridge:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("legato")),
            "mcp",
            env={"PATH": os.environ["PATH"], **env},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def send(self, message: dict[str, Any] | str) -> None:
        assert self.process.stdin is not None
        line = message if isinstance(message, str) else json.dumps(message)
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def request(self, request_id: Any, method: str, **params: Any) -> dict[str, Any]:
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return await self.answer(request_id)

    async def answer(self, request_id: Any) -> dict[str, Any]:
        """The answer to `request_id`; answers to others that arrive first are kept."""
        assert self.process.stdout is not None
        while request_id not in self.answers:
            line = await asyncio.wait_for(self.process.stdout.readline(), GUARD)
            assert line, "legato mcp closed stdout"
            message = json.loads(line)
            assert message["jsonrpc"] == "2.0", message
            if "id" in message:
                self.answers[message["id"]] = message
        return self.answers.pop(request_id)

    async def close(self) -> tuple[int, str]:
        """Closes stdin (the client going away); the exit code and stderr."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        out, err = await asyncio.wait_for(self.process.communicate(), GUARD)
        for line in out.splitlines():  # what it still said before it ended
            message = json.loads(line)
            if "id" in message:
                self.answers[message["id"]] = message
        assert self.process.returncode is not None
        return self.process.returncode, err.decode()


async def test_the_handshake_and_json_rpc_errors_as_the_protocol_says(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]]
) -> None:
    env = {"LEGATO_AGENT_KEY": await agent_key("coder"), "LEGATO_ADDRESS": daemon.config.address}
    raw = await RawBridge.start(env)
    old = await raw.request(1, "initialize", protocolVersion="2024-11-05", capabilities={})
    assert old["result"]["protocolVersion"] == "2024-11-05"  # a revision it speaks: kept
    assert old["result"]["serverInfo"]["name"] == "legato"
    assert "tools" in old["result"]["capabilities"]
    unknown = await raw.request(2, "initialize", protocolVersion="1999-01-01", capabilities={})
    assert unknown["result"]["protocolVersion"] == "2025-11-25"  # else its newest
    await raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert (await raw.request("p", "ping"))["result"] == {}

    await raw.send("this is not json")
    assert (await raw.answer(None))["error"]["code"] == -32700
    await raw.send({"jsonrpc": "2.0", "id": [1], "method": "ping"})
    assert (await raw.answer(None))["error"]["code"] == -32600
    await raw.send({"jsonrpc": "2.0", "id": 6, "method": "ping", "params": [1]})
    assert (await raw.answer(6))["error"]["code"] == -32602
    assert (await raw.request(3, "resources/list"))["error"]["code"] == -32601
    no_tool = await raw.request(4, "tools/call", name="no_such_tool", arguments={})
    assert no_tool["error"]["code"] == -32602
    assert "delegate_task" in no_tool["error"]["message"]
    wrong = await raw.request(5, "tools/call", name="delegate_task", arguments={"content": "x"})
    assert wrong["result"]["isError"] is True
    assert "content is not a parameter of delegate_task" in wrong["result"]["content"][0]["text"]

    code, err = await raw.close()
    assert code == 0, err


async def test_calls_run_side_by_side_and_a_cancelled_call_gets_no_answer(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]], admin: AsyncClient
) -> None:
    env = {"LEGATO_AGENT_KEY": await agent_key("coder"), "LEGATO_ADDRESS": daemon.config.address}
    raw = await RawBridge.start(env)
    await raw.request(1, "initialize", protocolVersion="2025-11-25", capabilities={})
    await raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    created = await raw.request(
        2, "tools/call", name="delegate_task", arguments={"label": "@coder", "request": "x"}
    )
    task_id = created["result"]["structuredContent"]["id"]

    # A long wait is under way; other calls are answered meanwhile.
    wait = {"id": task_id, "timeout_seconds": 40}
    await raw.send(
        {
            "jsonrpc": "2.0",
            "id": "wait",
            "method": "tools/call",
            "params": {"name": "wait_for_task", "arguments": wait},
        }
    )
    got = await raw.request(3, "tools/call", name="get_task", arguments={"id": task_id})
    assert got["result"]["structuredContent"]["status"] == "pending"

    await raw.send(
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "wait"}}
    )
    assert (await raw.request(4, "ping"))["result"] == {}
    # What the wait waited for happens; a wait still running would answer now.
    await admin.cancel_task(task_id, "no longer needed")
    shown = await raw.request(5, "tools/call", name="get_task", arguments={"id": task_id})
    assert shown["result"]["structuredContent"]["status"] == "canceled"
    code, err = await raw.close()
    assert code == 0, err
    assert "wait" not in raw.answers


async def test_a_bridge_told_to_stop_hands_its_claims_back(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]], admin: AsyncClient
) -> None:
    """SIGTERM (what MCP clients send after closing stdin) ends the bridge the same way
    as a closed stdin: unfinished claims go back to pending, not after the lease."""
    coder_key, researcher_key = await agent_key("coder"), await agent_key("researcher")
    async with AsyncClient(daemon.config.address, api_key=coder_key) as coder:
        handle = await coder.delegate("@researcher", "x")
        raw = await RawBridge.start(
            {"LEGATO_AGENT_KEY": researcher_key, "LEGATO_ADDRESS": daemon.config.address}
        )
        await raw.request(1, "initialize", protocolVersion="2025-11-25", capabilities={})
        claim = await raw.request(2, "tools/call", name="claim_task", arguments={})
        assert claim["result"]["structuredContent"]["task"]["id"] == handle.id
        assert (await coder.get_task(handle.id)).status.value == "claimed"

        raw.process.terminate()
        assert await asyncio.wait_for(raw.process.wait(), GUARD) == 0
        task = await coder.get_task(handle.id)
        assert task.status.value == "pending"
        assert task.released == 1


async def test_handed_back_attempts_are_not_counted_and_leave_no_error_behind(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]], admin: AsyncClient
) -> None:
    """A bridge that ends hands its claim back: before, the next claimant read
    `"attempt": 5, "max_attempts": 3` and the last one's "the worker stopped..."
    as the task's error, on every view of it until it finished."""
    key = await agent_key("researcher")

    def bridge() -> Client:
        return mcp_client(build_server(address=daemon.config.address, api_key=key))

    handle = await admin.create_task("x", labels=["@researcher"], max_attempts=3)
    for _ in range(4):
        async with bridge() as researcher:
            claimed = await call(researcher, "claim_task")
            assert claimed["task"]["id"] == handle.id
        # Closed: the claim went back.
    async with bridge() as researcher:
        claimed = (await call(researcher, "claim_task"))["task"]
        assert (claimed["attempt"], claimed["max_attempts"]) == (1, 3)
        assert claimed.get("error") is None, claimed
        assert (await admin.get_task(handle.id)).error == ""  # the daemon's too
        shown = await call(researcher, "get_task", id=handle.id, full=True)
        assert (shown["status"], shown["attempt"], shown.get("error")) == ("claimed", 1, None)
        asked = await call(researcher, "ask_creator", id=handle.id, question="?", wait_seconds=0)
        assert asked["task"].get("error") is None
    task = await admin.get_task(handle.id)
    assert (task.attempt, task.released) == (6, 5)
