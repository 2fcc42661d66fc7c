"""`legato agent ...`: agents, their labels, roles and keys (admin)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legato.client._sync import Client
from legato.client.cli.output import Output, agent_json, dump
from legato.client.local import (
    admin_key_file,
    is_local_default,
    key_file,
    write_agent_key,
    write_key_file,
)
from legato.client.models import Agent, Role

if TYPE_CHECKING:
    from legato.client.cli import Parents


def default_labels(name: str) -> list[str]:
    """The labels of a new agent when none are given: its own, `@NAME`."""
    return [f"@{name}"]


def keep_key(agent: str, key: str) -> str:
    """Writes the key file of `agent` in this machine's data dir, for `legato mcp
    --agent NAME`; the note for stderr that says where."""
    path = write_agent_key(agent, key)
    return f"legato: kept the key of {agent} in {path} (mode 0600)"


def keep_local_key(client: Client, agent: str, key: str) -> Path | None:
    """`agent add` and `agent rotate` keep the key file of an agent of this user's own
    daemon (the default one, or one whose data dir LEGATO_DATA_DIR names); another
    daemon's agents get theirs from `legato mcp config` on the machine that needs it.
    The key file, if kept."""
    if is_local_default(client.address) or os.environ.get("LEGATO_DATA_DIR"):
        return write_agent_key(agent, key)
    return None


def print_new_key(agent: Agent, key: str, out: Output, verb: str, kept: Path | None) -> None:
    if out.as_json:
        print(dump({"agent": agent_json(agent), "api_key": key}))
        return
    labels = " ".join(agent.labels) or "no labels"
    print(f"agent {agent.name} {verb} ({agent.role.value}, {labels})")
    if kept is None:
        print("API key (shown only now; the daemon keeps only its hash):\n")
    else:
        print(f"API key (the daemon keeps only its hash; this machine keeps it in {kept}, 0600):\n")
    print(f"  export LEGATO_AGENT_KEY={key}\n")


def cmd_agent_add(client: Client, args: argparse.Namespace, out: Output) -> int:
    from legato.client.cli.mcp import MCP_FILES, snippet

    labels = [] if args.no_labels else (args.label or default_labels(args.name))
    agent, key = client.create_agent(args.name, labels=labels, role=args.role)
    print_new_key(agent, key, out, "created", keep_local_key(client, agent.name, key))
    if args.mcp and not out.as_json:
        print(f"For {args.mcp}, add this to its MCP configuration ({MCP_FILES[args.mcp]}):\n")
        print(snippet(args.mcp, agent.name, client))
    return 0


def cmd_agent_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    for agent in client.list_agents(include_revoked=args.all):
        out.agent(agent)
    return 0


def cmd_agent_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.agent(client.get_agent(args.name))
    return 0


def cmd_agent_update(client: Client, args: argparse.Namespace, out: Output) -> int:
    labels = [] if args.no_labels else args.label
    out.agent(client.update_agent(args.name, labels=labels, role=args.role))
    return 0


def cmd_agent_revoke(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.agent(client.revoke_agent(args.name))
    if is_local_default(client.address) or os.environ.get("LEGATO_DATA_DIR"):
        # The key is dead: a file holding it would only mislead `legato mcp --agent`.
        key_file(args.name).unlink(missing_ok=True)
    return 0


def _admin_key_in_use(args: argparse.Namespace) -> bool:
    """Whether the key of this command is the one in the data dir's admin.key."""
    try:
        return bool(args.api_key) and admin_key_file().read_text().strip() == args.api_key
    except OSError:
        return False


def cmd_agent_rotate(client: Client, args: argparse.Namespace, out: Output) -> int:
    # Rotating the key of admin.key itself: the new key goes there, or every command
    # that falls back to it (and `legato doctor`) would be locked out.
    own_file = _admin_key_in_use(args) and args.name in (None, "", client.whoami().name)
    agent, key = client.rotate_key(args.name or "")
    if own_file:
        write_key_file(admin_key_file(), key)
        kept: Path | None = admin_key_file()
    else:
        kept = keep_local_key(client, agent.name, key)
    print_new_key(agent, key, out, "has a new key", kept)
    return 0


def cmd_agent_whoami(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.agent(client.whoami())
    return 0


def register(commands: Any, parents: Parents) -> None:
    """Adds `legato agent` and its actions."""
    from legato.client.cli import group
    from legato.client.cli.mcp import MCP_FILES

    action = group(commands, "agent", "manage agents and their keys (admin)", parents)

    add = action(
        "add", cmd_agent_add, "create an agent, print its key once and keep it in its key file"
    )
    add.add_argument("name")
    add.add_argument(
        "-l", "--label", action="append", help="route @label to it (repeatable; default @NAME)"
    )
    add.add_argument("--no-labels", action="store_true", help="give it no label at all")
    add.add_argument("--role", choices=[r.value for r in Role], default="agent")
    add.add_argument(
        "--mcp", choices=sorted(MCP_FILES), help="also print the configuration for this MCP client"
    )

    agent_list = action("list", cmd_agent_list, "list agents")
    agent_list.add_argument("--all", action="store_true", help="include revoked agents")

    agent_get = action("get", cmd_agent_get, "show one agent")
    agent_get.add_argument("name")

    update = action("update", cmd_agent_update, "replace an agent's labels or role")
    update.add_argument("name")
    update.add_argument("-l", "--label", action="append", help="the new labels (repeatable)")
    update.add_argument("--no-labels", action="store_true", help="remove every label")
    update.add_argument("--role", choices=[r.value for r in Role])

    revoke = action("revoke", cmd_agent_revoke, "revoke an agent and its key for good")
    revoke.add_argument("name")

    rotate = action("rotate", cmd_agent_rotate, "issue a new key; the old one stops at once")
    rotate.add_argument("name", nargs="?", help="default: the agent of the key in use")

    action("whoami", cmd_agent_whoami, "show the agent of the key in use")
