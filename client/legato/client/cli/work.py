"""`legato work` (any command as a worker) and `legato demo` (the story on the running daemon)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from legato.client._core import DEFAULT_WORK_LEASE, DEFAULT_WORK_WAIT
from legato.client._sync import Client
from legato.client.cli.output import Output

if TYPE_CHECKING:
    from legato.client.cli import Parents


class _Unreachable(logging.Filter):
    """Turns the client's notes on failed claims into a line for the person watching:
    the daemon is unreachable and `legato work` keeps trying; then that it is back."""

    def __init__(self, address: str):
        super().__init__()
        self._address = address

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if text.startswith("claiming failed"):
            error = record.args[0] if isinstance(record.args, tuple) and record.args else ""
            record.msg = "the daemon at %s is unreachable (%s); retrying until it answers"
            record.args = (self._address, getattr(error, "code", error))
            return record.levelno >= logging.WARNING
        if text.startswith("claims go through again"):
            record.msg, record.args = "the daemon at %s answers again", (self._address,)
            return True
        return False


def _report_unreachable(address: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("legato work: %(message)s"))
    handler.addFilter(_Unreachable(address))
    logger = logging.getLogger("legato.client")
    logger.addHandler(handler)
    logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    return handler


def _work_key(explicit: str | None) -> str:
    """`legato work`'s key: `--key`, else `LEGATO_AGENT_KEY`; never the admin key of
    the data dir, which the command would get in its environment."""
    key = explicit or os.environ.get("LEGATO_AGENT_KEY")
    if not key:
        raise SystemExit(
            "legato: say which agent `legato work` works as: --as NAME (its key file; "
            "`legato agent add NAME` creates it). It does not fall back to the admin key, "
            "which the command would get as LEGATO_AGENT_KEY"
        )
    return key


def cmd_work(client: Client, args: argparse.Namespace, out: Output) -> int:
    from legato.client.worker import Worker

    handler = _report_unreachable(client.address)
    try:
        worker = Worker(
            client,
            args.labels,
            args.command_argv,
            api_key=args.api_key,
            lease=args.lease,
            wait=args.wait,
        )
        return worker.run(once=args.once)
    finally:
        logging.getLogger("legato.client").removeHandler(handler)


def _check_command(args: argparse.Namespace) -> None:
    from legato.client.worker import check_command

    check_command(args.command_argv)


def cmd_demo(client: Client, args: argparse.Namespace, out: Output) -> int:
    from legato.client.cli.demo import run_demo

    return run_demo(client, pace=args.pace)


def _demo_key(explicit: str | None) -> str:
    from legato.client.cli.demo import demo_key

    return demo_key(explicit)


def register(commands: Any, parents: Parents) -> None:
    """Adds `legato work` and `legato demo`."""
    from legato.client.cli import positive_float, seconds

    work = commands.add_parser(
        "work",
        help="run a command for each task of your labels",
        parents=[parents.connection],
        usage="legato work [@LABEL ...] [--lease S] [--wait S] [--once] -- COMMAND [ARGS ...]",
        description=(
            "Claims tasks for the labels (default: all of yours) and runs COMMAND for each: the "
            "task's content on stdin, the task as JSON in LEGATO_TASK and in the file "
            "LEGATO_TASK_FILE, its id in LEGATO_TASK_ID. stdout streams to the task as output; "
            'exit 0 completes the task with {"output": STDOUT, "exit_code": 0}, anything else '
            "fails it. Ctrl-C stops the command and hands the task back for another worker. "
            "While the daemon is unreachable it says so and keeps trying."
        ),
    )
    work.add_argument("labels", nargs="*", metavar="@LABEL", help="claim tasks with these labels")
    work.add_argument(
        "--lease",
        type=positive_float,
        default=DEFAULT_WORK_LEASE,
        metavar="SECONDS",
        help=f"seconds a claim holds between heartbeats (default {DEFAULT_WORK_LEASE:g}); "
        "a cancel is noticed within a third of it",
    )
    work.add_argument(
        "--wait",
        type=seconds,
        default=DEFAULT_WORK_WAIT,
        metavar="SECONDS",
        help=f"seconds one long-poll claim waits, at most 60 (default {DEFAULT_WORK_WAIT:g})",
    )
    work.add_argument(
        "--once", action="store_true", help="handle one task, then exit: 0 if it is done, else 1"
    )
    work.set_defaults(run=cmd_work, precheck=_check_command, resolve_key=_work_key)

    demo = commands.add_parser(
        "demo",
        help="play a delegation between three demo agents, then revoke them",
        parents=[parents.connection],
    )
    demo.add_argument(
        "--pace",
        type=seconds,
        default=0.8,
        metavar="SECONDS",
        help="seconds between steps, for reading along (default 0.8)",
    )
    demo.set_defaults(run=cmd_demo, resolve_key=_demo_key)
