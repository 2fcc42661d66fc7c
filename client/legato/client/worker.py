"""`legato work`: turn any command-line agent into a worker, with no code.

    legato work @summarizer -- claude -p "Summarize what you read on stdin"

For each task claimed for the labels, the command runs once with the task's
content on stdin and the task as JSON in `LEGATO_TASK` and in the file named
by `LEGATO_TASK_FILE` (only there when too large for the environment); its id
is in `LEGATO_TASK_ID`. Its stdout streams to the task as output while it
runs; exit status 0 completes the task with `{"output": <stdout>,
"exit_code": 0}`, any other fails it with the exit code and the end of stderr.
The command also gets `LEGATO_ADDRESS` and `LEGATO_AGENT_KEY`, so it can
delegate further with `legato task create --parent "$LEGATO_TASK_ID" ...`.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import IO, Any

from legato.client._sync import Client, Job
from legato.client.errors import (
    FailedPreconditionError,
    LegatoError,
    ResourceExhaustedError,
    UnavailableError,
)
from legato.client.models import Role, Task

# How often the loop that follows a running command looks at the stop flag and
# at cancellation; output itself is forwarded as soon as it arrives.
TICK = 0.1
# The daemon takes at most 64 KiB (UTF-8) per AppendOutput.
MAX_CHUNK_BYTES = 64 * 1024
# A result is at most 1 MiB serialized; leave room for the other fields.
MAX_RESULT_OUTPUT_BYTES = 1_000_000
# One environment string may be at most 128 KiB on Linux (MAX_ARG_STRLEN); a
# larger task (its context can be 1 MiB) is only in LEGATO_TASK_FILE.
MAX_ENV_TASK_BYTES = 100_000
# Errors are at most 8 KiB; the end of stderr gets this much of it.
STDERR_TAIL_BYTES = 4096
# After SIGTERM, how long the command's process group gets before SIGKILL.
TERMINATE_GRACE = 5.0
# A command that exited but left a background child holding its stdout or
# stderr open: how long to keep reading before finishing the task without the rest.
EOF_GRACE = 2.0
# Final output still to send when the daemon is briefly unreachable: keep trying this long.
FLUSH_RETRY = 5.0
EXIT_INTERRUPTED = 130


class _Interrupted(BaseException):
    """Raised by the signal handler to leave a blocking long-poll claim.

    A BaseException, so that no `except Exception` on the way swallows it.
    """


class Ending(Enum):
    """How following a command ended."""

    EXITED = "exited"  # the command exited by itself
    STOPPED = "stopped"  # SIGINT/SIGTERM to the worker
    CANCELED = "canceled"  # the task was canceled (or failed at its deadline) meanwhile
    LOST = "lost"  # the claim ended under us: lease expired, task reclaimed, client closed


def check_command(command: Sequence[str]) -> None:
    """Exits with a message if `command` cannot be run, before any task is claimed.

    Otherwise a typo would fail every task in the queue, one by one.
    """
    if not command:
        raise SystemExit(
            "legato: give the command to run after --, e.g. `legato work @echo -- cat`"
        )
    if shutil.which(command[0]) is None:
        raise SystemExit(f"legato: cannot run {command[0]!r}: not found or not executable")


def task_json(task: Task) -> str:
    """What the command gets in `LEGATO_TASK`: the task as its creator gave it."""
    return json.dumps(
        {
            "id": task.id,
            "content": task.content,
            "labels": list(task.labels),
            "context": task.context,
            "parent_id": task.parent_id,
            "root_id": task.root_id,
            "created_by": task.created_by,
            "created_at": task.created_at.isoformat(),
            "deadline": task.deadline.isoformat() if task.deadline else None,
            "depth": task.depth,
            "attempt": task.attempt,
            "max_attempts": task.max_attempts,
        },
        ensure_ascii=False,
    )


def _utf8_head(text: str, limit: int) -> str:
    """The longest start of `text` that is at most `limit` bytes of UTF-8."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")  # drops a character cut in half


def _utf8_tail(data: bytes, limit: int) -> tuple[str, bool]:
    """The end of `data` as text, at most `limit` bytes, and whether it was cut."""
    if len(data) <= limit:
        return data.decode("utf-8", "replace"), False
    tail = data[-limit:]
    # Drop the continuation bytes of a character whose start was cut off.
    start = next((n for n, byte in enumerate(tail[:4]) if byte & 0xC0 != 0x80), 0)
    return tail[start:].decode("utf-8", "replace"), True


def _preview(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


class OutputStream:
    """Forwards a command's stdout to the task in order, as it arrives.

    Keeps the whole stdout for the result as well (its last megabyte if more).
    """

    def __init__(self, job: Job):
        self._job = job
        # Bytes arrive in arbitrary pieces; a character split between two must
        # not turn into two replacement characters.
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self._captured = bytearray()
        self._total = 0
        self._dropped = False
        self.streaming = True
        # Set when the claim ended under us (the task canceled, or the lease lost).
        self.lost: str | None = None

    @property
    def has_pending(self) -> bool:
        """Whether output is waiting to be sent (after the daemon was unreachable)."""
        return bool(self._pending) and self.streaming

    def feed(self, data: bytes) -> None:
        """Takes bytes the command wrote; `flush` sends them."""
        self._captured += data
        self._total += len(data)
        # Bounded memory for a chatty command: only the end can go in the result.
        if len(self._captured) > 2 * MAX_RESULT_OUTPUT_BYTES:
            del self._captured[: len(self._captured) - MAX_RESULT_OUTPUT_BYTES]
            self._dropped = True
        self._pending += self._decoder.decode(data)

    def finish(self) -> None:
        """The command's stdout ended: decode what is left of a partial character."""
        self._pending += self._decoder.decode(b"", final=True)

    def flush(self, *, final: bool = False) -> None:
        """Sends what is pending, in chunks the daemon accepts.

        Keeps it pending while the daemon is unreachable (it restarts), so the
        output still arrives whole and in order.
        """
        while self._pending and self.streaming:
            # The daemon refuses a chunk of only white space ("text is required
            # and must not be blank"), e.g. a lone blank line: it waits for the
            # text after it. Blank output at the very end is in the result only.
            if not self._pending.strip() and not final:
                return
            piece = _utf8_head(self._pending, MAX_CHUNK_BYTES)
            if not piece.strip():
                self._pending = self._pending[len(piece) :]
                continue
            try:
                self._job.write(piece)
            except UnavailableError:
                return
            except ResourceExhaustedError:
                # The task's output is full (1 MiB): the rest goes only in the result.
                self.streaming = False
                return
            except FailedPreconditionError as exc:
                self.lost = exc.message
                self.streaming = False
                return
            except LegatoError as exc:  # e.g. the agent's key was revoked meanwhile
                self.lost = str(exc)
                self.streaming = False
                return
            self._pending = self._pending[len(piece) :]

    def flush_final(self) -> None:
        """Sends the rest of the output, riding out a short daemon restart."""
        give_up_at = time.monotonic() + FLUSH_RETRY
        self.flush(final=True)
        while self.has_pending and time.monotonic() < give_up_at:
            time.sleep(0.2)  # backoff while the daemon comes back
            self.flush(final=True)

    def result(self) -> dict[str, Any]:
        """The result of a successful run."""
        output, cut = _utf8_tail(bytes(self._captured), MAX_RESULT_OUTPUT_BYTES)
        result: dict[str, Any] = {"output": output, "exit_code": 0}
        if cut or self._dropped:
            result["output_truncated"] = True
        return result

    @property
    def size(self) -> int:
        """Bytes the command wrote to stdout."""
        return self._total


class _StderrTail:
    """Reads a command's stderr, keeping only its end for the error message."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream
        self._tail = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with self._stream:
            while data := self._stream.read1(65536):  # type: ignore[attr-defined]
                self._tail += data
                del self._tail[:-STDERR_TAIL_BYTES]

    def text(self) -> str:
        return bytes(self._tail).decode("utf-8", "ignore").strip()


def _read_stdout(stream: IO[bytes], chunks: queue.Queue[bytes | None]) -> None:
    # read1 returns whatever the pipe holds as soon as there is something, so
    # output moves line by line (or faster) instead of at the end.
    with stream:
        while data := stream.read1(65536):  # type: ignore[attr-defined]
            chunks.put(data)
    chunks.put(None)


def _write_stdin(stream: IO[bytes], content: str) -> None:
    # In a thread: content larger than the pipe buffer would block until the
    # command reads it, and it may write output first.
    try:
        with stream:
            stream.write(content.encode("utf-8", "surrogatepass"))
    except OSError:
        pass  # the command does not read stdin (or exited): that is its choice


class Worker:
    """Runs `command` for each task claimed for `labels`, until stopped."""

    def __init__(
        self,
        client: Client,
        labels: Sequence[str],
        command: Sequence[str],
        *,
        api_key: str | None,
        lease: float,
        wait: float,
    ):
        self._client = client
        self._labels = list(labels)
        self._command = list(command)
        self._api_key = api_key
        self._admin: bool | None = None  # whether api_key is an admin's; asked once
        self._lease = lease
        self._wait = wait
        self._stop = threading.Event()
        self._signal: int | None = None
        # A second signal while the command is being stopped: kill it at once.
        self._hurry = False
        # True while blocked in a long-poll claim, the one place the signal
        # handler raises: elsewhere it only sets the flag, so no RPC that
        # finishes or releases a task is cut in half.
        self._claiming = False

    def run(self, *, once: bool = False) -> int:
        """Works until SIGINT/SIGTERM (exit 130), or one task with `once` (0 done, 1 not)."""
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        labels = " ".join(self._labels) or "all this agent's labels"
        self._status(f"waiting for tasks on {labels} (Ctrl-C to stop)")
        try:
            with contextlib.closing(
                self._client.work(self._labels, lease=self._lease, wait=self._wait)
            ) as jobs:
                while True:
                    job = self._next_job(jobs)
                    succeeded = self._handle(job)
                    if self._stop.is_set():
                        return EXIT_INTERRUPTED
                    if once:
                        return 0 if succeeded else 1
        except _Interrupted:
            # A claim that the daemon granted just as the signal came is not
            # ours to release (we never saw it): its lease runs out instead.
            return EXIT_INTERRUPTED
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _next_job(self, jobs: Any) -> Job:
        self._claiming = True
        try:
            if self._stop.is_set():
                raise _Interrupted
            job: Job = next(jobs)
            return job
        finally:
            self._claiming = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop.is_set():
            self._hurry = True
        self._signal = signum
        self._stop.set()
        if self._claiming:
            raise _Interrupted

    def _status(self, text: str) -> None:
        print(f"legato work: {text}", file=sys.stderr, flush=True)

    def _env(self, task: Task, task_file: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            LEGATO_TASK_FILE=str(task_file),
            LEGATO_TASK_ID=task.id,
            LEGATO_ADDRESS=self._client.address,
        )
        key = self._command_key()
        if key is None:
            env.pop("LEGATO_AGENT_KEY", None)
        else:
            env["LEGATO_AGENT_KEY"] = key
        if self._client.tls is not None:  # given as flags, the command needs them too
            env.update(self._client.tls.environment())
        env.pop("LEGATO_TASK", None)
        as_json = task_json(task)
        if len(as_json.encode("utf-8", "surrogatepass")) <= MAX_ENV_TASK_BYTES:
            env["LEGATO_TASK"] = as_json
        # Python agents block-buffer stdout into a pipe; unbuffered, their
        # output streams as it is printed.
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _command_key(self) -> str | None:
        """The key the command gets: this worker's, but never an admin's, which can
        revoke every agent and read every task, handed to what may be a model."""
        if self._api_key is None or self._admin is False:
            return self._api_key
        if self._admin is None:
            try:
                self._admin = self._client.whoami().role is Role.ADMIN
            except LegatoError:
                return None  # asked again for the next task; none meanwhile
            if self._admin:
                self._status("working as an admin: the command gets no LEGATO_AGENT_KEY")
        return None if self._admin else self._api_key

    def _handle(self, job: Job) -> bool:
        """Runs the command for one job and finishes the task; True if it is DONE."""
        task = job.task
        self._status(
            f"claimed {task.id} ({' '.join(task.labels)}, attempt "
            f"{task.attempt - task.released}/{task.max_attempts}): {_preview(task.content)}"
        )
        fd, name = tempfile.mkstemp(prefix="legato-task-", suffix=".json")  # owner-only
        task_file = Path(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(task_json(task))
            return self._run(job, task_file)
        finally:
            task_file.unlink(missing_ok=True)

    def _run(self, job: Job, task_file: Path) -> bool:
        task = job.task
        started = time.monotonic()
        try:
            # Its own process group: Ctrl-C in the terminal reaches only this
            # worker, which then stops the command and releases the task in
            # order; and stopping the group reaches the command's children too.
            process = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env(task, task_file),
                process_group=0,
            )
        except OSError as exc:
            return self._finish(job, error=f"cannot run {self._command[0]!r}: {exc}")
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        threading.Thread(
            target=_write_stdin, args=(process.stdin, task.content), daemon=True
        ).start()
        chunks: queue.Queue[bytes | None] = queue.Queue()
        reader = threading.Thread(target=_read_stdout, args=(process.stdout, chunks), daemon=True)
        reader.start()
        stderr = _StderrTail(process.stderr)
        stream = OutputStream(job)

        try:
            ending = self._follow(process, job, chunks, stream)
        except BaseException:
            self._terminate(process)  # never leave the command running unwatched
            raise
        if ending is not Ending.EXITED:
            self._terminate(process)
        code = process.wait()
        # Daemon threads: a background child still holding a pipe must not hang us.
        give_up_at = time.monotonic() + EOF_GRACE
        for thread in (reader, stderr.thread):
            thread.join(max(0.0, give_up_at - time.monotonic()))

        if ending is Ending.STOPPED:
            return self._release(job)
        if ending is Ending.CANCELED:
            why = job.task.error or "canceled"
            self._status(f"canceled {task.id}: {why}; stopped the command")
            return False
        if ending is Ending.LOST and stream.lost is None:
            self._status(f"{job.interruption}; stopped the command")
            return False
        if ending is Ending.EXITED:
            while not chunks.empty():  # what came after the command exited
                stream.feed(chunks.get_nowait() or b"")
            stream.finish()
            stream.flush_final()
        if stream.lost is not None:
            self._status(f"lost {task.id}: {stream.lost}")
            return False
        if code != 0:
            return self._finish(job, error=self._failure(code, stderr.text()))
        took = time.monotonic() - started
        return self._finish(
            job, result=stream.result(), done=f"in {took:.1f} s, {stream.size} bytes of output"
        )

    def _follow(
        self,
        process: subprocess.Popen[bytes],
        job: Job,
        chunks: queue.Queue[bytes | None],
        stream: OutputStream,
    ) -> Ending:
        """Forwards output until the command's stdout ends, or a reason to stop it comes."""
        while True:
            if self._stop.is_set():
                return Ending.STOPPED
            # Learned by the watch and heartbeat threads of `Client.work`.
            if job.cancel_requested:
                return Ending.CANCELED
            if job.interrupted:  # the lease was lost, or the client closed
                return Ending.LOST
            if stream.lost is not None:
                # AppendOutput was refused: the task is no longer ours. A
                # heartbeat tells whether it was canceled or the lease lost.
                return Ending.CANCELED if self._canceled(job) else Ending.LOST
            try:
                data = chunks.get(timeout=TICK)
            except queue.Empty:
                if stream.has_pending:
                    stream.flush()  # a retry after the daemon was unreachable
                if process.poll() is not None:
                    # Exited, yet its stdout is still open: a background child
                    # holds it. What it writes in the grace below still counts.
                    return Ending.EXITED
                continue
            if data is None:
                return Ending.EXITED
            stream.feed(data)
            # Whatever else is already there goes in the same chunk: a chatty
            # command makes fewer, larger appends instead of a backlog.
            while True:
                try:
                    more = chunks.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stream.flush()
                    return Ending.EXITED
                stream.feed(more)
            stream.flush()

    def _canceled(self, job: Job) -> bool:
        try:
            return job.heartbeat()
        except LegatoError:
            return job.cancel_requested  # JobInterruptedError if the threads knew first

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the command's process group, then SIGKILL after a grace."""
        self._kill_group(process, signal.SIGTERM)
        give_up_at = time.monotonic() + TERMINATE_GRACE
        while process.poll() is None:
            if self._hurry or time.monotonic() >= give_up_at:
                self._kill_group(process, signal.SIGKILL)
                process.wait()
                return
            try:
                process.wait(timeout=TICK)
            except subprocess.TimeoutExpired:
                continue

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes], signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it is gone already
            os.killpg(process.pid, signum)

    @staticmethod
    def _failure(code: int, stderr: str) -> str:
        if code < 0:
            what = f"command was killed by {signal.Signals(-code).name}"
        else:
            what = f"command exited with code {code}"
        if not stderr:
            return f"{what} (no stderr)"
        if "\n" not in stderr:
            return f"{what}: {stderr}"
        return f"{what}; stderr ends with:\n{stderr}"

    def _release(self, job: Job) -> bool:
        name = signal.Signals(self._signal).name if self._signal else "a signal"
        try:
            job.release(f"the worker was stopped ({name}) before the command finished")
        except LegatoError as exc:
            self._status(f"could not release {job.id}: {exc}")
            return False
        # A hand-back uses up no attempt: the task is always PENDING again.
        self._status(f"released {job.id} ({name}): it waits for another worker")
        return False

    def _finish(
        self,
        job: Job,
        *,
        result: dict[str, Any] | None = None,
        error: str = "",
        done: str = "",
    ) -> bool:
        try:
            if error:
                job.fail(error)
            else:
                job.complete(result)
        except LegatoError as exc:
            self._status(f"could not finish {job.id}: {exc}")
            return False
        if error:
            self._status(f"failed {job.id}: {_preview(error, 120)}")
            return False
        self._status(f"done {job.id} ({done})")
        return True
