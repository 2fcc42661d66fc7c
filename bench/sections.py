"""What a run measures, section by section.

Each section starts what it needs (daemons, ceilings), measures, records every
value into `Results` under a key (one value per round) and stops what it
started. Legato and its ceiling alternate within each round (A B, then B A in
the next round), so a noisy neighbour hits both alike.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from legato.client import AsyncClient
from legato.client._core import CHANNEL_OPTIONS
from legato.v1 import tasks_pb2

from bench import ceilings, payloads
from bench.dbgen import history_db
from bench.loadgen import Worker, bearer
from bench.mcp_start import Kind, spawn_to_answer
from bench.payloads import (
    CREATOR,
    LABEL,
    LISTED_LABEL,
    OBSERVER,
    OBSERVER_LABEL,
    OBSERVER_TASKS,
    WORKER,
)
from bench.procs import LEGATO, REPO, Daemon, Proc, Processes, start_daemon
from bench.profiles import Profile
from bench.stats import Results, percentile

TASK_SERVICE = "/legato.v1.TaskService/"
# Measurement keys below 0 are warm-up events: delivered, not counted.
WARMUP_EVENTS = 3
EVENT_TIMEOUT = 60.0
LIVE_TIMEOUT = 180.0


@dataclass
class Run:
    """What every section shares."""

    profile: Profile
    procs: Processes
    scratch: Path  # short path: unix sockets and data dirs
    cache: Path  # bench/results: cached databases
    results: Results
    workers: list[Worker]
    say: Callable[[str], None]
    payload_file: Path | None = None
    fanout: Ceiling | None = None
    echo: Ceiling | None = None
    ceilings_started: list[Ceiling] = field(default_factory=list)
    # Modified copies of the server the ladder measures beside legato: (name, dir
    # holding legato/server/).
    variants: list[tuple[str, Path]] = field(default_factory=list)

    def socket(self, name: str) -> Path:
        return self.scratch / "s" / f"{name}.sock"

    def data_dir(self, name: str) -> Path:
        return self.scratch / name

    def record_calls(self, key: str, outcome: dict[str, Any]) -> None:
        """Records calls/s, p50 and p99 (ms) of one `unary` run under `key`."""
        latencies: list[int] = outcome["latencies_ns"]
        seconds = outcome["elapsed_ns"] / 1e9
        self.results.add(f"{key}.rate", len(latencies) / seconds if seconds else float("nan"))
        self.results.add(f"{key}.p50", percentile(latencies, 50) / 1e6)
        self.results.add(f"{key}.p99", percentile(latencies, 99) / 1e6)


@dataclass
class Ceiling:
    proc: Proc
    socket: Path

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"


async def start_ceiling(run: Run, kind: str) -> Ceiling:
    """Starts `python -m bench.ceilings KIND` on the probed payloads; returns once ready."""
    assert run.payload_file is not None
    socket = run.socket(kind)
    socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = run.procs.spawn(
        kind,
        [
            sys.executable,
            "-m",
            "bench.ceilings",
            kind,
            "--listen",
            f"unix:{socket}",
            "--payloads",
            str(run.payload_file),
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.popen.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.popen.stdout.readline), 60)
    if line.strip() != b"ready":
        raise RuntimeError(f"the {kind} ceiling did not start; see {proc.log}")
    ceiling = Ceiling(proc, socket)
    run.ceilings_started.append(ceiling)
    return ceiling


async def bench_agents(daemon: Daemon) -> tuple[str, str]:
    """Creates the creator and worker agents; returns their keys."""
    async with AsyncClient(daemon.address, api_key=daemon.admin_key()) as admin:
        _, creator_key = await admin.create_agent(CREATOR, labels=["@creator"])
        _, worker_key = await admin.create_agent(WORKER, labels=[LABEL])
    return creator_key, worker_key


async def create_tasks(address: str, key: str, request: bytes, count: int) -> list[str]:
    """Creates `count` tasks from the harness (set-up, not measured); returns their ids."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        create: grpc.aio.UnaryUnaryMultiCallable[bytes, tasks_pb2.Task] = channel.unary_unary(
            TASK_SERVICE + "CreateTask", response_deserializer=tasks_pb2.Task.FromString
        )
        ids: list[str] = []
        while len(ids) < count:
            batch = min(32, count - len(ids))
            tasks = await asyncio.gather(
                *(create(request, metadata=bearer(key), timeout=60) for _ in range(batch))
            )
            ids.extend(t.id for t in tasks)
    return ids


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _alternate(round_index: int, items: Sequence[Any]) -> list[Any]:
    """A B in even rounds, B A in odd ones."""
    return list(items) if round_index % 2 == 0 else list(reversed(items))


# -- unary calls ------------------------------------------------------------------------


async def probe(run: Run, daemon: Daemon, creator_key: str, worker_key: str) -> dict[str, bytes]:
    """legato's real answers, byte for byte: the echo and fan-out ceilings send these."""
    async with grpc.aio.insecure_channel(daemon.address, options=CHANNEL_OPTIONS) as channel:

        def raw(method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
            return channel.unary_unary(TASK_SERVICE + method)

        # after_seq=0 replays from the start: the first event is the CREATED of the
        # task created below (the daemon is fresh), however the stream races the create.
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            TASK_SERVICE + "WatchTasks"
        )
        watch = stream(
            tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=0).SerializeToString(),
            metadata=bearer(worker_key),
        )
        create_request = payloads.create_request()
        created: bytes = await raw("CreateTask")(create_request, metadata=bearer(creator_key))
        task_id = tasks_pb2.Task.FromString(created).id
        got: bytes = await raw("GetTask")(
            payloads.get_request(task_id), metadata=bearer(creator_key)
        )
        event = await asyncio.wait_for(anext(aiter(watch)), 10)
        watch.cancel()
        claimed: bytes = await raw("ClaimTask")(
            payloads.claim_request(), metadata=bearer(worker_key)
        )
    found = {
        "CreateTask": created,
        "GetTask": got,
        "ClaimTask": claimed,
        "TaskEvent": event,
    }
    sizes = {
        "CreateTaskRequest": len(create_request),
        "Task (CreateTask answer)": len(created),
        "Task (GetTask answer)": len(got),
        "ClaimTaskResponse": len(claimed),
        "TaskEvent (CREATED)": len(event),
    }
    run.results.facts["message sizes (bytes)"] = ", ".join(f"{k} {v}" for k, v in sizes.items())
    return found


async def start_ceilings(run: Run) -> None:
    """Probes a fresh daemon for its answers, then starts both ceilings on them."""
    daemon = await start_daemon(run.procs, "probe", run.data_dir("probe"), run.socket("probe"))
    run.results.facts["event loop of the daemon"] = (
        "uvloop" if daemon.proc.maps_file("/uvloop/") else "asyncio"
    )
    creator, worker = await bench_agents(daemon)
    found = await probe(run, daemon, creator, worker)
    await run.procs.stop(daemon.proc)
    run.payload_file = run.scratch / "payloads.json"
    ceilings.write_payloads(run.payload_file, found)
    run.echo = await start_ceiling(run, "echo")
    run.fanout = await start_ceiling(run, "fanout")


@dataclass(frozen=True)
class UnaryTarget:
    name: str  # results key part: legato, legato_full, echo
    address: str
    method: str
    metadata: list[tuple[str, str]]


@dataclass(frozen=True)
class UnaryCase:
    key: str
    concurrency: int
    requests: list[bytes]
    response: str
    targets: tuple[UnaryTarget, ...]
    claims: bool = False


async def unary_section(run: Run) -> None:
    """CreateTask (1, 32 in flight; normal, full), GetTask, ClaimTask vs the echo ceiling."""
    profile = run.profile
    normal = await start_daemon(
        run.procs, "unary-normal", run.data_dir("unary-normal"), run.socket("unary-normal")
    )
    full = await start_daemon(
        run.procs,
        "unary-full",
        run.data_dir("unary-full"),
        run.socket("unary-full"),
        durability="full",
    )
    creator, worker = await bench_agents(normal)
    full_creator, _ = await bench_agents(full)
    assert run.echo is not None, "start_ceilings runs first"
    echo = run.echo.address
    get_ids = await create_tasks(normal.address, creator, payloads.create_request(), 200)

    def legato(method: str, key: str, daemon: Daemon = normal, name: str = "legato") -> UnaryTarget:
        return UnaryTarget(name, daemon.address, TASK_SERVICE + method, bearer(key))

    def echo_of(method: str, key: str) -> UnaryTarget:
        return UnaryTarget("echo", echo, ceilings.echo_method(method), bearer(key))

    create = [payloads.create_request()]
    gets = [payloads.get_request(i) for i in get_ids]
    claim = [payloads.claim_request()]
    cases = [
        UnaryCase(
            "create_c1",
            1,
            create,
            "Task",
            (legato("CreateTask", creator), echo_of("CreateTask", creator)),
        ),
        UnaryCase(
            "create_c32",
            32,
            create,
            "Task",
            (
                legato("CreateTask", creator),
                echo_of("CreateTask", creator),
                legato("CreateTask", full_creator, full, "legato_full"),
            ),
        ),
        UnaryCase(
            "get_c1", 1, gets, "Task", (legato("GetTask", creator), echo_of("GetTask", creator))
        ),
        UnaryCase(
            "get_c32", 32, gets, "Task", (legato("GetTask", creator), echo_of("GetTask", creator))
        ),
        UnaryCase(
            "claim_w16",
            16,
            claim,
            "ClaimTaskResponse",
            (legato("ClaimTask", worker), echo_of("ClaimTask", worker)),
            claims=True,
        ),
    ]
    # Pending tasks on the normal daemon, which the claim runs consume.
    supply = 0
    claim_rate = 1000.0  # calls/s; raised to the fastest claim run seen
    for round_index in range(profile.unary_rounds):
        for case in cases:
            for target in _alternate(round_index, case.targets):
                on_normal = target.address == normal.address
                if case.claims and on_normal:
                    needed = int(
                        claim_rate * (profile.unary_seconds + profile.unary_warmup_seconds) * 1.3
                    )
                    if supply < needed:
                        await create_tasks(normal.address, creator, create[0], needed - supply)
                        supply = needed
                outcome = await run.workers[0].call(
                    "unary",
                    address=target.address,
                    method=target.method,
                    requests=case.requests,
                    response=case.response,
                    metadata=target.metadata,
                    concurrency=case.concurrency,
                    seconds=profile.unary_seconds,
                    warmup_seconds=profile.unary_warmup_seconds,
                    stop_when_empty=case.claims and on_normal,
                )
                calls = len(outcome["latencies_ns"]) + outcome["warmup_calls"]
                key = f"unary.{case.key}.{target.name}"
                run.record_calls(key, outcome)
                if on_normal and case.key.startswith("create"):
                    supply += calls
                if case.claims and on_normal:
                    supply -= calls
                    claim_rate = max(claim_rate, run.results.values[f"{key}.rate"][-1])
                    if outcome["emptied"]:
                        run.results.notes.append(
                            f"unary round {round_index + 1}: the claim run ran out of pending "
                            "tasks before its time was up (measured until then)"
                        )
        run.say(
            f"unary round {round_index + 1}/{profile.unary_rounds}: CreateTask x32 "
            f"{run.results.values['unary.create_c32.legato.rate'][-1]:,.0f}/s vs echo "
            f"{run.results.values['unary.create_c32.echo.rate'][-1]:,.0f}/s"
        )
    await run.procs.stop(normal.proc)
    await run.procs.stop(full.proc)


# -- delivery -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamTarget:
    name: str  # legato or fanout
    address: str
    publish: str
    subscribe: str
    publish_metadata: list[tuple[str, str]]
    watch_metadata: list[tuple[str, str]]


Publish = Callable[[bytes], Awaitable[Any]]


async def open_watchers(
    run: Run, target: StreamTarget, name: str, watchers: int, publish: Publish
) -> list[Worker]:
    """Opens `watchers` streams spread over the worker processes; returns once all are live.

    A stream is live once it has received a message: warm-up events are
    published until every stream has had one.
    """
    workers = run.workers[: min(len(run.workers), watchers)]
    shares = _split(watchers, len(workers))
    await asyncio.gather(
        *(
            w.call(
                "watch_open",
                name=name,
                address=target.address,
                method=target.subscribe,
                request=payloads.watch_request(),
                metadata=target.watch_metadata,
                streams=share,
                per_channel=run.profile.streams_per_channel,
            )
            for w, share in zip(workers, shares, strict=True)
        )
    )
    deadline = time.monotonic() + LIVE_TIMEOUT
    warmup = payloads.create_request("w:")
    while True:
        await publish(warmup)
        await asyncio.sleep(0.05)
        states = await asyncio.gather(*(w.call("watch_live", name=name) for w in workers))
        errors = [e for s in states for e in s["errors"]]
        if errors:
            raise RuntimeError(f"{target.name} watch streams failed: {errors[:3]}")
        if sum(s["live"] for s in states) == watchers:
            return workers
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target.name}: not all {watchers} watch streams became live")


async def close_watchers(workers: Sequence[Worker], name: str) -> None:
    await asyncio.gather(*(w.call("watch_close", name=name) for w in workers))


class Publisher:
    """Publishes from the harness: legato's CreateTask or the fan-out's Publish, one code path."""

    def __init__(self, target: StreamTarget):
        self._channel = grpc.aio.insecure_channel(target.address, options=CHANNEL_OPTIONS)
        self._call: grpc.aio.UnaryUnaryMultiCallable[bytes, tasks_pb2.Task] = (
            self._channel.unary_unary(
                target.publish, response_deserializer=tasks_pb2.Task.FromString
            )
        )
        self._metadata = target.publish_metadata

    async def __call__(self, request: bytes) -> Any:
        return await self._call(request, metadata=self._metadata, timeout=60)

    async def close(self) -> None:
        await self._channel.close()


async def deliver(
    run: Run, target: StreamTarget, watchers: int, events: int, name: str
) -> list[int]:
    """Nanoseconds from each publish call's start to each watcher's receipt of it.

    Events go one at a time: the next is published once every watcher has the
    previous one, so a latency never includes queueing behind an earlier event.
    """
    publish = Publisher(target)
    workers: list[Worker] = []
    try:
        workers = await open_watchers(run, target, name, watchers, publish)
        sent: dict[int, int] = {}
        for key in range(-WARMUP_EVENTS, events):
            request = payloads.delivery_request(key)
            sent[key] = time.time_ns()
            await publish(request)
            arrived = await asyncio.gather(
                *(w.call("watch_wait", name=name, key=key, timeout=EVENT_TIMEOUT) for w in workers)
            )
            if not all(arrived):
                raise TimeoutError(f"{target.name}: event {key} did not reach every watcher")
        receipts = [
            r for w in workers for r in await w.call("watch_collect", name=name) if r[0] >= 0
        ]
    finally:
        if workers:
            await close_watchers(workers, name)
        await publish.close()
    if len(receipts) != watchers * events:
        raise RuntimeError(f"{target.name}: {len(receipts)} receipts, expected {watchers * events}")
    return [at - sent[key] for key, at in receipts]


async def delivery_section(run: Run) -> None:
    """Create-to-watcher delivery vs the fan-out ceiling; complete-to-result()."""
    profile = run.profile
    assert run.fanout is not None, "start_ceilings runs first"
    daemon = await start_daemon(
        run.procs, "delivery", run.data_dir("delivery"), run.socket("delivery")
    )
    creator, worker = await bench_agents(daemon)
    targets = [
        StreamTarget(
            "legato",
            daemon.address,
            TASK_SERVICE + "CreateTask",
            TASK_SERVICE + "WatchTasks",
            bearer(creator),
            bearer(worker),
        ),
        StreamTarget(
            "fanout",
            run.fanout.address,
            ceilings.PUBLISH,
            ceilings.SUBSCRIBE,
            bearer(creator),
            bearer(worker),
        ),
    ]
    for watchers, events in zip(profile.watcher_counts, profile.delivery_events, strict=True):
        for round_index in range(profile.delivery_rounds):
            for target in _alternate(round_index, targets):
                name = f"{target.name}-{watchers}-{round_index}"
                latencies = await deliver(run, target, watchers, events, name)
                key = f"delivery.w{watchers}.{target.name}"
                run.results.add(f"{key}.p50", percentile(latencies, 50) / 1e6)
                run.results.add(f"{key}.p99", percentile(latencies, 99) / 1e6)
            run.say(
                f"delivery {watchers} watchers round {round_index + 1}: p99 legato "
                f"{run.results.values[f'delivery.w{watchers}.legato.p99'][-1]:.2f} ms, fan-out "
                f"{run.results.values[f'delivery.w{watchers}.fanout.p99'][-1]:.2f} ms"
            )
    for _ in range(profile.delivery_rounds):
        latencies = await run.workers[0].call(
            "result_latency",
            address=daemon.address,
            creator_key=creator,
            worker_key=worker,
            samples=profile.result_samples,
            settle_seconds=0.02,
        )
        run.results.add("delivery.result.p50", percentile(latencies, 50) / 1e6)
        run.results.add("delivery.result.p99", percentile(latencies, 99) / 1e6)
    await run.procs.stop(daemon.proc)


# -- scale ----------------------------------------------------------------------------------


async def scale_section(run: Run) -> None:
    """GetTask, ClaimTask and ListTasks pages on a small and a large history; the
    first page of an agent that sees few of the tasks, too."""
    profile = run.profile
    dbs = []
    for size in profile.scale_sizes:
        db = await history_db(run.procs, run.cache, size, run.scratch)
        how = "cached" if db.cached else "built now"
        run.results.facts[f"history database {size:,}"] = (
            f"{_shown(db.data_dir / 'legato.db')}: generated in {db.build_seconds:.1f} s ({how})"
        )
        run.say(f"history database of {size:,} tasks ready ({how}, {db.build_seconds:.1f} s)")
        dbs.append(db)
    small, large = dbs
    db_sizes = [(db.data_dir / "legato.db").stat().st_size for db in dbs]
    run.results.add(
        "scale.bytes_per_task_generated",
        (db_sizes[1] - db_sizes[0]) / (large.tasks - small.tasks),
    )
    daemons: list[Daemon] = []
    observer_keys: list[str] = []
    for db in dbs:
        name = f"scale-{db.tasks}"
        data_dir = db.copy_to(run.data_dir(name))
        daemon = await start_daemon(run.procs, name, data_dir, run.socket(name))
        daemons.append(daemon)
        if db is large:
            run.results.add("startup.serve_large", daemon.start_seconds)
        await create_tasks(
            daemon.address, db.creator_key, payloads.create_request(label=LISTED_LABEL), 100
        )
        async with AsyncClient(daemon.address, api_key=daemon.admin_key()) as admin:
            _, observer_key = await admin.create_agent(OBSERVER, labels=[OBSERVER_LABEL])
        observer_keys.append(observer_key)
        await create_tasks(
            daemon.address,
            observer_key,
            payloads.create_request(label=OBSERVER_LABEL),
            OBSERVER_TASKS,
        )
    supply = [0, 0]
    ops: list[tuple[str, list[bytes], str, bool]] = [
        ("get", [], "Task", False),
        ("list_first", [payloads.list_request(page_size=100)], "ListTasksResponse", False),
        (
            "list_pending",
            [payloads.list_request(label=LISTED_LABEL, pending_only=True, page_size=100)],
            "ListTasksResponse",
            False,
        ),
        ("claim", [payloads.claim_request()], "ClaimTaskResponse", True),
        ("list_few", [payloads.list_request(page_size=100)], "ListTasksResponse", False),
    ]
    for round_index in range(profile.scale_rounds):
        for op, requests, response, claims in ops:
            for index in _alternate(round_index, [0, 1]):
                db, daemon = dbs[index], daemons[index]
                method = {"get": "GetTask", "claim": "ClaimTask"}.get(op, "ListTasks")
                if op == "get":
                    requests = [payloads.get_request(i) for i in db.sample_ids]
                if claims and supply[index] < profile.scale_claims:
                    await create_tasks(
                        daemon.address,
                        db.creator_key,
                        payloads.create_request(),
                        profile.scale_claims - supply[index],
                    )
                    supply[index] = profile.scale_claims
                key = db.worker_key if claims else db.creator_key
                if op == "list_few":
                    key = observer_keys[index]
                outcome = await run.workers[0].call(
                    "unary",
                    address=daemon.address,
                    method=TASK_SERVICE + method,
                    requests=requests,
                    response=response,
                    metadata=bearer(key),
                    concurrency=1,
                    seconds=profile.scale_seconds if not claims else 600.0,
                    warmup_seconds=0.1 if not claims else 0.0,
                    max_calls=profile.scale_claims if claims else None,
                    stop_when_empty=claims,
                )
                if claims:
                    supply[index] -= len(outcome["latencies_ns"])
                run.record_calls(f"scale.{op}.{'small' if index == 0 else 'large'}", outcome)
        run.say(
            f"scale round {round_index + 1}/{profile.scale_rounds}: GetTask p50 "
            f"{run.results.values['scale.get.small.p50'][-1]:.3f} ms at {small.tasks:,}, "
            f"{run.results.values['scale.get.large.p50'][-1]:.3f} ms at {large.tasks:,}"
        )
    await run.procs.stop(daemons[0].proc)
    large_daemon = daemons[1]
    for _ in range(profile.large_start_repeats - 1):
        await run.procs.stop(large_daemon.proc)
        large_daemon = await start_daemon(
            run.procs, f"scale-{large.tasks}", large_daemon.data_dir, large_daemon.socket
        )
        run.results.add("startup.serve_large", large_daemon.start_seconds)
    await run.procs.stop(large_daemon.proc)


# -- footprint ------------------------------------------------------------------------------


async def footprint_section(run: Run) -> None:
    """Bytes per finished task, RSS idle and with watchers, CPU of an idle daemon."""
    profile = run.profile
    data_dir = run.data_dir("lifecycle")
    daemon = await start_daemon(run.procs, "lifecycle", data_dir, run.socket("lifecycle"))
    creator, worker = await bench_agents(daemon)
    await run.procs.stop(daemon.proc)
    empty_bytes = daemon.db_bytes()
    daemon = await start_daemon(run.procs, "lifecycle", data_dir, run.socket("lifecycle"))
    outcome = await run.workers[0].call(
        "lifecycle",
        address=daemon.address,
        creator_key=creator,
        worker_key=worker,
        tasks=profile.lifecycle_tasks,
        concurrency=16,
    )
    await run.procs.stop(daemon.proc)  # a clean stop checkpoints the WAL into the file
    run.results.add(
        "footprint.bytes_per_task_lifecycle",
        (daemon.db_bytes() - empty_bytes) / profile.lifecycle_tasks,
    )
    run.results.add(
        "footprint.lifecycle_rate", profile.lifecycle_tasks / (outcome["elapsed_ns"] / 1e9)
    )

    daemon = await start_daemon(run.procs, "footprint", run.data_dir("footprint"), run.socket("fp"))
    creator, worker = await bench_agents(daemon)
    await asyncio.sleep(1.0)
    run.results.add("footprint.rss_idle_mb", daemon.proc.rss_bytes() / 2**20)
    target = StreamTarget(
        "legato",
        daemon.address,
        TASK_SERVICE + "CreateTask",
        TASK_SERVICE + "WatchTasks",
        bearer(creator),
        bearer(worker),
    )
    publish = Publisher(target)
    opened: list[tuple[list[Worker], str]] = []
    try:
        workers = await open_watchers(run, target, "idle", profile.idle_watchers, publish)
        opened.append((workers, "idle"))
        await asyncio.sleep(1.0)  # let the last warm-up deliveries finish
        cpu, switches, started = (
            daemon.proc.cpu_seconds(),
            daemon.proc.context_switches(),
            time.perf_counter(),
        )
        await asyncio.sleep(profile.idle_cpu_seconds)
        elapsed = time.perf_counter() - started
        run.results.add("footprint.idle_cpu_pct", (daemon.proc.cpu_seconds() - cpu) / elapsed * 100)
        run.results.add(
            "footprint.idle_wakeups", (daemon.proc.context_switches() - switches) / elapsed
        )
        run.results.facts["idle window"] = (
            f"{elapsed:.1f} s with {profile.idle_watchers} open watch streams"
        )
        more = profile.rss_watchers - profile.idle_watchers
        workers = await open_watchers(run, target, "more", more, publish)
        opened.append((workers, "more"))
        await asyncio.sleep(1.0)
        rss = daemon.proc.rss_bytes() / 2**20
        run.results.add("footprint.rss_watchers_mb", rss)
        run.results.add(
            "footprint.rss_per_watcher_kb",
            (rss - run.results.median("footprint.rss_idle_mb")) * 1024 / profile.rss_watchers,
        )
        run.results.add("footprint.threads", daemon.proc.threads())
    finally:
        for workers, name in opened:
            await close_watchers(workers, name)
        await publish.close()
    await run.procs.stop(daemon.proc)


# -- start-up -------------------------------------------------------------------------------


async def _timed_exec(argv: list[str], env: dict[str, str]) -> float:
    """Seconds a command takes to exit 0."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited with {process.returncode}: {err.decode()[-500:]}")
    return seconds


async def mcp_cold_start(env: dict[str, str]) -> float:
    """Seconds from spawning `legato mcp` to its answer to `initialize`."""
    return await spawn_to_answer(Kind("legato mcp", [str(LEGATO), "mcp"]), env)


async def startup_section(run: Run) -> None:
    """`legato serve` to SERVING on an empty dir; cold starts of `legato mcp` and the CLI."""
    profile = run.profile
    daemon: Daemon | None = None
    for index in range(profile.start_repeats):
        if daemon is not None:
            await run.procs.stop(daemon.proc)
        name = f"start-{index}"
        daemon = await start_daemon(run.procs, name, run.data_dir(name), run.socket(name))
        run.results.add("startup.serve_empty", daemon.start_seconds)
    assert daemon is not None
    _, worker = await bench_agents(daemon)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/"),
        "LEGATO_AGENT_KEY": worker,
        "LEGATO_ADDRESS": daemon.address,
    }
    for _ in range(profile.start_repeats):
        run.results.add("startup.mcp", await mcp_cold_start(env))
        run.results.add("startup.cli", await _timed_exec([str(LEGATO), "agent", "whoami"], env))
        run.results.add(
            "startup.python_grpc",
            await _timed_exec([sys.executable, "-c", "import grpc, legato.v1.tasks_pb2"], env),
        )
    await run.procs.stop(daemon.proc)


SECTIONS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "unary": unary_section,
    "delivery": delivery_section,
    "scale": scale_section,
    "footprint": footprint_section,
    "startup": startup_section,
}
