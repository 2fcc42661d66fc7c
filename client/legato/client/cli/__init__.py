"""The `legato` command: work with tasks and agents from a shell, run and watch the daemon.

One module a command group: `tasks` (`legato task ...`), `agents`
(`legato agent ...`), `mcp` (`legato mcp`, `legato mcp config`), `work`
(`legato work`, `legato demo`) and `daemon` (`legato status`, `stop`, `doctor`,
`ui`). `legato serve` and `legato backup` are the daemon's own commands
(`legato.server.cli`), handed over whole. That and `legato doctor`, which
runs the daemon's own checks of its files (`legato.server.ops`), are where
the client's command line reaches into the server package, lazily, so that
the client library itself never imports it.

Human-readable output by default, `--json` for scripts. A usage error prints
the usage and exits 2; any other error prints one line to stderr and exits 1.
Commands that talk to the daemon start it in the background when none serves
this user's default socket (see `legato.client.local`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from legato.client._sync import Client
from legato.client.cli.output import Output, tree_lines
from legato.client.errors import LegatoError
from legato.client.local import (
    DaemonNotStarted,
    ensure_daemon,
    key_file,
    read_agent_key,
    resolve_key,
)

__all__ = ["build_parser", "main", "tree_lines"]

# Handed to `legato.server.cli` before any parsing here.
SERVER_COMMANDS = ("serve", "backup")

Run = Callable[..., int]


@dataclass(frozen=True)
class Parents:
    """The options many commands share, as argparse parent parsers."""

    connection: argparse.ArgumentParser  # --address, --key, --tls-*
    common: argparse.ArgumentParser  # the connection, and --json


def add_client_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="connect with TLS, trusting the CA certificate in FILE to sign the daemon's "
        "(default: LEGATO_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="this client's certificate, for a daemon that requires one (default: LEGATO_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        metavar="FILE",
        help="the private key of --tls-cert, mode 0600 (default: LEGATO_TLS_KEY)",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def group(
    commands: Any, name: str, help: str, parents: Parents
) -> Callable[[str, Run, str], argparse.ArgumentParser]:
    """A command with actions (`legato task create`), each taking the common options."""
    actions = commands.add_parser(name, help=help).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )

    def action(name: str, run: Run, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = actions.add_parser(name, help=help, parents=[parents.common])
        sub.set_defaults(run=run)
        return sub

    return action


def _version() -> str:
    try:
        return version("legato")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line but `serve` and `backup`, which only name themselves here."""
    from legato.client.cli import agents, daemon, mcp, tasks, work

    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--address", help="daemon address (default: LEGATO_ADDRESS or the default socket)"
    )
    connection.add_argument(
        "--key", help="API key (default: LEGATO_AGENT_KEY, else the admin key of your daemon)"
    )
    connection.add_argument(
        "--as",
        dest="as_agent",
        metavar="NAME",
        help="act as agent NAME, with the key kept in its key file (`legato agent add` and "
        "`legato mcp config` keep it)",
    )
    add_client_tls(connection)
    common = argparse.ArgumentParser(add_help=False, parents=[connection])
    common.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of text: one object a line (JSON Lines) for lists and streams",
    )
    parents = Parents(connection, common)

    parser = argparse.ArgumentParser(
        prog="legato", description="Delegate tasks between AI coding agents through a local daemon."
    )
    parser.add_argument("--version", action="version", version=f"legato {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    daemon.register(commands, parents)
    work.register(commands, parents)
    mcp.register(commands, parents)
    tasks.register(commands, parents)
    agents.register(commands, parents)
    return parser


def agent_key(agent: str) -> str:
    """The key in the key file of `agent` (`--as NAME`), or one line on how to get one."""
    key = read_agent_key(agent)
    if key is None:
        raise SystemExit(
            f"legato: no key file for agent {agent} at {key_file(agent)}; `legato agent add "
            f"{agent}` creates the agent and keeps its key there (`legato mcp config --agent "
            f"{agent} --new-key` issues an existing agent a new one)"
        )
    return key


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`legato work ... -- COMMAND ARGS`: the options, and the command after the first `--`.

    Split before argparse sees it: argparse would read the command's own
    options (`-p`, `--model`) as ours.
    """
    argv = list(argv)
    if argv[:1] == ["work"] and "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `legato` command; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SERVER_COMMANDS:
        from legato.server.cli import main as server_main

        return server_main(argv)
    options, command = split_command(argv)
    args = build_parser().parse_args(options)
    args.command_argv = command
    if hasattr(args, "precheck"):
        args.precheck(args)  # e.g. `legato work`'s command exists, before any daemon starts
    try:
        if not getattr(args, "uses_client", True):
            return int(args.run(args))
        if getattr(args, "autostart", True):
            ensure_daemon(args.address)
        if args.as_agent:
            key = agent_key(args.as_agent)
        elif hasattr(args, "resolve_key"):  # `legato demo` says how to start a daemon
            key = args.resolve_key(args.key)
        else:
            key = resolve_key(args.key)
        args.api_key = key  # `legato work` hands it on to the command it runs
        with Client(
            args.address,
            api_key=key,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ) as client:
            return int(args.run(client, args, Output(getattr(args, "json", False))))
    except (LegatoError, TimeoutError, ValueError, PermissionError, DaemonNotStarted) as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
