"""The MCP bridge: every tool through the SDK's client against a real daemon,
one end-to-end run of `legato mcp` over stdio, and bad inputs that must come
back as tool errors, never as a crash of the bridge."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
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

GUARD = 20.0

Bridge = Callable[[str], Awaitable[Client]]


@pytest.fixture
def bridge(daemon: Daemon, agent_key: Callable[..., Awaitable[str]]) -> Bridge:
    """`async with await bridge("coder") as coder`: an MCP client of a bridge acting as a
    new agent `coder`. Entered in the test itself: the SDK's task groups must be left
    in the task that entered them."""

    async def open_bridge(name: str) -> Client:
        key = await agent_key(name)
        return Client(build_server(address=daemon.config.address, api_key=key))

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
    async with Client(build_server(address=f"unix:{short_tmp}/nothing.sock", api_key=key)) as down:
        message = await refused(down, "list_my_tasks")
        assert "not reachable" in message
        assert "legato serve" in message
    async with Client(build_server(address=daemon.config.address, api_key=key)) as coder:
        await call(coder, "list_my_tasks")
        await admin.revoke_agent("coder")
        message = await refused(coder, "list_my_tasks")
        assert "refused this agent's key" in message
        # The bridge keeps serving: the next call is answered, not crashed.
        assert "refused this agent's key" in await refused(coder, "get_task", id="t_x")
    async with Client(build_server(address=daemon.config.address, api_key="")) as unset:
        assert "LEGATO_AGENT_KEY" in await refused(unset, "list_my_tasks")


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
