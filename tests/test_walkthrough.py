"""What a new user walking through the README ran into: the CLI, onboarding and the bridge.

Each test runs the real `legato` command as a user with a private runtime dir
and data dir of their own (the `user` fixture of `test_self_start`), and stops
whatever daemon it started, by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from mcp import Client, StdioServerParameters
from test_self_start import GUARD, User, user  # noqa: F401  (`user` is a fixture)


def _processes_with(marker: str) -> list[int]:
    """The pids of processes whose environment holds `marker` (this test's own dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


async def test_an_abbreviated_detach_starts_one_daemon(user: User) -> None:
    """Before, the child saw `--deta` (argparse takes abbreviations), detached again,
    and so on without end; the first `legato serve` never heard SERVING."""
    served = await asyncio.wait_for(user.legato("serve", "--deta"), 20)
    assert served.code == 0, served.stderr
    pid = user.daemon_pid()
    assert pid is not None and f"pid {pid}" in served.stdout
    assert _processes_with(f"LEGATO_DATA_DIR={user.data_dir}\0") == [pid]


async def test_work_acts_as_an_agent_and_never_hands_the_admin_key_on(user: User) -> None:
    """Before, `legato work` with no --as fell back to the admin key and exported it
    to the command, as LEGATO_AGENT_KEY."""
    refused = await user.legato("work", "@reviewer", "--once", "--", "env")
    assert refused.code == 1
    assert "--as NAME" in refused.stderr and "admin" in refused.stderr
    assert (await user.legato("agent", "add", "reviewer")).code == 0
    reviewer_key = (user.data_dir / "keys" / "reviewer.key").read_text().strip()
    admin_key = (user.data_dir / "admin.key").read_text().strip()
    for acting, key_seen in ((("--as", "reviewer"), reviewer_key), (("--key", admin_key), None)):
        created = await user.legato("task", "create", "review this", "-l", "@reviewer")
        assert created.code == 0, created.stderr
        worked = await user.legato("work", "@reviewer", *acting, "--once", "--", "env")
        assert worked.code == 0, worked.stderr
        task = json.loads((await user.legato("task", "get", created.stdout.strip(), "--json")).stdout)
        seen = [line for line in task["result"]["output"].splitlines()
                if line.startswith("LEGATO_AGENT_KEY=")]  # fmt: skip
        assert seen == ([f"LEGATO_AGENT_KEY={key_seen}"] if key_seen else []), acting
        assert admin_key not in task["result"]["output"]


async def test_rotating_the_admins_own_key_keeps_the_cli_working(user: User) -> None:
    """Before, the new key went to keys/admin.key while every command kept reading the
    old one from admin.key: `legato agent list` was refused, `doctor` failed."""
    assert (await user.legato("agent", "list")).code == 0
    old_key = (user.data_dir / "admin.key").read_text().strip()
    rotated = await user.legato("agent", "rotate")
    assert rotated.code == 0, rotated.stderr
    new_key = (user.data_dir / "admin.key").read_text().strip()
    assert new_key != old_key and new_key in rotated.stdout
    assert oct((user.data_dir / "admin.key").stat().st_mode & 0o777) == "0o600"
    listed = await user.legato("agent", "list")
    assert listed.code == 0, listed.stderr
    doctor = await user.legato("doctor")
    assert "FAIL" not in doctor.stdout, doctor.stdout


async def test_mcp_config_as_an_agent_keeps_that_agents_own_key(user: User) -> None:
    """Before, `mcp config --as coder` with LEGATO_AGENT_KEY set to researcher's key
    named the file after coder and wrote researcher's key in it."""
    for name in ("coder", "researcher"):
        assert (await user.legato("agent", "add", name)).code == 0
    keys = user.data_dir / "keys"
    coder_key = (keys / "coder.key").read_text().strip()
    researcher_key = (keys / "researcher.key").read_text().strip()
    ran = await user.legato(
        "mcp", "config", "--client", "claude", "--as", "coder",
        env={"LEGATO_AGENT_KEY": researcher_key},
    )  # fmt: skip
    assert ran.code == 0, ran.stderr
    assert json.loads(ran.stdout)["mcpServers"]["legato"]["args"] == ["mcp", "--agent", "coder"]
    assert (keys / "coder.key").read_text().strip() == coder_key
    assert (keys / "researcher.key").read_text().strip() == researcher_key


async def test_a_bridge_without_the_users_runtime_dir_starts_the_daemon(user: User) -> None:
    """Before, the snippet held the socket's address under XDG_RUNTIME_DIR; a bridge
    whose MCP client passed no XDG_RUNTIME_DIR took it for somebody's deployment
    and never started the daemon: every tool said it was unreachable."""
    made = await user.legato("mcp", "config", "--client", "claude", "--agent", "coder")
    assert made.code == 0, made.stderr
    entry = json.loads(made.stdout)["mcpServers"]["legato"]
    assert "LEGATO_ADDRESS" not in entry["env"]
    assert (await user.legato("stop")).code == 0
    assert user.daemon_pid() is None
    # What an MCP client with a bare environment runs: the snippet, PATH, nothing else.
    bare = StdioServerParameters(
        command=entry["command"], args=entry["args"], env={"PATH": os.environ["PATH"], **entry["env"]}
    )
    async with Client(bare) as coder:
        listed = await asyncio.wait_for(coder.call_tool("list_my_tasks", {}), GUARD)
        assert not listed.is_error, listed.content
    assert user.daemon_pid() is not None
