"""`legato demo`: the whole delegation story, played on the running daemon in ~10 s.

Three throwaway agents (names with a random suffix, so runs never collide):

    coder       delegates a question to @researcher-XXXX and follows it live
    researcher  streams notes, delegates a child task to @specialist-XXXX,
                asks the coder a question back, completes with the specialist's result
    specialist  works the child task

Then the task tree is printed and the demo cleans up: whatever it left
unfinished (a story cut short by an error or Ctrl-C) is canceled, and the
three agents are revoked.

One thread drives the story step by step; the coder follows its task's events
in a second thread. After each step that the coder should see, the driver
waits until the coder has printed it, so the transcript is the same every run.
"""

from __future__ import annotations

import json
import queue
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from legato.client._sync import Client, Job, TaskHandle
from legato.client.cli.output import tree_lines
from legato.client.errors import LegatoError, UnavailableError
from legato.client.local import resolve_key
from legato.client.models import EventType, Role, TaskStatus

# Every wait of the story is bounded: a stuck demo fails instead of hanging.
STEP_TIMEOUT = 15.0
START_HINT = (
    "start one with `legato serve --detach` (or `make run` in another terminal), then run the demo"
)

QUESTION = "Which rate limit applies to Tier 1, and how should our client back off?"
NOTES = (
    "Reading the API docs on rate limits…",
    "Tier 1 allows 500 requests per minute, 30 000 tokens per minute.",
    "Backoff needs care: asking a specialist.",
)
CHILD = "Recommend a retry policy for a client limited to 500 requests per minute."
CHILD_NOTE = "Simulating bursts of 50 calls against a 500 RPM bucket…"
CHILD_RESULT = {"policy": "exponential backoff, full jitter", "base_ms": 250, "max_retries": 5}
ASK = "Is your client sync or async?"
ANSWER = "async (asyncio), one shared client"


def demo_key(explicit: str | None) -> str:
    """The admin key, or one line on how to start the daemon (which writes it) and exit 1."""
    try:
        return resolve_key(explicit)
    except SystemExit:
        print(f"legato demo: no daemon has run here yet; {START_HINT}", file=sys.stderr)
        raise SystemExit(1) from None


class Transcript:
    """Prints the story one line per step, from any thread, paced for reading."""

    def __init__(self, pace: float):
        self._pace = pace
        self._lock = threading.Lock()

    def say(self, who: str, text: str) -> None:
        """One line of the story, `who` in a column of its own."""
        with self._lock:
            print(f"{who:<10} {text}", flush=True)

    def pause(self) -> None:
        """Leaves the last line on screen for a moment before the next step."""
        time.sleep(self._pace)  # for the reader's eyes only; the story does not depend on it


class CoderFollower:
    """The coder's side: follows its task live, answers the question, reports the result."""

    def __init__(self, handle: TaskHandle, transcript: Transcript):
        self._handle = handle
        self._say = transcript.say
        self._seen: queue.Queue[EventType | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for event in self._handle.events(timeout=STEP_TIMEOUT * 4):
                if event.type is EventType.OUTPUT and event.output is not None:
                    self._say("coder", f"← researcher (streaming): {event.output.text.rstrip()}")
                elif event.type is EventType.INPUT_REQUESTED:
                    # Printed before answering: the researcher prints what it got
                    # only once the answer is stored, so the lines stay in order.
                    self._say("coder", f"→ researcher: {ANSWER}")
                    self._handle.answer(ANSWER)
                elif event.type is EventType.COMPLETED:
                    result = json.dumps(event.task.result, sort_keys=True)
                    self._say("coder", f"← result: {result}")
                self._seen.put(event.type)
        except BaseException as exc:
            self._seen.put(exc)

    def saw(self, expected: EventType) -> None:
        """Waits until the coder has handled an event of type `expected`."""
        while True:
            try:
                seen = self._seen.get(timeout=STEP_TIMEOUT)
            except queue.Empty:
                raise TimeoutError(f"the coder saw no {expected.value} event") from None
            if isinstance(seen, BaseException):
                raise RuntimeError(f"the coder stopped following: {seen}") from seen
            if seen is expected:
                return


@contextmanager
def demo_agents(admin: Client, suffix: str) -> Iterator[dict[str, Client]]:
    """Creates coder/researcher/specialist-SUFFIX; revokes them on the way out."""
    clients: dict[str, Client] = {}
    created: list[str] = []
    try:
        with ExitStack() as stack:
            for role in ("coder", "researcher", "specialist"):
                name = f"{role}-{suffix}"
                labels = [] if role == "coder" else [f"@{name}"]
                _, key = admin.create_agent(name, labels=labels)
                created.append(name)
                clients[role] = stack.enter_context(Client(admin.address, api_key=key))
            yield clients
    finally:
        _cancel_unfinished(admin, suffix)
        for name in created:
            try:
                admin.revoke_agent(name)
            except LegatoError as exc:
                print(f"legato demo: could not revoke {name}: {exc}", file=sys.stderr)
        if created:
            print(f"\nrevoked the demo agents: {', '.join(created)}", flush=True)


def _cancel_unfinished(admin: Client, suffix: str) -> None:
    """Cancels the demo's tasks that did not finish, so no worker ever picks them up."""
    labels = [f"@researcher-{suffix}", f"@specialist-{suffix}"]
    try:
        page = admin.list_tasks(
            labels=labels,
            statuses=[s for s in TaskStatus if not s.terminal],
        )
        for task in page.tasks:
            admin.cancel_task(task.id, "the demo stopped", keep_children=False)
    except LegatoError as exc:
        print(f"legato demo: could not cancel its unfinished tasks: {exc}", file=sys.stderr)


def run_demo(admin: Client, *, pace: float = 0.8) -> int:
    """Plays the story with `admin` (an admin's client); 0 when it ran to the end."""
    try:
        me = admin.whoami()
    except UnavailableError:
        print(
            f"legato demo: no daemon is running at {admin.address}; {START_HINT}", file=sys.stderr
        )
        return 1
    if me.role is not Role.ADMIN:
        print(
            f"legato demo: {me.name} is not an admin; the demo creates agents, so it needs the "
            "admin key (unset LEGATO_AGENT_KEY to use the one your daemon wrote)",
            file=sys.stderr,
        )
        return 1
    taken = {agent.name for agent in admin.list_agents(include_revoked=True)}
    suffix = secrets.token_hex(2)
    while f"coder-{suffix}" in taken:  # names of revoked agents stay taken
        suffix = secrets.token_hex(2)
    transcript = Transcript(pace)
    with demo_agents(admin, suffix) as agents:
        print(
            f"legato demo on {admin.address}: coder-{suffix}, researcher-{suffix}, "
            f"specialist-{suffix}\n",
            flush=True,
        )
        try:
            root = _story(agents, suffix, transcript)
        except (LegatoError, TimeoutError, RuntimeError) as exc:
            print(f"legato demo: the story stopped: {exc}", file=sys.stderr)
            return 1
        print("\ntask tree:", flush=True)
        print("\n".join(tree_lines(admin.get_task_tree(root))), flush=True)
    return 0


def _story(agents: dict[str, Client], suffix: str, transcript: Transcript) -> str:
    """The delegation itself; returns the id of the coder's task."""
    say, pause = transcript.say, transcript.pause
    coder, researcher, specialist = agents["coder"], agents["researcher"], agents["specialist"]
    researcher_label, specialist_label = f"@researcher-{suffix}", f"@specialist-{suffix}"

    handle = coder.delegate(researcher_label, QUESTION)
    say("coder", f"→ {researcher_label}: {QUESTION}  [{handle.id}]")
    follower = CoderFollower(handle, transcript)
    pause()

    job = _claim(researcher, researcher_label)
    say("researcher", f"✓ claimed {job.id}")
    pause()
    for note in NOTES:
        job.write(note + "\n")
        follower.saw(EventType.OUTPUT)
        pause()

    child = researcher.delegate(specialist_label, CHILD, parent_id=job.id)
    say("researcher", f"→ {specialist_label}: {CHILD}  [{child.id}]")
    pause()
    child_job = _claim(specialist, specialist_label)
    say("specialist", f"✓ claimed {child_job.id} (child of {job.id})")
    pause()
    child_job.write(CHILD_NOTE + "\n")
    say("specialist", f"⋯ {CHILD_NOTE}")
    pause()

    say("researcher", f"→ coder: {ASK}")
    answer = job.ask(ASK, timeout=STEP_TIMEOUT)
    say("researcher", f"← coder: {answer}")
    pause()

    child_job.complete(CHILD_RESULT)
    say("specialist", f"✓ done: {json.dumps(CHILD_RESULT, sort_keys=True)}")
    pause()
    backoff = child.result(timeout=STEP_TIMEOUT).result or {}
    say("researcher", f"← specialist: {json.dumps(backoff, sort_keys=True)}")
    pause()

    result: dict[str, Any] = {
        "rate_limit": "500 requests/minute (Tier 1)",
        "client": answer,
        "backoff": backoff,
    }
    # Said before it is done: the coder prints the result as soon as it is.
    say("researcher", "✓ done")
    job.complete(result)
    follower.saw(EventType.COMPLETED)
    return handle.id


def _claim(client: Client, label: str) -> Job:
    job = client.claim([label], wait=STEP_TIMEOUT)
    if job is None:
        raise TimeoutError(f"nothing to claim on {label}")
    return job
