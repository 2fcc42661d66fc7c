"""`legato task ...`: create, claim, finish, follow and inspect tasks."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from legato.client._sync import Client
from legato.client.cli.output import (
    Output,
    dump,
    event_json,
    parse_json_object,
    read_arg,
    task_json,
    task_table,
    task_text,
    tree_lines,
)
from legato.client.models import TaskStatus

if TYPE_CHECKING:
    from legato.client.cli import Parents


def cmd_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    context = parse_json_object(read_arg(args.context), "--context") if args.context else None
    handle = client.create_task(
        read_arg(args.content),
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
    if args.wait is None:
        if out.as_json:
            out.task(handle.task)
        else:
            print(handle.id)
        return 0
    try:
        out.task(handle.result(timeout=args.wait or None))
    except TimeoutError:
        # The task exists and goes on: a script must learn its id to follow it.
        if out.as_json:
            out.task(handle.task)
        else:
            print(handle.id)
        print(
            f"legato: task {handle.id} did not finish within {args.wait:g} s; it goes on: "
            f"`legato task get {handle.id}`, or `legato task tail {handle.id}`",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.task(client.get_task(args.id))
    return 0


def cmd_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    page_token, shown = args.page_token or "", 0
    tasks = []
    while True:
        page = client.list_tasks(
            labels=args.label or (),
            statuses=args.status or (),
            parent_id=args.parent or "",
            page_size=min(args.limit - shown, 1000),
            page_token=page_token,
        )
        if out.as_json:
            for task in page.tasks:
                print(dump(task_json(task)))
        else:
            tasks.extend(page.tasks)
        shown += len(page.tasks)
        page_token = page.next_page_token
        if not page_token or shown >= args.limit:
            break
    if not out.as_json:
        if tasks:
            print("\n".join(line.rstrip() for line in task_table(tasks)))
        else:
            print("no tasks", file=sys.stderr)
        if page_token:
            print(f"(more: --page-token {page_token})", file=sys.stderr)
    return 0


def cmd_claim(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = client.claim(args.label or (), task_id=args.id or "", lease=args.lease, wait=args.wait)
    if job is None:
        print("null" if out.as_json else "nothing to claim")
        return 0
    if out.as_json:
        print(dump({"lease_token": job.lease_token, "task": task_json(job.task)}))
    else:
        print(task_text(job.task))
        print(f"  lease token: {job.lease_token}")
    return 0


def cmd_heartbeat(client: Client, args: argparse.Namespace, out: Output) -> int:
    task, cancel_requested = client.heartbeat(args.id, args.token, lease=args.lease)
    if out.as_json:
        print(dump({"cancel_requested": cancel_requested, "task": task_json(task)}))
    elif cancel_requested:
        print(f"{task.id} was canceled: stop working on it")
    else:
        assert task.lease_expires_at is not None
        print(f"{task.id} lease extended to {task.lease_expires_at.isoformat()}")
    return 0


def cmd_complete(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = parse_json_object(read_arg(args.result), "--result") if args.result else {}
    out.task(client.complete_task(args.id, args.token, result))
    return 0


def cmd_fail(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.task(client.fail_task(args.id, args.token, read_arg(args.error), retryable=args.retryable))
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.task(client.cancel_task(args.id, args.reason or "", keep_children=args.keep_children))
    return 0


def cmd_tree(client: Client, args: argparse.Namespace, out: Output) -> int:
    tasks = client.get_task_tree(args.id)
    if out.as_json:
        print(dump([task_json(task) for task in tasks]))
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
            print(dump({"attempt": chunk.attempt, "offset": chunk.offset, "text": chunk.text}))
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
    answer = read_arg(args.text)
    if args.text == "-":
        answer = answer.rstrip("\n")  # what `echo` adds is not part of the answer
    out.task(client.provide_input(args.id, answer))
    return 0


def cmd_history(client: Client, args: argparse.Namespace, out: Output) -> int:
    for event in client.task_history(args.id):
        if out.as_json:
            print(dump(event_json(event)))
        else:
            when = event.time.isoformat(timespec="milliseconds")
            detail = event.task.error if event.task.error else ""
            print(
                f"{event.seq:>6}  {when}  {event.type.value:<9}  {event.actor:<16} "
                f"{event.task.status.value}  {detail}".rstrip()
            )
    return 0


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    for event in client.watch(
        labels=args.labels, task_ids=args.task or (), after_seq=args.after_seq
    ):
        out.event(event)
    return 0


def register(commands: Any, parents: Parents) -> None:
    """Adds `legato task` and its actions."""
    from legato.client.cli import group, positive_float, seconds

    action = group(commands, "task", "create, claim, finish and watch tasks", parents)

    create = action("create", cmd_create, "create a task for other agents; prints its id")
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
                        help="wait for the result (for SECONDS at most); on timeout prints the "
                        "id and exits 1")  # fmt: skip
    create.add_argument(
        "--deadline",
        type=positive_float,
        metavar="SECONDS",
        help="fail the task if it has not finished SECONDS from now",
    )

    get = action("get", cmd_get, "show one task")
    get.add_argument("id")

    listing = action(
        "list", cmd_list, "list tasks, oldest first: id, status, age, creator, labels, content"
    )
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
        type=seconds,
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
