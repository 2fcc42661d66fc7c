"""The daemon starts itself, agents are onboarded with no key pasted, and the layers hold.

Every test here runs the real `legato` command as a user with a private
runtime dir (`XDG_RUNTIME_DIR`) and data dir of its own, so the "default
socket" is the test's own, and stops whatever daemon it started, by pid.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from legato.client import AsyncClient, UnauthenticatedError
from legato.client.local import lock_holder
from mcp import Client, StdioServerParameters

LEGATO = Path(sys.executable).with_name("legato")
ROOT = Path(__file__).resolve().parents[1]
GUARD = 60.0


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


@dataclass
class User:
    """A user of this machine with no daemon running yet."""

    home: Path

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEGATO_")}
        env.update(XDG_RUNTIME_DIR=str(self.home / "run"), LEGATO_DATA_DIR=str(self.data_dir))
        return env

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def address(self) -> str:
        return f"unix:{self.home / 'run' / 'legato' / 'legato.sock'}"

    async def legato(self, *args: str, env: dict[str, str] | None = None) -> Ran:
        process = await asyncio.create_subprocess_exec(
            str(LEGATO),
            *args,
            env={**self.env, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), GUARD)
        assert process.returncode is not None
        return Ran(process.returncode, out.decode(), err.decode())

    def daemon_pid(self) -> int | None:
        """The pid of the daemon holding the default socket's lock now, if any."""
        holder = lock_holder(self.address)
        return int(holder["pid"]) if holder and holder.get("pid") else None


@pytest.fixture
async def user(short_tmp: Path) -> AsyncIterator[User]:
    (short_tmp / "run").mkdir(mode=0o700)
    someone = User(short_tmp)
    yield someone
    pid = someone.daemon_pid()
    if pid is not None:
        await someone.legato("stop", "--timeout", "10")
        if someone.daemon_pid() == pid:  # only if `legato stop` failed
            os.kill(pid, signal.SIGKILL)


def test_the_client_imports_nothing_of_the_server() -> None:
    """With `legato.server` unimportable, the client library, its command line and the
    MCP bridge still load; the server's entry does not load the client's CLI."""
    blocked = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "legato.server" or name.startswith("legato.server."):
            raise ImportError(f"{name} is blocked")
        return None
sys.meta_path.insert(0, Block())
import legato.client, legato.client.cli, legato.client.mcp_bridge, legato.client.worker
import legato.client.local, legato.ui
from legato.client.cli import build_parser
build_parser()
print("ok")
"""
    ran = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert (ran.returncode, ran.stdout.strip()) == (0, "ok"), ran.stderr
    served = subprocess.run(
        [sys.executable, "-c", "import sys, legato.server.__main__ as m, legato.server.cli\n"
         "print(sorted(n for n in sys.modules if n.startswith('legato.client')))"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert (served.returncode, served.stdout.strip()) == (0, "[]"), served.stderr


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) for every import in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, id(node) in top) for alias in node.names)
    return found


def test_layers_import_only_downwards() -> None:
    """common imports neither side; the server never imports the client; the client
    reaches the server only lazily, from the CLI commands that run the server's own
    code (serve, backup, doctor)."""
    allowed_lazy = {ROOT / "client/legato/client/cli/__init__.py",
                    ROOT / "client/legato/client/cli/daemon.py"}  # fmt: skip
    for path in (ROOT / "common").rglob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("legato.client", "legato.server", "legato.ui")), path
    for path in (ROOT / "server").rglob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("legato.client", "legato.ui")), (path, module)
    for path in (ROOT / "client").rglob("*.py"):
        for module, top_level in _imports(path):
            if module.startswith("legato.server"):
                assert path in allowed_lazy and not top_level, (path, module)


async def test_two_agents_from_a_shell_with_no_daemon_started_and_no_key_pasted(
    user: User,
) -> None:
    """The README's quick start: no `legato serve`, no key in any configuration."""
    assert user.daemon_pid() is None
    coder = await user.legato("mcp", "config", "--client", "claude", "--agent", "coder")
    assert coder.code == 0, coder.stderr
    assert "started the daemon" in coder.stderr
    researcher = await user.legato("mcp", "config", "--client", "codex", "--agent", "researcher")
    assert researcher.code == 0, researcher.stderr
    assert "started the daemon" not in researcher.stderr  # the first one serves on

    claude = json.loads(coder.stdout)["mcpServers"]["legato"]
    codex = tomllib.loads(researcher.stdout)["mcp_servers"]["legato"]
    assert claude["args"] == ["mcp", "--agent", "coder"]
    assert codex["args"] == ["mcp", "--agent", "researcher"]
    for printed in (coder.stdout, researcher.stdout):
        assert "lgt_" not in printed  # a committed .mcp.json leaks nothing
    keys = user.data_dir / "keys"
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    assert oct((keys / "coder.key").stat().st_mode & 0o777) == "0o600"

    def bridge(entry: dict[str, Any]) -> StdioServerParameters:
        # What the MCP client runs: the snippet's command, args and env, nothing else.
        return StdioServerParameters(
            command=entry["command"],
            args=entry["args"],
            env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": user.env["XDG_RUNTIME_DIR"],
                 **entry["env"]},
        )  # fmt: skip

    # After a reboot, say: the first bridge an MCP client starts starts the daemon.
    assert (await user.legato("stop")).code == 0
    assert user.daemon_pid() is None
    async with Client(bridge(claude)) as coder_mcp, Client(bridge(codex)) as researcher_mcp:
        assert user.daemon_pid() is not None
        delegated = await asyncio.wait_for(
            coder_mcp.call_tool(
                "delegate_task", {"label": "@researcher", "request": "RPM for Tier 1?"}
            ),
            GUARD,
        )
        assert not delegated.is_error, delegated.content
        claimed = await asyncio.wait_for(
            researcher_mcp.call_tool("claim_task", {"wait_seconds": 10}), GUARD
        )
        assert not claimed.is_error, claimed.content
        assert "RPM for Tier 1?" in json.dumps(claimed.structured_content)


async def test_an_existing_agent_keeps_its_key_unless_a_new_one_is_asked_for(user: User) -> None:
    added = await user.legato("agent", "add", "coder")
    assert added.code == 0, added.stderr
    assert "(agent, @coder)" in added.stdout  # the same default label as `mcp config`
    key = added.stdout.split("LEGATO_AGENT_KEY=")[1].split()[0]
    assert (user.data_dir / "keys" / "coder.key").read_text().strip() == key

    again = await user.legato("mcp", "config", "--client", "cursor", "--agent", "coder")
    assert again.code == 0, again.stderr
    assert "keeps its key" in again.stderr
    async with AsyncClient(user.address, api_key=key) as coder:
        assert (await coder.whoami()).name == "coder"  # not rotated

    rotated = await user.legato(
        "mcp", "config", "--client", "cursor", "--agent", "coder", "--new-key"
    )
    assert rotated.code == 0, rotated.stderr
    assert "new key" in rotated.stderr
    new_key = (user.data_dir / "keys" / "coder.key").read_text().strip()
    assert new_key != key
    async with AsyncClient(user.address, api_key=key) as stale:
        with pytest.raises(UnauthenticatedError):
            await stale.whoami()

    (user.data_dir / "keys" / "coder.key").unlink()
    lost = await user.legato("mcp", "config", "--client", "cursor", "--agent", "coder")
    assert lost.code == 1
    assert "--new-key" in lost.stderr and lost.stdout == ""

    assert (await user.legato("agent", "add", "doomed")).code == 0
    assert (user.data_dir / "keys" / "doomed.key").exists()
    assert (await user.legato("agent", "revoke", "doomed")).code == 0
    assert not (user.data_dir / "keys" / "doomed.key").exists()  # a dead key is not kept


async def test_two_clients_starting_at_once_end_with_one_daemon(user: User) -> None:
    first, second = await asyncio.gather(user.legato("agent", "list"), user.legato("agent", "list"))
    assert (first.code, second.code) == (0, 0), (first.stderr, second.stderr)
    pid = user.daemon_pid()
    assert pid is not None
    stopped = await user.legato("stop")
    assert stopped.code == 0, stopped.stderr
    assert f"pid {pid}" in stopped.stdout
    status = await user.legato("status", "--json")
    assert status.code == 3
    report = json.loads(status.stdout)
    assert report["status"] == "UNREACHABLE"
    # Before: gRPC's "failed to connect to all addresses; last error: ...".
    assert report["detail"] == f"no socket at {user.address.removeprefix('unix:')}"
    # The loser's daemon left no trace behind: nothing else holds the socket.
    assert user.daemon_pid() in (None, pid)


async def test_serve_detach_status_and_stop(user: User) -> None:
    served = await user.legato("serve", "--detach")
    assert served.code == 0, served.stderr
    assert user.address in served.stdout and "legato.log" in served.stdout
    status = await user.legato("status", "--json")
    assert status.code == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["status"] == "SERVING"
    assert (report["pid"], report["backend"]) == (user.daemon_pid(), "sqlite")
    assert report["data_dir"] == str(user.data_dir)

    twice = await user.legato("serve", "--detach")
    assert twice.code == 0, twice.stderr  # before: 1, "the daemon did not start"
    assert f"already serving on {user.address} (pid {user.daemon_pid()}" in twice.stdout
    assert "did not start" not in (user.data_dir / "legato.log").read_text()

    stopped = await user.legato("stop")
    assert stopped.code == 0, stopped.stderr
    assert "legato stopped" in (user.data_dir / "legato.log").read_text()
    assert (await user.legato("status")).code == 3


async def test_no_daemon_is_started_for_an_address_the_user_gave(user: User) -> None:
    elsewhere = f"unix:{user.home / 'elsewhere.sock'}"
    ran = await user.legato("task", "list", "--key", "lgt_x", env={"LEGATO_ADDRESS": elsewhere})
    assert ran.code == 1
    assert "cannot reach" in ran.stderr
    assert user.daemon_pid() is None
    database = await user.legato(
        "task",
        "list",
        "--key",
        "lgt_x",
        env={"LEGATO_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert database.code == 1
    assert user.daemon_pid() is None


async def test_task_commands_read_well(user: User) -> None:
    created = await user.legato("task", "create", "What is the\nTier 1 limit?", "-l", "@r")
    assert created.code == 0, created.stderr
    task_id = created.stdout.strip()
    listed = await user.legato("task", "list")
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "AGE", "CREATOR", "LABELS", "CONTENT"]
    assert row.split()[:5] == [task_id, "pending", row.split()[2], "admin", "@r"]
    assert row.endswith("What is the …")

    waited = await user.legato("task", "create", "nobody takes this", "-l", "@r", "--wait", "0.3")
    assert waited.code == 1
    assert waited.stdout.strip().startswith("t_")  # the id, for the script to follow it
    assert "did not finish within 0.3 s" in waited.stderr

    version = await user.legato("--version")
    assert version.code == 0 and version.stdout.startswith("legato ")


def readme_sh_blocks(*headings: str) -> list[str]:
    """The ```sh blocks under the README's `## <heading>` sections, in order."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for heading in headings:
        section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
        blocks += [part.split("```", 1)[0] for part in section.split("```sh\n")[1:]]
    assert blocks, headings
    return blocks


async def test_the_readme_shell_quick_start_runs_as_written(user: User) -> None:
    """The README from `make install` on, in one shell: no `legato serve`, no key pasted.
    What a test cannot do is replaced: `codex` is not run, the lease token the claim
    printed stands for `l_...`, and the last wait is short (it then exits 1, as told)."""
    script = "\n".join(
        readme_sh_blocks("Two commands", "Two agents in one minute (Claude Code, Codex, Cursor)",
                         "The same from a shell")
    )  # fmt: skip
    lines = [line for line in script.splitlines() if not line.startswith(("make ", "codex "))]
    script = "\n".join(lines)
    script = script.replace("legato status ", "{ legato status || [ $? -eq 3 ]; } ", 1)
    script = script.replace(
        "legato task claim --as researcher ", "legato task claim --as researcher | tee claimed "
    )
    script = script.replace("l_...", "\"$(sed -n 's/.*lease token: //p' claimed)\"")
    script = script.replace("--wait 600 --as coder", "--wait 1 --as coder || [ $? -eq 1 ]")
    assert "--wait 1" in script and "claimed" in script, "the README's shell section changed"
    home = user.home / "home"
    (home / ".codex").mkdir(parents=True)
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", f"set -euo pipefail\n{script}\nlegato task get \"$id\" --json\nkill %1\n",
        cwd=user.home, env={**user.env, "HOME": str(home),
                            "PATH": f"{LEGATO.parent}{os.pathsep}{os.environ['PATH']}"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(shell.communicate(), GUARD)
    assert shell.returncode == 0, err.decode()[-3000:]
    done = json.loads(out.decode().strip().splitlines()[-1])
    assert (done["status"], done["result"]["rpm"]) == ("done", 500)
    assert "lgt_" not in (home / ".codex" / "config.toml").read_text()
    assert "started the daemon" in err.decode()


async def test_work_says_when_the_daemon_is_unreachable_and_that_it_keeps_trying(
    user: User,
) -> None:
    """Before, `legato work` printed the client's raw log line ("claiming failed with
    ...; trying again in 0.05 s"), if anything, and never that the daemon was back."""
    address = f"unix:{user.home / 'w.sock'}"  # an address of its own: nothing starts by itself
    on = ("--address", address)
    assert (await user.legato("serve", "--detach", "--listen", address)).code == 0
    assert (await user.legato("agent", "add", "worker", *on)).code == 0
    assert (await user.legato("stop", *on)).code == 0

    work = await asyncio.create_subprocess_exec(
        str(LEGATO), "work", "--as", "worker", *on, "--wait", "1", "--once", "--", "cat",
        env=user.env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stderr = work.stderr
    assert stderr is not None

    async def said(words: str) -> str:
        while True:
            line = (await asyncio.wait_for(stderr.readline(), GUARD)).decode()
            assert line, f"legato work ended before saying {words!r}"
            if words in line:
                return line

    try:
        line = await said("unreachable")
        assert address in line and "retrying" in line
        assert (await user.legato("serve", "--detach", "--listen", address)).code == 0
        await said("answers again")
        created = await user.legato("task", "create", "echo me", "-l", "@worker", *on)
        assert created.code == 0, created.stderr
        assert await asyncio.wait_for(work.wait(), GUARD) == 0
    finally:
        if work.returncode is None:
            work.kill()
            await work.wait()
        await user.legato("stop", *on)


async def test_demo_cut_short_leaves_no_open_task_and_no_live_agent(user: User) -> None:
    """Ctrl-C in the middle of `legato demo`: before, its agents were revoked but the
    coder's task stayed open for good on a label nobody would ever hold."""
    demo = await asyncio.create_subprocess_exec(
        str(LEGATO), "demo", "--pace", "3", env=user.env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert demo.stdout is not None
    while b"claimed" not in (line := await asyncio.wait_for(demo.stdout.readline(), GUARD)):
        assert line, (await demo.communicate())[1].decode()
    demo.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(demo.communicate(), GUARD)
    assert demo.returncode == 130, err.decode()
    assert b"revoked the demo agents" in out
    admin_key = (user.data_dir / "admin.key").read_text().strip()
    async with AsyncClient(user.address, api_key=admin_key) as admin:
        tasks = (await admin.list_tasks()).tasks
        agents = [a for a in await admin.list_agents(include_revoked=True) if a.name != "admin"]
    assert tasks and all(task.status.terminal for task in tasks), tasks
    assert agents and all(agent.revoked for agent in agents)


# What a new user walking through the README ran into.
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
        got = await user.legato("task", "get", created.stdout.strip(), "--json")
        task = json.loads(got.stdout)
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


def _bridge(made: str) -> StdioServerParameters:
    """What an MCP client with a bare environment runs: the snippet, PATH, nothing else."""
    entry = json.loads(made)["mcpServers"]["legato"]
    env = {"PATH": os.environ["PATH"], **entry["env"]}
    return StdioServerParameters(command=entry["command"], args=entry["args"], env=env)


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
    async with Client(_bridge(made.stdout)) as coder:
        listed = await asyncio.wait_for(coder.call_tool("list_my_tasks", {}), GUARD)
        assert not listed.is_error, listed.content
    assert user.daemon_pid() is not None


async def test_a_running_bridge_takes_up_its_agents_new_key(user: User) -> None:
    """Before, the bridge read its key file once: after `mcp config --new-key` every
    tool call was refused until the MCP client restarted it."""
    made = await user.legato("mcp", "config", "--client", "claude", "--agent", "coder")
    assert made.code == 0, made.stderr
    created = await user.legato("task", "create", "hold this", "-l", "@coder")
    async with Client(_bridge(made.stdout)) as coder:
        claimed = await asyncio.wait_for(coder.call_tool("claim_task", {}), GUARD)
        assert not claimed.is_error, claimed.content
        again = await user.legato(
            "mcp", "config", "--client", "claude", "--agent", "coder", "--new-key"
        )
        assert again.code == 0, again.stderr
        listed = await asyncio.wait_for(coder.call_tool("list_my_tasks", {}), GUARD)
        assert not listed.is_error, listed.content
        done = await asyncio.wait_for(
            coder.call_tool("complete_task", {"id": created.stdout.strip(), "result": {"ok": 1}}),
            GUARD,
        )
        assert not done.is_error, done.content
        revoked = await user.legato("agent", "revoke", "coder")
        assert revoked.code == 0, revoked.stderr
        refused = await asyncio.wait_for(coder.call_tool("list_my_tasks", {}), GUARD)
        assert refused.is_error and "--agent coder --new-key" in str(refused.content)


async def test_a_bridge_starts_the_daemon_again_after_legato_stop(user: User) -> None:
    """Before, every call after `legato stop` said to run `legato serve` (in the
    foreground) or `make run`; the bridge had started the daemon only at launch."""
    made = await user.legato("mcp", "config", "--client", "claude", "--agent", "coder")
    assert made.code == 0, made.stderr
    async with Client(_bridge(made.stdout)) as coder:
        assert not (await asyncio.wait_for(coder.call_tool("list_my_tasks", {}), GUARD)).is_error
        assert (await user.legato("stop")).code == 0
        down = await asyncio.wait_for(coder.call_tool("list_my_tasks", {}), GUARD)
        assert down.is_error and "started again" in str(down.content), down.content
        assert user.daemon_pid() is not None
        assert not (await asyncio.wait_for(coder.call_tool("list_my_tasks", {}), GUARD)).is_error


async def test_stop_works_where_the_platform_has_no_pidfd(user: User) -> None:
    """`os.pidfd_open` is Linux 5.3 and later only; elsewhere the attribute is missing,
    as here. Before, `legato stop` died of an AttributeError, the daemon running on."""
    assert (await user.legato("serve", "--detach")).code == 0
    pid = user.daemon_pid()
    assert pid is not None
    stop = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import os, sys\ndel os.pidfd_open\nfrom legato.client.cli import main\n"
        "sys.exit(main(['stop']))",
        env=user.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(stop.communicate(), GUARD)
    assert stop.returncode == 0, err.decode()
    assert f"pid {pid}" in out.decode()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_the_daemon_does_not_inherit_the_key_of_the_client_that_started_it(
    user: User,
) -> None:
    """Before, `/proc/<daemon>/environ` held the LEGATO_AGENT_KEY of the command that
    started it, readable to anything that can read the daemon's environment."""
    assert (await user.legato("agent", "add", "coder")).code == 0
    assert (await user.legato("stop")).code == 0
    key = (user.data_dir / "keys" / "coder.key").read_text().strip()
    listed = await user.legato("task", "list", env={"LEGATO_AGENT_KEY": key})
    assert listed.code == 0, listed.stderr
    pid = user.daemon_pid()
    assert pid is not None
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert f"LEGATO_DATA_DIR={user.data_dir}".encode() in environ
    assert b"LEGATO_AGENT_KEY" not in environ and key.encode() not in environ
    assert (await user.legato("stop")).code == 0
    served = await user.legato("serve", "--detach", env={"LEGATO_AGENT_KEY": key})
    assert served.code == 0, served.stderr
    pid = user.daemon_pid()
    assert pid is not None
    assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()


async def test_mcp_config_with_an_agents_key_in_the_env_says_how_to_act_as_admin(
    user: User,
) -> None:
    """Before: "only an admin can list agents; agent 'coder' is not one", with no word
    of where that key came from."""
    assert (await user.legato("agent", "add", "coder")).code == 0
    key = (user.data_dir / "keys" / "coder.key").read_text().strip()
    ran = await user.legato(
        "mcp", "config", "--client", "claude", "--agent", "researcher",
        env={"LEGATO_AGENT_KEY": key},
    )  # fmt: skip
    assert ran.code == 1 and ran.stdout == ""
    assert "agent coder (LEGATO_AGENT_KEY)" in ran.stderr
    assert "unset LEGATO_AGENT_KEY" in ran.stderr
    assert (await user.legato("mcp", "config", "--client", "claude", "--agent", "x")).code == 0


async def test_appending_the_codex_table_twice_leaves_the_file_valid(user: User) -> None:
    """Before, a second `>> ~/.codex/config.toml` appended a second [mcp_servers.legato]
    table, and Codex refused the file."""
    config = user.home / "config.toml"
    config.write_text('model = "o3"\n')

    async def append(*args: str) -> Ran:
        with config.open("a") as file:
            process = await asyncio.create_subprocess_exec(
                str(LEGATO), "mcp", "config", "--client", "codex", *args,
                env=user.env, stdout=file, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(process.communicate(), GUARD)
        assert process.returncode is not None
        return Ran(process.returncode, "", err.decode())

    assert (await append("--agent", "coder")).code == 0
    again = await append("--agent", "coder")
    assert again.code == 0 and "already" in again.stderr, again.stderr
    other = await append("--agent", "researcher")
    assert other.code == 1 and "Remove that table first" in other.stderr
    parsed = tomllib.loads(config.read_text())
    assert parsed["model"] == "o3"
    assert parsed["mcp_servers"]["legato"]["args"] == ["mcp", "--agent", "coder"]


async def test_an_agent_name_never_leads_a_key_file_out_of_keys(user: User) -> None:
    """Before, `--as ../admin` read `<data_dir>/admin.key` and acted as the admin."""
    from legato.common.paths import AGENT_NAME_RE
    from legato.server.agents import NAME_RE

    assert AGENT_NAME_RE.pattern == NAME_RE.pattern  # the daemon's own rule
    assert (await user.legato("agent", "add", "coder")).code == 0  # keys/ and admin.key exist
    ran = await user.legato("agent", "whoami", "--as", "../admin")
    assert ran.code == 1 and "not an agent name" in ran.stderr, ran
    assert ran.stdout == ""
    bridge = await user.legato("mcp", "--agent", "../admin")
    assert bridge.code == 1 and "not an agent name" in bridge.stderr


async def test_task_watch_names_the_claimant_once(user: User) -> None:
    """Before: "claimed by researcher  by researcher"."""
    assert (await user.legato("agent", "add", "researcher")).code == 0
    created = await user.legato("task", "create", "look it up", "-l", "@researcher")
    assert (await user.legato("task", "claim", "--as", "researcher")).code == 0
    watch = await asyncio.create_subprocess_exec(
        str(LEGATO), "task", "watch", "--task", created.stdout.strip(), "--after-seq", "0",
        env=user.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert watch.stdout is not None
    try:
        while b"claimed" not in (line := await asyncio.wait_for(watch.stdout.readline(), GUARD)):
            assert line, "the watch ended before the claim"
    finally:
        watch.kill()
        await watch.wait()
    assert line.decode().count("researcher") == 2, line  # its label, and who claimed it
    assert line.decode().rstrip().endswith("by researcher")


async def test_two_detached_starts_at_once_both_succeed_and_log_no_failure(user: User) -> None:
    """Two starters at once (two bridges, say): the loser's daemon finds the socket or
    data dir taken. Before, that was "another legato daemon ... already serving" in
    legato.log and, for `serve --detach`, exit 1."""
    first, second = await asyncio.gather(
        user.legato("serve", "--detach"), user.legato("serve", "--detach")
    )
    assert (first.code, second.code) == (0, 0), (first.stderr, second.stderr)
    pid = user.daemon_pid()
    assert pid is not None
    assert any("already serving" in ran.stdout for ran in (first, second))
    log = (user.data_dir / "legato.log").read_text()
    assert "another legato daemon" not in log and "did not start" not in log, log
