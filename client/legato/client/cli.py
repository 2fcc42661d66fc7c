"""The `legato` command: run the daemon and work with tasks from a shell.

Human-readable output by default, `--json` for scripts. Errors print one line
to stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legato.client._core import DEFAULT_WORK_LEASE, DEFAULT_WORK_WAIT
from legato.client._sync import Client
from legato.client.errors import LegatoError
from legato.client.models import Agent, Role, Task, TaskEvent, TaskStatus

if TYPE_CHECKING:
    from legato.server.tls import ServerTLS


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, TaskStatus | Role):
        return value.value
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _dump(value: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _task_json(task: Task) -> dict[str, Any]:
    return asdict(task)


def _agent_json(agent: Agent) -> dict[str, Any]:
    return asdict(agent)


def _agent_line(agent: Agent) -> str:
    seen = agent.last_seen_at.isoformat(timespec="minutes") if agent.last_seen_at else "never"
    state = "  REVOKED" if agent.revoked else ""
    labels = " ".join(agent.labels) or "(no labels)"
    return f"{agent.name:<20} {agent.role.value:<6} {labels}  last seen {seen}{state}"


def _event_json(event: TaskEvent) -> dict[str, Any]:
    """An event for scripts; `task` is the event's delta (see TaskEvent.task in the contract)."""
    document: dict[str, Any] = {
        "seq": event.seq,
        "type": event.type.value,
        "actor": event.actor,
        "time": event.time,
        "task": _task_json(event.task),
    }
    if event.output is not None:
        document["output"] = {
            "attempt": event.output.attempt,
            "offset": event.output.offset,
            "text": event.output.text,
        }
    return document


def _task_line(task: Task) -> str:
    parts = [
        task.id,
        task.status.value,
        " ".join(task.labels),
        f"attempt {task.attempt}/{task.max_attempts}",
    ]
    if task.claimed_by and task.status is TaskStatus.CLAIMED:
        parts.append(f"claimed by {task.claimed_by}")
    return "  ".join(parts)


def _task_text(task: Task) -> str:
    lines = [_task_line(task), f"  content:    {task.content}"]
    if task.context:
        lines.append(f"  context:    {_dump(task.context)}")
    if task.result is not None:
        lines.append(f"  result:     {_dump(task.result)}")
    if task.error:
        lines.append(f"  error:      {task.error}")
    if task.question:
        lines.append(f"  question:   {task.question}")
    if task.answer:
        lines.append(f"  answer:     {task.answer}")
    if task.output_size:
        lines.append(f"  output:     {task.output_size} bytes (`legato task tail {task.id}`)")
    lines.append(f"  created by: {task.created_by} at {task.created_at.isoformat()}")
    if task.parent_id:
        lines.append(f"  parent:     {task.parent_id} (root {task.root_id}, depth {task.depth})")
    if task.deadline is not None:
        lines.append(f"  deadline:   {task.deadline.isoformat()}")
    if task.lease_expires_at is not None:
        lines.append(f"  lease ends: {task.lease_expires_at.isoformat()}")
    return "\n".join(lines)


def _tree_node(task: Task) -> str:
    claimed = f"claimed by {task.claimed_by}" if task.claimed_by else "unclaimed"
    content = " ".join(task.content.split())
    if len(content) > 50:
        content = content[:49] + "…"
    return f"{task.id}  {task.status.value}  {' '.join(task.labels)}  {claimed}  {content!r}"


def tree_lines(tasks: Sequence[Task]) -> list[str]:
    """A task tree (as `get_task_tree` returns it) drawn one task a line, children indented.

    The daemon lists tasks in creation order, which is not depth-first: a
    grandchild can come after its uncle. Drawing walks the tree instead.
    """
    ids = {task.id for task in tasks}
    children: dict[str, list[Task]] = {}
    tops: list[Task] = []  # the asked task, and any whose parent is outside the caller's view
    for task in tasks:
        if task.parent_id in ids:
            children.setdefault(task.parent_id, []).append(task)
        else:
            tops.append(task)
    lines: list[str] = []

    def walk(task: Task, prefix: str, branch: str, below: str) -> None:
        lines.append(prefix + branch + _tree_node(task))
        kids = children.get(task.id, [])
        for n, kid in enumerate(kids):
            last = n == len(kids) - 1
            walk(kid, prefix + below, "└─ " if last else "├─ ", "   " if last else "│  ")

    for top in tops:
        walk(top, "", "", "")
    return lines


def _parse_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"legato: {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"legato: {what} must be a JSON object, e.g. '{{\"answer\": 42}}'")
    return value


def _read_arg(text: str) -> str:
    """`-` reads standard input; `@path` reads a file; anything else is literal."""
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@") and Path(text[1:]).is_file():
        return Path(text[1:]).read_text()
    return text


class Output:
    def __init__(self, as_json: bool):
        self.as_json = as_json

    def task(self, task: Task) -> None:
        print(_dump(_task_json(task)) if self.as_json else _task_text(task))

    def event(self, event: TaskEvent) -> None:
        if self.as_json:
            print(_dump(_event_json(event)), flush=True)
        else:
            line = f"{event.seq:>6}  {event.type.value:<9}  {_task_line(event.task)}"
            print(f"{line}  by {event.actor}", flush=True)


# -- commands -------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from legato.server.daemon import (
        EXIT_DATABASE_FAILED,
        AlreadyRunning,
        Config,
        run_event_loop,
        serve,
    )
    from legato.server.paths import UnsafeAddress
    from legato.server.store import DatabaseFailed, Durability
    from legato.server.tls import TLSError

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        tls = _server_tls(args)
    except TLSError as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    config = Config(
        database=args.database or os.environ.get("LEGATO_DATABASE_URL", ""),
        durability=Durability(args.durability),
        grace=args.grace,
        listen=args.listen or "",
        max_open_tasks=args.max_open_tasks,
        watch_buffer=args.watch_buffer,
        tls=tls,
    )
    if args.data_dir:
        config = replace(config, data_dir=Path(args.data_dir))
    try:
        run_event_loop(serve(config))
    except (AlreadyRunning, UnsafeAddress, TLSError, ValueError) as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"legato: cannot start the daemon: {exc}", file=sys.stderr)
        return 1
    except DatabaseFailed as exc:
        print(
            f"legato: the daemon stopped because its database failed ({exc.reason}); "
            "its log above has the traceback. Restart it: nothing acknowledged was lost",
            file=sys.stderr,
        )
        return EXIT_DATABASE_FAILED
    return 0


def _server_tls(args: argparse.Namespace) -> ServerTLS | None:
    """`--tls-cert`, `--tls-key` and `--tls-client-ca` of `legato serve`: all or nothing
    for the first two; the third needs them."""
    from legato.server.tls import ServerTLS, TLSError

    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise TLSError(
            "TLS needs both the daemon's certificate and its key: --tls-cert FILE --tls-key FILE"
            + (" (--tls-client-ca adds client certificates to them)" if args.tls_client_ca else "")
        )
    return ServerTLS(
        cert=Path(args.tls_cert),
        key=Path(args.tls_key),
        client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
    )


def cmd_backup(args: argparse.Namespace) -> int:
    """`legato backup PATH`: an online copy of the daemon's database (see `ops.backup`)."""
    from legato.client.ops import BackupError, backup

    data_dir = Path(args.data_dir) if args.data_dir else None
    try:
        made = backup(Path(args.path), data_dir=data_dir, force=args.force)
    except BackupError as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {made.tasks} tasks and {made.events} events to {made.path} ({made.size} B)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """`legato doctor`: one line per check; exit 0 only if every check is ok."""
    from legato.client.ops import OK, doctor

    checks = doctor(
        data_dir=Path(args.data_dir) if args.data_dir else None,
        address=args.address,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    for check in checks:
        print(check.line())
    return 0 if all(check.status == OK for check in checks) else 1


def cmd_ui(args: argparse.Namespace) -> int:
    """`legato ui`: the web UI, a client of the daemon (see `legato.ui`)."""
    from legato.ui import DEFAULT_LISTEN, UIConfig, run

    config = UIConfig(
        api_key=resolve_key(args.key),
        address=args.address,
        listen=args.listen or DEFAULT_LISTEN,
        open_browser=args.open,
    )
    return run(config)


def resolve_key(explicit: str | None) -> str:
    """--key, else LEGATO_AGENT_KEY, else the admin key the daemon wrote for its user."""
    from legato.server.agents import ADMIN_KEY_FILE
    from legato.server.paths import default_data_dir

    if explicit:
        return explicit
    if os.environ.get("LEGATO_AGENT_KEY"):
        return os.environ["LEGATO_AGENT_KEY"]
    admin_key = default_data_dir() / ADMIN_KEY_FILE
    try:
        return admin_key.read_text().strip()
    except OSError:
        raise SystemExit(
            "legato: no API key: set LEGATO_AGENT_KEY (`legato agent add` prints one), pass "
            f"--key, or run as the user whose daemon wrote {admin_key}"
        ) from None


def _print_new_key(agent: Agent, key: str, out: Output, verb: str) -> None:
    if out.as_json:
        print(_dump({"agent": _agent_json(agent), "api_key": key}))
        return
    labels = " ".join(agent.labels) or "no labels"
    print(f"agent {agent.name} {verb} ({agent.role.value}, {labels})")
    print("API key (shown only now; legato keeps only its hash):\n")
    print(f"  export LEGATO_AGENT_KEY={key}\n")


def cmd_agent_add(client: Client, args: argparse.Namespace, out: Output) -> int:
    agent, key = client.create_agent(args.name, labels=args.label or (), role=args.role)
    _print_new_key(agent, key, out, "created")
    if args.mcp and not out.as_json:
        print(f"For {args.mcp}, add this to its MCP configuration ({_MCP_FILES[args.mcp]}):\n")
        print(_mcp_snippet(args.mcp, key, client))
    return 0


# Where each MCP client keeps the snippet `legato mcp config` prints.
_MCP_FILES = {
    "claude": ".mcp.json in the project, or ~/.claude.json",
    "codex": "~/.codex/config.toml",
    "cursor": ".cursor/mcp.json in the project, or ~/.cursor/mcp.json",
}


def _legato_executable() -> str:
    """The absolute path of this `legato`, for clients that start it themselves."""
    beside_python = Path(sys.executable).with_name("legato")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("legato")
    return str(Path(found).resolve()) if found else str(Path(sys.argv[0]).resolve())


def _mcp_snippet(kind: str, key: str, client: Client) -> str:
    """The snippet that makes an MCP client start `legato mcp` as the agent of `key`,
    reaching the daemon the way `client` does (its address and TLS files)."""
    from legato.client.mcp_bridge import config_snippet

    address = client.address
    if address.startswith("unix:") and not address.startswith("unix:/"):
        address = f"unix:{Path(address.removeprefix('unix:')).resolve()}"
    return config_snippet(
        kind,
        command=_legato_executable(),
        api_key=key,
        address=address,
        tls=client.tls.environment() if client.tls is not None else None,
    )


def cmd_mcp_config(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Prints the MCP configuration for an agent: its key, the daemon, this executable."""
    if args.agent:
        names = {a.name for a in client.list_agents(include_revoked=True)}
        if args.agent in names:
            _, key = client.rotate_key(args.agent)
            print(
                f"legato: issued a new key for {args.agent}; its previous key no longer works",
                file=sys.stderr,
            )
        else:
            _, key = client.create_agent(args.agent, labels=args.label or [f"@{args.agent}"])
            print(f"legato: created agent {args.agent}", file=sys.stderr)
    elif args.key or os.environ.get("LEGATO_AGENT_KEY"):
        key = args.key or os.environ["LEGATO_AGENT_KEY"]
    else:
        raise SystemExit(
            "legato: say which agent the MCP client acts as: --agent NAME (issues it a key), "
            "or --key / LEGATO_AGENT_KEY with that agent's key"
        )
    print(f"# {args.client}: {_MCP_FILES[args.client]}", file=sys.stderr)
    print(_mcp_snippet(args.client, key, client), end="")
    return 0


def cmd_agent_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    for agent in client.list_agents(include_revoked=args.all):
        print(_dump(_agent_json(agent)) if out.as_json else _agent_line(agent))
    return 0


def _show_agent(agent: Agent, out: Output) -> int:
    print(_dump(_agent_json(agent)) if out.as_json else _agent_line(agent))
    return 0


def cmd_agent_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _show_agent(client.get_agent(args.name), out)


def cmd_agent_update(client: Client, args: argparse.Namespace, out: Output) -> int:
    labels = [] if args.no_labels else args.label
    return _show_agent(client.update_agent(args.name, labels=labels, role=args.role), out)


def cmd_agent_revoke(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _show_agent(client.revoke_agent(args.name), out)


def cmd_agent_rotate(client: Client, args: argparse.Namespace, out: Output) -> int:
    agent, key = client.rotate_key(args.name or "")
    _print_new_key(agent, key, out, "has a new key")
    return 0


def cmd_agent_whoami(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _show_agent(client.whoami(), out)


def cmd_history(client: Client, args: argparse.Namespace, out: Output) -> int:
    for event in client.task_history(args.id):
        if out.as_json:
            print(_dump(_event_json(event)))
        else:
            when = event.time.isoformat(timespec="milliseconds")
            detail = event.task.error if event.task.error else ""
            print(
                f"{event.seq:>6}  {when}  {event.type.value:<9}  {event.actor:<16} "
                f"{event.task.status.value}  {detail}".rstrip()
            )
    return 0


def cmd_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    context = _parse_json_object(_read_arg(args.context), "--context") if args.context else None
    handle = client.create_task(
        _read_arg(args.content),
        labels=args.label,
        context=context,
        parent_id=args.parent or "",
        idempotency_key=args.idempotency_key or "",
        max_attempts=args.max_attempts,
        deadline=timedelta(seconds=args.deadline) if args.deadline is not None else None,
    )
    assert handle.task is not None
    for warning in handle.task.warnings:
        print(f"legato: warning: {warning}", file=sys.stderr)
    if args.wait is not None:
        out.task(handle.result(timeout=args.wait or None))
    elif out.as_json:
        assert handle.task is not None
        out.task(handle.task)
    else:
        print(handle.id)
    return 0


def cmd_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.task(client.get_task(args.id))
    return 0


def cmd_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    page_token, shown = args.page_token or "", 0
    while True:
        page = client.list_tasks(
            labels=args.label or (),
            statuses=args.status or (),
            parent_id=args.parent or "",
            page_size=min(args.limit - shown, 1000),
            page_token=page_token,
        )
        for task in page.tasks:
            print(_dump(_task_json(task)) if out.as_json else _task_line(task))
        shown += len(page.tasks)
        page_token = page.next_page_token
        if not page_token or shown >= args.limit:
            break
    if page_token and not out.as_json:
        print(f"(more: --page-token {page_token})", file=sys.stderr)
    return 0


def cmd_claim(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = client.claim(args.label or (), task_id=args.id or "", lease=args.lease, wait=args.wait)
    if job is None:
        print("null" if out.as_json else "nothing to claim")
        return 0
    if out.as_json:
        print(_dump({"lease_token": job.lease_token, "task": _task_json(job.task)}))
    else:
        print(_task_text(job.task))
        print(f"  lease token: {job.lease_token}")
    return 0


def cmd_heartbeat(client: Client, args: argparse.Namespace, out: Output) -> int:
    task, cancel_requested = client.heartbeat(args.id, args.token, lease=args.lease)
    if out.as_json:
        print(_dump({"cancel_requested": cancel_requested, "task": _task_json(task)}))
    elif cancel_requested:
        print(f"{task.id} was canceled: stop working on it")
    else:
        assert task.lease_expires_at is not None
        print(f"{task.id} lease extended to {task.lease_expires_at.isoformat()}")
    return 0


def cmd_complete(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = _parse_json_object(_read_arg(args.result), "--result") if args.result else {}
    out.task(client.complete_task(args.id, args.token, result))
    return 0


def cmd_fail(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.task(client.fail_task(args.id, args.token, _read_arg(args.error), retryable=args.retryable))
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.task(client.cancel_task(args.id, args.reason or "", keep_children=args.keep_children))
    return 0


def cmd_tree(client: Client, args: argparse.Namespace, out: Output) -> int:
    tasks = client.get_task_tree(args.id)
    if out.as_json:
        print(_dump([_task_json(task) for task in tasks]))
    else:
        print("\n".join(tree_lines(tasks)))
    return 0


def cmd_tail(client: Client, args: argparse.Namespace, out: Output) -> int:
    # A watch on an id outside the caller's view would wait in silence: ask first.
    client.get_task(args.id)
    handle = client.get_handle(args.id)
    ends_with_newline = True
    attempt = 0
    # The current attempt's output, then what follows; an abandoned attempt's
    # text is not shown again.
    for chunk in handle.output_chunks():
        if out.as_json:
            print(_dump({"attempt": chunk.attempt, "offset": chunk.offset, "text": chunk.text}))
            sys.stdout.flush()
            continue
        if attempt and chunk.attempt != attempt:
            print(f"\nlegato: attempt {chunk.attempt} starts over", file=sys.stderr, flush=True)
        attempt = chunk.attempt
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        ends_with_newline = chunk.text.endswith("\n")
    task = handle.task
    assert task is not None
    assert task.status.terminal
    if not ends_with_newline and sys.stdout.isatty():
        print()  # keep the status line off the last line of output
    reason = f": {task.error}" if task.error and task.status is not TaskStatus.DONE else ""
    print(f"legato: task {task.id} {task.status.value}{reason}", file=sys.stderr)
    return 0 if task.status is TaskStatus.DONE else 1


def cmd_answer(client: Client, args: argparse.Namespace, out: Output) -> int:
    answer = _read_arg(args.text)
    if args.text == "-":
        answer = answer.rstrip("\n")  # what `echo` adds is not part of the answer
    out.task(client.provide_input(args.id, answer))
    return 0


def cmd_work(client: Client, args: argparse.Namespace, out: Output) -> int:
    from legato.client.worker import Worker

    worker = Worker(
        client,
        args.labels,
        args.command_argv,
        api_key=args.api_key,
        lease=args.lease,
        wait=args.wait,
    )
    return worker.run(once=args.once)


def cmd_demo(client: Client, args: argparse.Namespace, out: Output) -> int:
    from legato.client.demo import run_demo

    return run_demo(client, pace=args.pace)


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    for event in client.watch(
        labels=args.labels, task_ids=args.task or (), after_seq=args.after_seq
    ):
        out.event(event)
    return 0


# -- parser ---------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


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


def _add_client_tls(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--address", help="daemon address (default: LEGATO_ADDRESS or the default socket)"
    )
    connection.add_argument(
        "--key", help="API key (default: LEGATO_AGENT_KEY, else the admin key of your daemon)"
    )
    _add_client_tls(connection)
    common = argparse.ArgumentParser(add_help=False, parents=[connection])
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    parser = argparse.ArgumentParser(
        prog="legato", description="Delegate tasks between AI coding agents through a local daemon."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--listen", help="unix:PATH or HOST:PORT (default: a private unix socket)")
    serve.add_argument(
        "--data-dir", help="where the database lives (default: the per-user data dir)"
    )
    serve.add_argument(
        "--database",
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB: a database shared by several daemons "
        "(default: LEGATO_DATABASE_URL, else the SQLite file in the data dir)",
    )
    serve.add_argument(
        "--durability",
        choices=["normal", "full"],
        default="normal",
        help="normal survives a daemon crash; full also survives power loss",
    )
    serve.add_argument(
        "--grace", type=float, default=5.0, help="seconds to drain calls on shutdown"
    )
    serve.add_argument(
        "--max-open-tasks",
        type=_positive_int,
        default=1000,
        help="pending + claimed tasks one agent may have created (default 1000)",
    )
    serve.add_argument(
        "--watch-buffer",
        type=_positive_int,
        default=10_000,
        help="events a watcher may leave unread before it is cut off (default 10000)",
    )
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve TLS (HOST:PORT only) with this certificate (PEM, naming the host clients "
        "connect to)",
    )
    serve.add_argument(
        "--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM, mode 0600)"
    )
    serve.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="mutual TLS: accept only clients with a certificate signed by this CA",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=cmd_serve)

    backup = commands.add_parser(
        "backup", help="copy the daemon's database to PATH while it serves (online, consistent)"
    )
    backup.add_argument("path", help="the file to write (mode 0600)")
    backup.add_argument(
        "--data-dir",
        help="the daemon's data dir (default: LEGATO_DATA_DIR or the per-user data dir)",
    )
    backup.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    backup.set_defaults(run=cmd_backup)

    doctor = commands.add_parser(
        "doctor", help="check the data dir, database, daemon and admin key; say what to fix"
    )
    doctor.add_argument(
        "--data-dir",
        help="the daemon's data dir (default: LEGATO_DATA_DIR or the per-user data dir)",
    )
    doctor.add_argument(
        "--address", help="daemon address (default: LEGATO_ADDRESS or the default socket)"
    )
    _add_client_tls(doctor)
    doctor.set_defaults(run=cmd_doctor)

    ui = commands.add_parser(
        "ui",
        help="a web UI: every agent's tasks, live, and a hand to answer or cancel",
        parents=[connection],
    )
    ui.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="where to serve (default 127.0.0.1:8731; port 0 picks one); keep it on loopback",
    )
    ui.add_argument("--open", action="store_true", help="open the link in the default browser")
    ui.set_defaults(run=cmd_ui)

    work = commands.add_parser(
        "work",
        help="run a command for each task of your labels",
        parents=[connection],
        usage="legato work [@LABEL ...] [--lease S] [--wait S] [--once] -- COMMAND [ARGS ...]",
        description=(
            "Claims tasks for the labels (default: all of yours) and runs COMMAND for each: the "
            "task's content on stdin, the task as JSON in LEGATO_TASK and in the file "
            "LEGATO_TASK_FILE, its id in LEGATO_TASK_ID. stdout streams to the task as output; "
            'exit 0 completes the task with {"output": STDOUT, "exit_code": 0}, anything else '
            "fails it. Ctrl-C stops the command and hands the task back for another worker."
        ),
    )
    work.add_argument("labels", nargs="*", metavar="@LABEL", help="claim tasks with these labels")
    work.add_argument(
        "--lease",
        type=_positive_float,
        default=DEFAULT_WORK_LEASE,
        metavar="SECONDS",
        help=f"seconds a claim holds between heartbeats (default {DEFAULT_WORK_LEASE:g}); "
        "a cancel is noticed within a third of it",
    )
    work.add_argument(
        "--wait",
        type=_seconds,
        default=DEFAULT_WORK_WAIT,
        metavar="SECONDS",
        help=f"seconds one long-poll claim waits, at most 60 (default {DEFAULT_WORK_WAIT:g})",
    )
    work.add_argument(
        "--once", action="store_true", help="handle one task, then exit: 0 if it is done, else 1"
    )
    work.set_defaults(run=cmd_work)

    demo = commands.add_parser(
        "demo",
        help="play a delegation between three demo agents on the running daemon",
        parents=[connection],
    )
    demo.add_argument(
        "--pace",
        type=_seconds,
        default=0.8,
        metavar="SECONDS",
        help="seconds between steps, for reading along (default 0.8)",
    )
    demo.set_defaults(run=cmd_demo)

    mcp = commands.add_parser(
        "mcp",
        help="serve legato's tools to an MCP client over stdio (reads LEGATO_AGENT_KEY)",
        description="Without an action: the MCP server an MCP client starts. "
        "`legato mcp config` prints the client configuration that starts it.",
    )
    mcp_actions = mcp.add_subparsers(dest="action", metavar="ACTION")
    mcp_config = mcp_actions.add_parser(
        "config", help="print the MCP client configuration for an agent", parents=[common]
    )
    mcp_config.add_argument("--client", required=True, choices=sorted(_MCP_FILES))
    mcp_config.add_argument(
        "--agent", help="the agent it acts as: created if new, else given a new key (admin)"
    )
    mcp_config.add_argument(
        "-l", "--label", action="append", help="labels of a new --agent (default @NAME)"
    )
    mcp_config.set_defaults(run=cmd_mcp_config)

    def group(
        name: str, help: str
    ) -> Callable[[str, Callable[..., int], str], argparse.ArgumentParser]:
        """A command with actions (`legato task create`), each taking the common options."""
        actions = commands.add_parser(name, help=help).add_subparsers(
            dest="action", required=True, metavar="ACTION"
        )

        def action(name: str, run: Callable[..., int], help: str) -> argparse.ArgumentParser:
            sub = actions.add_parser(name, help=help, parents=[common])
            sub.set_defaults(run=run)
            return sub

        return action

    action = group("task", "create, claim, finish and watch tasks")

    create = action("create", cmd_create, "create a task for other agents")
    create.add_argument("content", help="what to do (- reads stdin)")
    create.add_argument(
        "-l", "--label", action="append", required=True, help="route to @label (repeatable)"
    )
    create.add_argument(
        "--context", help="JSON object of structured input (- reads stdin, @file reads a file)"
    )
    create.add_argument("--parent", help="parent task id")
    create.add_argument("--idempotency-key", help="makes the create safe to retry")
    create.add_argument(
        "--max-attempts", type=int, default=0, help="claims before it fails for good (default 3)"
    )
    create.add_argument("--wait", type=float, nargs="?", const=0.0, metavar="SECONDS",
                        help="wait for the result (for SECONDS at most)")  # fmt: skip
    create.add_argument(
        "--deadline",
        type=_positive_float,
        metavar="SECONDS",
        help="fail the task if it has not finished SECONDS from now",
    )

    get = action("get", cmd_get, "show one task")
    get.add_argument("id")

    listing = action("list", cmd_list, "list tasks, oldest first")
    listing.add_argument(
        "-l", "--label", action="append", help="only tasks with this label (repeatable)"
    )
    listing.add_argument("--status", action="append", choices=[s.value for s in TaskStatus])
    listing.add_argument("--parent", help="only children of this task")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.add_argument("--page-token", help="continue a previous listing")

    claim = action("claim", cmd_claim, "claim the oldest pending task for your labels")
    claim.add_argument("-l", "--label", action="append", help="claim from @label (repeatable)")
    claim.add_argument("--id", help="claim this task instead")
    claim.add_argument(
        "--lease", type=float, help="seconds the claim holds without a heartbeat (default 300)"
    )
    claim.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="with nothing to claim, wait up to SECONDS (at most 60) for a task",
    )

    heartbeat = action("heartbeat", cmd_heartbeat, "extend the lease of a claimed task")
    heartbeat.add_argument("id")
    heartbeat.add_argument("--token", required=True, help="the lease token from claim")
    heartbeat.add_argument("--lease", type=float, help="new lease in seconds")

    complete = action("complete", cmd_complete, "finish a claimed task with a result")
    complete.add_argument("id")
    complete.add_argument("--token", required=True, help="the lease token from claim")
    complete.add_argument("--result", help="JSON object (- reads stdin, @file reads a file)")

    fail = action("fail", cmd_fail, "fail a claimed task")
    fail.add_argument("id")
    fail.add_argument("--token", required=True, help="the lease token from claim")
    fail.add_argument("--error", required=True, help="why it failed")
    fail.add_argument("--retryable", action="store_true", help="requeue it if attempts remain")

    cancel = action("cancel", cmd_cancel, "cancel a pending or claimed task")
    cancel.add_argument("id")
    cancel.add_argument("--reason", help="why")
    cancel.add_argument(
        "--keep-children", action="store_true", help="leave its unfinished child tasks running"
    )

    tree = action("tree", cmd_tree, "show a task and the tasks delegated under it")
    tree.add_argument("id")

    tail = action("tail", cmd_tail, "print a task's output as it is written, until it ends")
    tail.add_argument("id")

    answer = action("answer", cmd_answer, "answer the question a task's worker asked")
    answer.add_argument("id")
    answer.add_argument("text", help="the answer (- reads stdin, @file reads a file)")

    history = action("history", cmd_history, "who created, claimed, finished a task, and when")
    history.add_argument("id")

    watch = action("watch", cmd_watch, "print task events live")
    watch.add_argument(
        "labels", nargs="*", help="labels to watch, e.g. @researcher (none: every task you see)"
    )
    watch.add_argument("--task", action="append", help="watch this task id (repeatable)")
    watch.add_argument("--after-seq", type=int, help="replay stored events after this seq first")

    agent_action = group("agent", "manage agents and their keys (admin)")

    add = agent_action("add", cmd_agent_add, "create an agent and print its key")
    add.add_argument("name")
    add.add_argument("-l", "--label", action="append", help="route @label to it (repeatable)")
    add.add_argument("--role", choices=[r.value for r in Role], default="agent")
    add.add_argument(
        "--mcp", choices=sorted(_MCP_FILES), help="also print the configuration for this MCP client"
    )

    agent_list = agent_action("list", cmd_agent_list, "list agents")
    agent_list.add_argument("--all", action="store_true", help="include revoked agents")

    agent_get = agent_action("get", cmd_agent_get, "show one agent")
    agent_get.add_argument("name")

    update = agent_action("update", cmd_agent_update, "replace an agent's labels or role")
    update.add_argument("name")
    update.add_argument("-l", "--label", action="append", help="the new labels (repeatable)")
    update.add_argument("--no-labels", action="store_true", help="remove every label")
    update.add_argument("--role", choices=[r.value for r in Role])

    revoke = agent_action("revoke", cmd_agent_revoke, "revoke an agent and its key for good")
    revoke.add_argument("name")

    rotate = agent_action("rotate", cmd_agent_rotate, "issue a new key; the old one stops at once")
    rotate.add_argument("name", nargs="?", help="default: the agent of the key in use")

    agent_action("whoami", cmd_agent_whoami, "show the agent of the key in use")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `legato` command."""
    parser = build_parser()
    options, command = split_command(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(options)
    if args.command in ("serve", "backup", "doctor", "ui"):  # no sync client
        return int(args.run(args))
    if args.command == "mcp" and args.action is None:
        from legato.client.mcp_bridge import run

        run()
        return 0
    if args.command == "work":
        from legato.client.worker import check_command

        check_command(command)
        args.command_argv = command
    if args.command == "demo":
        from legato.client.demo import demo_key

        key = demo_key(args.key)
    else:
        key = resolve_key(args.key)
    args.api_key = key  # `legato work` hands it on to the command it runs
    try:
        with Client(
            args.address,
            api_key=key,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ) as client:
            return int(args.run(client, args, Output(getattr(args, "json", False))))
    except (LegatoError, TimeoutError, ValueError, PermissionError) as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
