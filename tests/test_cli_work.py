"""`legato work`, `legato task tree/tail/answer` and `legato demo`, run as real
processes against a real daemon process.

The tests wait on what the processes and the daemon do (a process exit, a line
on a pipe, a watched event), never on a clock of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from legato.client import Client, EventType, TaskStatus
from legato.client.worker import OutputStream

LEGATO = Path(sys.executable).with_name("legato")
# The most any process or wait may take before the test fails instead of hanging.
GUARD = 20.0


@dataclass(frozen=True)
class Daemon:
    """A `python -m legato.server` process, shared by the tests of this module."""

    address: str
    data_dir: Path
    admin_key: str

    def env(self, key: str | None = None) -> dict[str, str]:
        """The environment of a `legato` run: as the agent of `key`, else as the
        admin whose key the daemon wrote into its data dir."""
        env = {k: v for k, v in os.environ.items() if k != "LEGATO_AGENT_KEY"}
        env.update(LEGATO_ADDRESS=self.address, LEGATO_DATA_DIR=str(self.data_dir))
        if key is not None:
            env["LEGATO_AGENT_KEY"] = key
        return env


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


# One daemon for the module: each test works with its own agents and labels.
@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    tmp = Path(tempfile.mkdtemp(prefix="lg-"))
    data_dir = tmp / "data"
    with (tmp / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "legato.server", "--data-dir", str(data_dir),
             "--listen", f"unix:{tmp}/legato.sock", "--grace", "1"],
            stdout=subprocess.PIPE,
            stderr=log,
        )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("legato serving on"), (tmp / "daemon.log").read_text()
        admin_key = (data_dir / "admin.key").read_text().strip()
        yield Daemon(f"unix:{tmp}/legato.sock", data_dir, admin_key)
    finally:
        process.terminate()
        try:
            process.wait(GUARD)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def admin(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.address, api_key=daemon.admin_key, timeout=GUARD) as client:
        yield client


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started; any still running at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def new_agent(admin: Client, name: str, labels: list[str]) -> str:
    """Creates agent `name` holding `labels`; its API key."""
    _, key = admin.create_agent(name, labels=labels)
    return key


def legato(daemon: Daemon, *args: str, key: str | None = None, stdin: str = "") -> Ran:
    """Runs `legato ARGS` to the end."""
    ran = subprocess.run(
        [str(LEGATO), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=daemon.env(key),
        timeout=GUARD,
        check=False,
    )
    return Ran(ran.returncode, ran.stdout, ran.stderr)


def start(
    processes: list[subprocess.Popen[str]], daemon: Daemon, *args: str, key: str | None = None
) -> subprocess.Popen[str]:
    """Starts `legato ARGS` with its stdout and stderr on pipes."""
    process = subprocess.Popen(
        [str(LEGATO), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=daemon.env(key),
    )
    processes.append(process)
    return process


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- legato work --------------------------------------------------------------------------


def test_work_once_completes_the_task_with_what_cat_printed(daemon: Daemon, admin: Client) -> None:
    key = new_agent(admin, "echo-worker", ["@echo"])
    content = "first line of the task\nsecond line, ünïcödé\n"
    handle = admin.create_task(content, labels=["@echo"])

    ran = legato(daemon, "work", "@echo", "--once", "--", "cat", key=key)

    assert ran.code == 0, ran.stderr
    assert ran.stdout == ""
    task = admin.get_task(handle.id)
    assert (task.status, task.claimed_by) == (TaskStatus.DONE, "echo-worker")
    assert task.result == {"output": content, "exit_code": 0}
    # It was streamed as output, not only put in the result.
    streamed = [e.output for e in admin.task_history(handle.id) if e.type is EventType.OUTPUT]
    assert streamed
    assert "".join(chunk.text for chunk in streamed if chunk) == content
    assert task.output == content
    status = ran.stderr.splitlines()
    assert any(f"claimed {handle.id}" in line for line in status), ran.stderr
    assert any(f"done {handle.id}" in line for line in status), ran.stderr


def test_the_command_gets_the_task_as_json_in_its_environment(
    daemon: Daemon, admin: Client
) -> None:
    key = new_agent(admin, "env-worker", ["@env"])
    handle = admin.create_task("look at your environment", labels=["@env"], context={"n": 1})
    script = 'printf "%s\\n%s\\n" "$LEGATO_TASK_ID" "$LEGATO_TASK"; cat "$LEGATO_TASK_FILE"'

    ran = legato(daemon, "work", "@env", "--once", "--", "sh", "-c", script, key=key)

    assert ran.code == 0, ran.stderr
    result = admin.get_task(handle.id).result
    assert result is not None
    task_id, in_env, in_file = result["output"].split("\n", 2)
    assert task_id == handle.id
    task = json.loads(in_env)
    assert json.loads(in_file) == task
    assert task["id"] == handle.id
    assert task["content"] == "look at your environment"
    assert (task["labels"], task["context"], task["created_by"]) == (["@env"], {"n": 1}, "admin")
    assert (task["parent_id"], task["attempt"]) == ("", 1)


def test_a_task_too_large_for_the_environment_is_in_the_task_file(
    daemon: Daemon, admin: Client
) -> None:
    key = new_agent(admin, "large-worker", ["@large"])
    # Linux refuses to start a program with an environment string over 128 KiB.
    context = {"diff": "x" * 200_000}
    handle = admin.create_task("review this diff", labels=["@large"], context=context)
    script = 'printf "%s\\n" "${LEGATO_TASK:-unset}"; cat "$LEGATO_TASK_FILE"'

    ran = legato(daemon, "work", "@large", "--once", "--", "sh", "-c", script, key=key)

    assert ran.code == 0, ran.stderr
    result = admin.get_task(handle.id).result
    assert result is not None
    in_env, in_file = result["output"].split("\n", 1)
    assert in_env == "unset"
    assert json.loads(in_file)["context"] == context


def test_output_streams_in_order_while_the_command_runs(
    daemon: Daemon, admin: Client, processes: list[subprocess.Popen[str]], short_tmp: Path
) -> None:
    key = new_agent(admin, "stream-worker", ["@stream"])
    gate = short_tmp / "gate"
    os.mkfifo(gate)
    # The command prints two lines, then blocks until the test opens the gate.
    script = 'echo one; echo two; read go < "$1"; echo three; echo four'
    handle = admin.create_task("count to four", labels=["@stream"])

    worker = start(processes, daemon, "work", "@stream", "--once", "--",
                   "sh", "-c", script, "sh", str(gate), key=key)  # fmt: skip
    chunks: list[tuple[int, str]] = []
    with closing(handle.events(timeout=GUARD)) as events:
        for event in events:
            if event.output is None:
                continue
            chunks.append((event.output.offset, event.output.text))
            if "".join(text for _, text in chunks) == "one\ntwo\n":
                # Output before the command finished: it is waiting on the gate.
                assert event.task.status is TaskStatus.CLAIMED
                with gate.open("w") as opened:
                    opened.write("go\n")

    assert worker.wait(GUARD) == 0, worker.communicate()[1]
    assert "".join(text for _, text in chunks) == "one\ntwo\nthree\nfour\n"
    assert len(chunks) >= 2
    # In order, with no gap or overlap: each chunk starts where the previous ended.
    ends = [0]
    for offset, text in chunks:
        assert offset == ends[-1]
        ends.append(offset + len(text.encode()))
    assert admin.get_task(handle.id).result == {"output": "one\ntwo\nthree\nfour\n", "exit_code": 0}


def test_a_blank_line_or_a_split_character_streams_with_the_text_after_it(
    daemon: Daemon, admin: Client
) -> None:
    """What a command writes arrives in arbitrary pieces: a lone blank line
    (which the daemon refuses as a chunk of its own) and half a character wait
    for what follows."""
    key = new_agent(admin, "pieces-worker", ["@pieces"])
    handle = admin.create_task("write in pieces", labels=["@pieces"])
    with Client(daemon.address, api_key=key) as worker:
        job = worker.claim(["@pieces"])
        assert job is not None
        stream = OutputStream(job)
        for piece in (b"one\n", b"\n", b"two caf\xc3", b"\xa9\n", b"\n"):
            stream.feed(piece)
            stream.flush()
        stream.finish()
        stream.flush_final()
        job.complete(stream.result())

    chunks = [e.output.text for e in admin.task_history(handle.id) if e.output is not None]
    assert chunks == ["one\n", "\ntwo caf", "é\n"]
    # A blank end cannot be a chunk; the result has all of it.
    assert admin.get_task(handle.id).result == {"output": "one\n\ntwo café\n\n", "exit_code": 0}


def test_a_failing_command_fails_the_task_with_its_exit_code_and_stderr(
    daemon: Daemon, admin: Client
) -> None:
    key = new_agent(admin, "failing-worker", ["@failing"])
    handle = admin.create_task("this will not work", labels=["@failing"])

    ran = legato(daemon, "work", "@failing", "--once", "--",
                 "sh", "-c", "echo oops >&2; exit 3", key=key)  # fmt: skip

    assert ran.code == 1
    assert ran.stdout == ""
    task = admin.get_task(handle.id)
    assert (task.status, task.attempt) == (TaskStatus.FAILED, 1)  # not retried
    assert "exit" in task.error and "code 3" in task.error and "oops" in task.error
    assert f"failed {handle.id}" in ran.stderr


def test_sigint_stops_the_command_and_releases_the_task_for_another_worker(
    daemon: Daemon, admin: Client, processes: list[subprocess.Popen[str]]
) -> None:
    key = new_agent(admin, "slow-worker", ["@slow"])
    handle = admin.create_task("this takes a while", labels=["@slow"])

    worker = start(processes, daemon, "work", "@slow", "--once", "--",
                   "sh", "-c", "echo $$; exec sleep 30", key=key)  # fmt: skip
    with closing(handle.events(timeout=GUARD)) as events:
        # The command prints its pid: it is running.
        pid = next(int(e.output.text) for e in events if e.output is not None)
        worker.send_signal(signal.SIGINT)
        released = next(e for e in events if e.type is EventType.RELEASED)

    assert released.task.status is TaskStatus.PENDING
    assert (released.task.attempt, released.task.released) == (2, 1)
    assert "SIGINT" in released.task.error
    _, stderr = worker.communicate(timeout=GUARD)
    assert worker.returncode == 130, stderr
    assert f"released {handle.id}" in stderr
    assert gone(pid)  # the command was stopped, not left running
    # Shown as the daemon counts it toward max_attempts: the handed-back one is not.
    shown = legato(daemon, "task", "get", handle.id, key=key)
    assert "attempt 1/3" in shown.stdout and "requeued:" in shown.stdout, shown.stdout
    again = start(processes, daemon, "work", "@slow", "--once", "--", "true", key=key)
    _, stderr = again.communicate(timeout=GUARD)
    assert again.returncode == 0, stderr
    assert "attempt 1/3" in stderr  # before: 2/3


def test_a_canceled_task_stops_its_command(
    daemon: Daemon, admin: Client, processes: list[subprocess.Popen[str]]
) -> None:
    key = new_agent(admin, "canceled-worker", ["@canceled"])
    handle = admin.create_task("never mind this one", labels=["@canceled"])

    # A short lease: heartbeats, which bring the news of the cancel, come every 0.5 s.
    worker = start(processes, daemon, "work", "@canceled", "--once", "--lease", "1.5", "--",
                   "sh", "-c", "echo $$; exec sleep 30", key=key)  # fmt: skip
    with closing(handle.events(timeout=GUARD)) as events:
        pid = next(int(e.output.text) for e in events if e.output is not None)
    admin.cancel_task(handle.id, "not needed any more")

    _, stderr = worker.communicate(timeout=GUARD)
    assert worker.returncode == 1, stderr
    assert f"canceled {handle.id}" in stderr
    assert gone(pid)
    assert admin.get_task(handle.id).status is TaskStatus.CANCELED


# -- legato task tree / tail / answer -------------------------------------------------------


def test_task_tree_draws_children_under_their_parents(daemon: Daemon, admin: Client) -> None:
    key = new_agent(admin, "tree-worker", ["@tree"])
    root = admin.create_task("the root", labels=["@tree"])
    child = admin.create_task("first child", labels=["@tree"], parent_id=root.id)
    grandchild = admin.create_task("grandchild", labels=["@tree-deep"], parent_id=child.id)
    # Created last, listed last by the daemon, yet drawn after the first child's subtree.
    second = admin.create_task("second child", labels=["@tree"], parent_id=root.id)
    with Client(daemon.address, api_key=key) as worker:
        assert worker.claim(task_id=root.id) is not None

    ran = legato(daemon, "task", "tree", root.id)

    assert ran.code == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].split()[:3] == [root.id, "claimed", "@tree"]
    assert "claimed by tree-worker" in lines[0]
    assert lines[1].startswith(f"├─ {child.id}  pending  @tree  unclaimed")
    assert lines[2].startswith(f"│  └─ {grandchild.id}  pending  @tree-deep")
    assert lines[3].startswith(f"└─ {second.id}  pending  @tree")
    assert len(lines) == 4

    as_json = legato(daemon, "task", "tree", root.id, "--json")
    assert as_json.code == 0, as_json.stderr
    tasks = json.loads(as_json.stdout)
    assert [t["id"] for t in tasks] == [root.id, child.id, grandchild.id, second.id]
    assert [t["depth"] for t in tasks] == [0, 1, 2, 1]
    assert tasks[0]["claimed_by"] == "tree-worker"


def test_task_tail_prints_the_output_live_and_exits_0_when_done(
    daemon: Daemon, admin: Client, processes: list[subprocess.Popen[str]]
) -> None:
    key = new_agent(admin, "tail-worker", ["@tail"])
    handle = admin.create_task("write me something", labels=["@tail"])

    tail = start(processes, daemon, "task", "tail", handle.id)
    with Client(daemon.address, api_key=key) as worker:
        job = worker.claim(["@tail"])
        assert job is not None
        job.write("first line\n")
        assert tail.stdout is not None
        assert tail.stdout.readline() == "first line\n"  # while the task still runs
        job.write("second line\n")
        job.write("no newline at the end")
        job.complete({"ok": True})

    stdout, stderr = tail.communicate(timeout=GUARD)
    assert tail.returncode == 0, stderr
    assert stdout == "second line\nno newline at the end"
    assert stderr.strip() == f"legato: task {handle.id} done"


def test_task_tail_exits_1_when_the_task_fails(
    daemon: Daemon, admin: Client, processes: list[subprocess.Popen[str]]
) -> None:
    key = new_agent(admin, "tail-failer", ["@tail-fail"])
    handle = admin.create_task("this will fail", labels=["@tail-fail"])
    with Client(daemon.address, api_key=key) as worker:
        job = worker.claim(["@tail-fail"])
        assert job is not None
        job.write("trying…\n")
        job.fail("no luck")

    ran = legato(daemon, "task", "tail", handle.id)

    assert ran.code == 1
    assert ran.stdout == "trying…\n"
    assert ran.stderr.strip() == f"legato: task {handle.id} failed: no luck"


def test_task_answer_answers_the_question_the_worker_asked(daemon: Daemon, admin: Client) -> None:
    coder_key = new_agent(admin, "answer-coder", [])
    worker_key = new_agent(admin, "answer-worker", ["@answer"])
    with (
        Client(daemon.address, api_key=coder_key) as coder,
        Client(daemon.address, api_key=worker_key) as worker,
    ):
        handle = coder.create_task("which client?", labels=["@answer"])
        job = worker.claim(["@answer"])
        assert job is not None
        worker.request_input(job.id, job.lease_token, "sync or async?")

        asked = legato(daemon, "task", "get", handle.id, key=coder_key)
        assert asked.code == 0, asked.stderr
        assert "input_required" in asked.stdout
        assert "question:   sync or async?" in asked.stdout

        answered = legato(daemon, "task", "answer", handle.id, "-", key=coder_key, stdin="async\n")

        assert answered.code == 0, answered.stderr
        task = coder.get_task(handle.id)
        assert (task.status, task.answer) == (TaskStatus.CLAIMED, "async")
        shown = legato(daemon, "task", "get", handle.id, key=coder_key)
        assert "answer:     async" in shown.stdout

        # Nothing is asked any more: one line on stderr, exit 1.
        again = legato(daemon, "task", "answer", handle.id, "sync", key=coder_key)
        assert again.code == 1
        assert len(again.stderr.splitlines()) == 1
        assert "INPUT_REQUIRED" in again.stderr


def test_create_deadline_claim_wait_and_cancel_keep_children(
    daemon: Daemon, admin: Client, processes: list[subprocess.Popen[str]]
) -> None:
    key = new_agent(admin, "flags-worker", ["@flags"])

    # A long-poll claim started before there is anything to claim.
    claim = start(processes, daemon, "task", "claim", "-l", "@flags", "--wait", "15", "--json",
                  key=key)  # fmt: skip
    before = datetime.now(UTC)
    created = legato(daemon, "task", "create", "soon, please", "-l", "@flags",
                     "--deadline", "60", "--json")  # fmt: skip
    assert created.code == 0, created.stderr
    task = json.loads(created.stdout)
    deadline = datetime.fromisoformat(task["deadline"])
    assert before + timedelta(seconds=59) <= deadline <= datetime.now(UTC) + timedelta(seconds=60)

    stdout, stderr = claim.communicate(timeout=GUARD)
    assert claim.returncode == 0, stderr
    assert json.loads(stdout)["task"]["id"] == task["id"]

    child = admin.create_task("a child", labels=["@flags"], parent_id=task["id"])
    canceled = legato(daemon, "task", "cancel", task["id"], "--keep-children", "--json")
    assert canceled.code == 0, canceled.stderr
    assert json.loads(canceled.stdout)["status"] == "canceled"
    assert admin.get_task(child.id).status is TaskStatus.PENDING


# -- legato demo -------------------------------------------------------------------------


def test_demo_plays_the_story_prints_the_tree_and_revokes_its_agents(
    daemon: Daemon, admin: Client
) -> None:
    ran = legato(daemon, "demo", "--pace", "0")

    assert ran.code == 0, ran.stderr
    out = ran.stdout
    story = out.split("\n\n")[1].splitlines()
    # The same steps in the same order, every run.
    assert [tuple(line.split()[:2]) for line in story] == [
        ("coder", "→"),  # delegates to @researcher-…
        ("researcher", "✓"),  # claims
        ("coder", "←"),  # reads the researcher's output as it streams, three times
        ("coder", "←"),
        ("coder", "←"),
        ("researcher", "→"),  # delegates to @specialist-…
        ("specialist", "✓"),  # claims
        ("specialist", "⋯"),  # streams
        ("researcher", "→"),  # asks the coder
        ("coder", "→"),  # answers
        ("researcher", "←"),  # gets the answer
        ("specialist", "✓"),  # done
        ("researcher", "←"),  # gets the specialist's result
        ("researcher", "✓"),  # done
        ("coder", "←"),  # gets the result
    ]
    assert story[0].startswith("coder      → @researcher-")
    assert '"rate_limit": "500 requests/minute (Tier 1)"' in story[-1]
    root, child = out.split("task tree:\n", 1)[1].splitlines()[:2]
    _, status, label = root.split()[:3]
    assert status == "done"
    assert label.startswith("@researcher-")
    suffix = label.removeprefix("@researcher-")
    assert child.startswith("└─ ")
    assert child.split()[2:4] == ["done", f"@specialist-{suffix}"]
    assert f"claimed by specialist-{suffix}" in child

    names = {f"{role}-{suffix}" for role in ("coder", "researcher", "specialist")}
    agents = {a.name: a for a in admin.list_agents(include_revoked=True)}
    assert names <= agents.keys()
    assert all(agents[name].revoked for name in names)


def test_demo_without_a_daemon_says_how_to_start_one(short_tmp: Path) -> None:
    data_dir = short_tmp / "data"
    data_dir.mkdir()
    # A key left by a daemon that has stopped since.
    (data_dir / "admin.key").write_text("lgt_0123456789ab_" + "A" * 43)
    stopped = Daemon(f"unix:{short_tmp}/missing.sock", data_dir, "")

    ran = legato(stopped, "demo")

    assert ran.code == 1
    assert ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1
    assert "make run" in ran.stderr
