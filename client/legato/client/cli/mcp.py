"""`legato mcp` (the MCP bridge an MCP client starts) and `legato mcp config` (its configuration).

The configuration names the agent (`legato mcp --agent NAME`) and never holds
its key: the bridge reads the key file `legato mcp config` keeps in the data
dir, so a committed `.mcp.json` leaks nothing. An existing agent keeps its
key unless `--new-key` asks for a new one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legato.client._sync import Client
from legato.client.cli.agents import default_labels, keep_key
from legato.client.cli.output import Output
from legato.client.errors import PermissionDeniedError, UnauthenticatedError
from legato.client.local import (
    is_local_default,
    key_file,
    local_default_environment,
    read_agent_key,
)
from legato.common.paths import default_data_dir

if TYPE_CHECKING:
    from legato.client.cli import Parents

# Where each MCP client keeps the snippet `legato mcp config` prints.
MCP_FILES = {
    "claude": ".mcp.json in the project, or ~/.claude.json",
    "codex": "~/.codex/config.toml",
    "cursor": ".cursor/mcp.json in the project, or ~/.cursor/mcp.json",
}


def legato_executable() -> str:
    """The absolute path of this `legato`, for clients that start it themselves."""
    beside_python = Path(sys.executable).with_name("legato")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("legato")
    return str(Path(found).resolve()) if found else str(Path(sys.argv[0]).resolve())


def config_snippet(client: str, *, command: str, agent: str, env: dict[str, str]) -> str:
    """The configuration entry that makes `client` start the bridge as `command mcp
    --agent AGENT`, with `env` (where the daemon is; paths, never keys).

    Claude Code (`.mcp.json` or `~/.claude.json`) and Cursor (`.cursor/mcp.json`)
    take a JSON `mcpServers` entry; Codex (`~/.codex/config.toml`) a TOML table.
    """
    args = ["mcp", "--agent", agent]
    if client == "codex":
        pairs = ", ".join(f"{name} = {json.dumps(value)}" for name, value in env.items())
        return (
            "[mcp_servers.legato]\n"
            f"command = {json.dumps(command)}\n"
            f"args = {json.dumps(args)}\n"
            f"env = {{ {pairs} }}\n"
            # Waiting tools return within 45 s; the default 60 s leaves them room.
            "tool_timeout_sec = 60\n"
        )
    if client not in MCP_FILES:
        raise ValueError(f"unknown MCP client {client!r}; use one of {', '.join(MCP_FILES)}")
    entry: dict[str, Any] = {"command": command, "args": args, "env": env}
    if client == "claude":
        entry = {"type": "stdio", **entry}
    return json.dumps({"mcpServers": {"legato": entry}}, indent=2) + "\n"


def snippet(kind: str, agent: str, client: Client) -> str:
    """The snippet for MCP client `kind` to start the bridge as `agent`, reaching the
    daemon the way `client` does (its address and TLS files) and finding the key
    file where this command kept it."""
    address = client.address
    if address.startswith("unix:") and not address.startswith("unix:/"):
        address = f"unix:{Path(address.removeprefix('unix:')).resolve()}"
    # This user's own daemon: the bridge finds the same default socket and may start
    # the daemon itself (after a reboot, say), which it never does for an address it
    # is given.
    env = local_default_environment() if is_local_default(address) else {"LEGATO_ADDRESS": address}
    if client.tls is not None:
        env.update(client.tls.environment())
    if os.environ.get("LEGATO_DATA_DIR") or os.environ.get("XDG_DATA_HOME"):
        # Not the default data dir: the bridge must look for the key file there,
        # whatever environment its MCP client gives it.
        env["LEGATO_DATA_DIR"] = str(default_data_dir().absolute())
    return config_snippet(kind, command=legato_executable(), agent=agent, env=env)


def _kept_key(client: Client, agent: str) -> str:
    """The key in the key file of an existing `agent`, checked to still work."""
    path = key_file(agent)
    key = read_agent_key(agent)
    if key is None:
        raise SystemExit(
            f"legato: agent {agent} exists, but its key is not kept in {path} (legato stores "
            "only a hash of it, so it cannot be printed again). Pass --new-key to issue a new "
            "one (the key it has now stops working), or write its key to that file (mode 0600)"
        )
    tls = client.tls
    try:
        with Client(
            client.address,
            api_key=key,
            tls_ca=tls.ca if tls else None,
            tls_cert=tls.cert if tls else None,
            tls_key=tls.key if tls else None,
        ) as probe:
            holder = probe.whoami().name
    except UnauthenticatedError:
        raise SystemExit(
            f"legato: the key of {agent} in {path} no longer works (rotated or revoked); pass "
            "--new-key to issue a new one"
        ) from None
    if holder != agent:
        raise SystemExit(f"legato: {path} holds the key of {holder}, not of {agent}")
    return key


def _needs_admin(args: argparse.Namespace, client: Client, agent: str) -> str:
    """Why `--agent` was refused to a non-admin key, and how to act as the admin."""
    if args.as_agent:
        source, drop = f"--as {args.as_agent}", f"leave out --as {args.as_agent}"
    elif args.key:
        source, drop = "--key", "leave out --key"
    else:
        source, drop = "LEGATO_AGENT_KEY", "unset LEGATO_AGENT_KEY"
    return (
        f"legato: --agent {agent} creates or checks an agent, which takes the admin key; this "
        f"command used the key of agent {client.whoami().name} ({source}). Act as the admin: "
        f"{drop} (the admin key of your daemon is then used) or pass --key ADMIN_KEY. Without "
        f"--agent, this prints the configuration of {source}'s own agent"
    )


def cmd_mcp_config(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Prints the MCP configuration for an agent: the daemon, this executable, no key."""
    if args.agent:
        agent = args.agent
        try:
            known = {a.name: a for a in client.list_agents(include_revoked=True)}
        except PermissionDeniedError:
            raise SystemExit(_needs_admin(args, client, agent)) from None
        if agent not in known:
            _, key = client.create_agent(agent, labels=args.label or default_labels(agent))
            print(f"legato: created agent {agent}", file=sys.stderr)
            print(keep_key(agent, key), file=sys.stderr)
        elif known[agent].revoked:
            raise SystemExit(f"legato: agent {agent} is revoked for good; choose another name")
        elif args.new_key:
            _, key = client.rotate_key(agent)
            print(
                f"legato: issued a new key for {agent}; its previous key no longer works",
                file=sys.stderr,
            )
            print(keep_key(agent, key), file=sys.stderr)
        else:
            _kept_key(client, agent)
            print(f"legato: agent {agent} keeps its key ({key_file(agent)})", file=sys.stderr)
            if args.label:
                print(
                    "legato: --label is for a new agent; `legato agent update` changes labels",
                    file=sys.stderr,
                )
    elif args.as_agent or args.key or os.environ.get("LEGATO_AGENT_KEY"):
        # An agent's own key (e.g. on a remote agent's machine): kept in its key file.
        # The key this command authenticated with, whose agent whoami names: with
        # --as A, LEGATO_AGENT_KEY may hold another agent's key.
        key = args.api_key
        agent = client.whoami().name
        print(keep_key(agent, key), file=sys.stderr)
    else:
        raise SystemExit(
            "legato: say which agent the MCP client acts as: --agent NAME (created if new), "
            "or --key / LEGATO_AGENT_KEY with that agent's key"
        )
    text = snippet(args.client, agent, client)
    if args.client == "codex" and _codex_table_already_there(text):
        return 0
    print(f"# {args.client}: {MCP_FILES[args.client]}", file=sys.stderr)
    print(text, end="")
    return 0


def _codex_table_already_there(table: str) -> bool:
    """When stdout is appended to a TOML file that has an `[mcp_servers.legato]` table
    already (`>> ~/.codex/config.toml` run twice), a second would break the file
    (\"Cannot declare ('mcp_servers', 'legato') twice\"). The same table: True, nothing
    to append. Another: refuses, naming it. Anything else: False, print it."""
    import stat
    import tomllib

    try:
        if not stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode):
            return False
        with open(f"/dev/fd/{sys.stdout.fileno()}", "rb") as file:
            existing = tomllib.load(file).get("mcp_servers", {}).get("legato")
    except (OSError, ValueError):  # not a file we can read back, or not TOML
        return False
    if existing is None:
        return False
    if existing == tomllib.loads(table)["mcp_servers"]["legato"]:
        print(
            "legato: that file has this [mcp_servers.legato] table already; left as it is",
            file=sys.stderr,
        )
        return True
    raise SystemExit(
        f"legato: that file has an [mcp_servers.legato] table already (args {existing.get('args')}"
        "); a second would break it. Remove that table first, or pick the agent per session "
        "with codex -c 'mcp_servers.legato.args=[...]'"
    )


def cmd_bridge(args: argparse.Namespace) -> int:
    """`legato mcp`: the MCP server over stdio, until the client closes the pipe."""
    from legato.client.mcp_bridge import run

    return run(agent=args.agent, address=args.address)


def register(commands: Any, parents: Parents) -> None:
    """Adds `legato mcp` and `legato mcp config`."""
    mcp = commands.add_parser(
        "mcp",
        help="serve legato's tools to an MCP client over stdio",
        description="Without an action: the MCP server an MCP client starts, acting as --agent "
        "NAME (its key file in the data dir), else as LEGATO_AGENT_KEY. It starts the daemon if "
        "none serves the default socket. `legato mcp config` prints the client configuration "
        "that starts it.",
    )
    mcp.add_argument("--agent", help="act as this agent, with the key kept in its key file")
    mcp.add_argument(
        "--address", help="daemon address (default: LEGATO_ADDRESS or the default socket)"
    )
    mcp.set_defaults(run=cmd_bridge, uses_client=False)
    actions = mcp.add_subparsers(dest="action", metavar="ACTION")
    config = actions.add_parser(
        "config", help="print the MCP client configuration for an agent", parents=[parents.common]
    )
    config.add_argument("--client", required=True, choices=sorted(MCP_FILES))
    config.add_argument(
        "--agent", help="the agent it acts as: created if new (admin), else keeps its key"
    )
    config.add_argument(
        "-l", "--label", action="append", help="labels of a new --agent (default @NAME)"
    )
    config.add_argument(
        "--new-key",
        action="store_true",
        help="issue the existing --agent a new key (its current key stops working)",
    )
    config.set_defaults(run=cmd_mcp_config, uses_client=True)
