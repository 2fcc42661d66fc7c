"""Load-generator worker processes, driven over a pipe by the harness.

The load never runs in the daemon's process nor on its event loop: each
`Worker` is a `python -m bench.loadgen FD` subprocess with its own asyncio loop
and gRPC channels. The harness sends it commands (`unary`, `watch_open`, ...)
and awaits their answers. The same commands drive legato and the ceilings:
requests go out as the same pre-serialized bytes and responses are parsed
into the same message classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

import grpc
from google.protobuf.message import Message
from legato.client import AsyncClient
from legato.client._core import CHANNEL_OPTIONS
from legato.v1 import tasks_pb2

from bench.payloads import LABEL, RESULT, content, delivery_key
from bench.procs import Proc, Processes, run_loop

RESPONSES: dict[str, type[Message]] = {
    "Task": tasks_pb2.Task,
    "ClaimTaskResponse": tasks_pb2.ClaimTaskResponse,
    "ListTasksResponse": tasks_pb2.ListTasksResponse,
    "TaskEvent": tasks_pb2.TaskEvent,
}
Metadata = Sequence[tuple[str, str]]


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


# -- the worker process ---------------------------------------------------------------


@dataclass
class WatchGroup:
    """Watch streams of one target opened by one worker, and what they received."""

    size: int
    channels: list[grpc.aio.Channel]
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    # Streams that received at least one message: the stream is live.
    live: set[int] = field(default_factory=set)
    counts: dict[int, int] = field(default_factory=dict)
    complete: dict[int, asyncio.Event] = field(default_factory=dict)
    receipts: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def received(self, stream: int, key: int | None, at_ns: int) -> None:
        self.live.add(stream)
        if key is None:
            return
        self.receipts.append((key, at_ns))
        count = self.counts.get(key, 0) + 1
        self.counts[key] = count
        if count == self.size:
            self.complete.setdefault(key, asyncio.Event()).set()


class WorkerState:
    def __init__(self) -> None:
        self.groups: dict[str, WatchGroup] = {}

    async def close(self) -> None:
        for name in list(self.groups):
            await watch_close(self, name=name)


async def unary(
    state: WorkerState,
    *,
    address: str,
    method: str,
    requests: Sequence[bytes],
    response: str,
    metadata: Metadata,
    concurrency: int,
    seconds: float,
    warmup_seconds: float,
    max_calls: int | None = None,
    stop_when_empty: bool = False,
) -> dict[str, Any]:
    """Calls `method` from `concurrency` coroutines for `seconds` after a warm-up.

    Returns the latencies (ns) of the measured calls, the elapsed time and how
    many warm-up calls were made. `max_calls` ends the run after that many
    measured calls. With `stop_when_empty`, a ClaimTaskResponse without a task
    ends the run (nothing is left to claim) and is not counted.
    """
    parse = RESPONSES[response].FromString
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, Any] = channel.unary_unary(
            method, response_deserializer=parse
        )
        await asyncio.wait_for(channel.channel_ready(), 10)
        requests_sent = itertools.count()
        emptied = False

        async def run(until_ns: int, limit: int | None, latencies: list[int]) -> None:
            nonlocal emptied
            while time.perf_counter_ns() < until_ns and not emptied:
                if limit is not None and len(latencies) >= limit:
                    return
                request = requests[next(requests_sent) % len(requests)]
                started = time.perf_counter_ns()
                answer = await call(request, metadata=metadata, timeout=60)
                ended = time.perf_counter_ns()
                if stop_when_empty and not answer.HasField("task"):
                    emptied = True
                    return
                latencies.append(ended - started)

        warmup: list[int] = []
        warm_until = time.perf_counter_ns() + int(warmup_seconds * 1e9)
        await asyncio.gather(*(run(warm_until, None, warmup) for _ in range(concurrency)))
        latencies: list[int] = []
        started = time.perf_counter_ns()
        until = started + int(seconds * 1e9)
        await asyncio.gather(*(run(until, max_calls, latencies) for _ in range(concurrency)))
        elapsed = time.perf_counter_ns() - started
    return {
        "latencies_ns": latencies,
        "elapsed_ns": elapsed,
        "warmup_calls": len(warmup),
        "emptied": emptied,
    }


async def watch_open(
    state: WorkerState,
    *,
    name: str,
    address: str,
    method: str,
    request: bytes,
    metadata: Metadata,
    streams: int,
    per_channel: int,
) -> None:
    """Opens `streams` server streams of `method`, `per_channel` to a connection."""
    parse = tasks_pb2.TaskEvent.FromString
    channel_count = -(-streams // per_channel)
    channels = [
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(channel_count)
    ]
    group = WatchGroup(streams, channels)
    state.groups[name] = group

    async def read(index: int, channel: grpc.aio.Channel) -> None:
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, tasks_pb2.TaskEvent] = (
            channel.unary_stream(method, response_deserializer=parse)
        )
        call = stream(request, metadata=metadata)
        try:
            async for event in call:
                group.received(index, delivery_key(event.task.content), time.time_ns())
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                group.errors.append(f"stream {index}: {exc.code().name} {exc.details()}")

    group.readers = [
        asyncio.create_task(read(i, channels[i // per_channel])) for i in range(streams)
    ]


async def watch_live(state: WorkerState, *, name: str) -> dict[str, Any]:
    """How many streams of the group have received a message, and any stream errors."""
    group = state.groups[name]
    return {"live": len(group.live), "errors": list(group.errors)}


async def watch_wait(state: WorkerState, *, name: str, key: int, timeout: float) -> bool:
    """Waits until every stream of the group received measurement `key`."""
    group = state.groups[name]
    event = group.complete.setdefault(key, asyncio.Event())
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def watch_collect(state: WorkerState, *, name: str) -> list[tuple[int, int]]:
    """The (key, receipt time_ns) of every measurement received since the last collect."""
    group = state.groups[name]
    receipts, group.receipts = group.receipts, []
    group.counts.clear()
    group.complete.clear()
    return receipts


async def watch_close(state: WorkerState, *, name: str) -> None:
    group = state.groups.pop(name)
    for reader in group.readers:
        reader.cancel()
    await asyncio.gather(*group.readers, return_exceptions=True)
    for channel in group.channels:
        await channel.close()


async def result_latency(
    state: WorkerState,
    *,
    address: str,
    creator_key: str,
    worker_key: str,
    samples: int,
    settle_seconds: float,
) -> list[int]:
    """Nanoseconds from the start of CompleteTask to the creator's `handle.result()` returning.

    The creator starts waiting on `handle.result()` first; the worker then
    claims the task and completes it.
    """
    latencies: list[int] = []
    async with (
        AsyncClient(address, api_key=creator_key) as creator,
        AsyncClient(address, api_key=worker_key) as worker,
    ):
        for index in range(-2, samples):  # two warm-up rounds
            handle = await creator.create_task(content(f"r:{index}:"), labels=[LABEL])
            waiting = asyncio.create_task(handle.result(timeout=60))
            # handle.result() has no "I am subscribed" signal: give its watch time
            # to reach the live phase, so the measure is of live delivery.
            await asyncio.sleep(settle_seconds)
            job = await worker.claim(task_id=handle.id)
            if job is None:
                raise RuntimeError(f"task {handle.id} could not be claimed")
            started = time.perf_counter_ns()
            await job.complete(RESULT)
            await waiting
            if index >= 0:
                latencies.append(time.perf_counter_ns() - started)
    return latencies


async def lifecycle(
    state: WorkerState,
    *,
    address: str,
    creator_key: str,
    worker_key: str,
    tasks: int,
    concurrency: int,
) -> dict[str, Any]:
    """Takes `tasks` tasks through create, claim and complete; returns the elapsed time."""
    async with (
        AsyncClient(address, api_key=creator_key) as creator,
        AsyncClient(address, api_key=worker_key) as worker,
    ):
        counter = itertools.count()
        text = content("lifecycle:")

        async def run() -> None:
            while next(counter) < tasks:
                handle = await creator.create_task(text, labels=[LABEL])
                job = await worker.claim(task_id=handle.id)
                assert job is not None
                await job.complete(RESULT)

        started = time.perf_counter_ns()
        await asyncio.gather(*(run() for _ in range(concurrency)))
        return {"elapsed_ns": time.perf_counter_ns() - started}


COMMANDS: dict[str, Callable[..., Awaitable[Any]]] = {
    "unary": unary,
    "watch_open": watch_open,
    "watch_live": watch_live,
    "watch_wait": watch_wait,
    "watch_collect": watch_collect,
    "watch_close": watch_close,
    "result_latency": result_latency,
    "lifecycle": lifecycle,
}


def _receive_forever(
    conn: Connection, loop: asyncio.AbstractEventLoop, deliver: Callable[[Any], None]
) -> None:
    """Blocking reads of `conn` on a thread of its own, handed to the loop one by one.

    Not `loop.add_reader`: uvloop makes a watched fd non-blocking, and a
    Connection cannot read a message in pieces.
    """
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = None
        try:
            loop.call_soon_threadsafe(deliver, message)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            return
        if message is None:
            return


async def serve_commands(conn: Connection) -> None:
    """Runs the commands that arrive on `conn` (each on its own task) until it closes."""
    loop = asyncio.get_running_loop()
    state = WorkerState()
    closed = asyncio.Event()
    running: set[asyncio.Task[None]] = set()

    async def run(request_id: int, command: str, kwargs: dict[str, Any]) -> None:
        try:
            result = await COMMANDS[command](state, **kwargs)
            answer: tuple[int, bool, Any] = (request_id, True, result)
        except Exception:
            answer = (request_id, False, traceback.format_exc())
        conn.send(answer)

    def arrived(message: Any) -> None:
        if message is None:
            closed.set()
            return
        task = loop.create_task(run(*message))
        running.add(task)
        task.add_done_callback(running.discard)

    threading.Thread(
        target=_receive_forever, args=(conn, loop, arrived), name="commands", daemon=True
    ).start()
    await closed.wait()
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    await state.close()


# -- the harness side -------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A command failed in a worker process; the message holds its traceback."""


class Worker:
    """A load-generator process; `await worker.call("unary", ...)` runs a command there."""

    def __init__(self, name: str, proc: Proc, conn: Connection):
        self.name = name
        self.proc = proc
        self._conn = conn
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._loop = asyncio.get_running_loop()
        threading.Thread(
            target=_receive_forever,
            args=(conn, self._loop, self._arrived),
            name=f"{name}-answers",
            daemon=True,
        ).start()

    @classmethod
    def start(cls, procs: Processes, name: str) -> Worker:
        ours, theirs = Pipe(duplex=True)
        proc = procs.spawn(
            name,
            [sys.executable, "-m", "bench.loadgen", str(theirs.fileno())],
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        return cls(name, proc, ours)

    def _arrived(self, message: Any) -> None:
        if message is None:  # the process is gone
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(WorkerError(f"{self.name} exited; see {self.proc.log}"))
            self._pending.clear()
            return
        request_id, ok, value = message
        future = self._pending.pop(request_id)
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(WorkerError(f"{self.name}: {value}"))

    async def call(self, command: str, **kwargs: Any) -> Any:
        request_id = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[request_id] = future
        self._conn.send((request_id, command, kwargs))
        return await future

    def close(self) -> None:
        """Asks the process to finish; its reader thread sees the pipe close."""
        with contextlib.suppress(OSError):
            self._conn.send(None)


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    run_loop(serve_commands(conn))


if __name__ == "__main__":
    main()
