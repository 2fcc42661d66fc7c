"""The CreateTask ladder: from a bare echo to legato, one thing added per step.

Every rung is a server measured in the same run, in alternating order within
each round, by the same load-generator process sending the same request
bytes to a method of the same name (the echo's aside):

1. `echo`: the bare grpc.aio echo (`bench.ceilings`);
2. `wire`: the echo behind legato's handler wrapping (`bench.naive`);
3. `naive`: plus one INSERT + COMMIT per call on one database thread;
4. `schema`: plus legato's schema and statements, still a commit per call;
5. `legato`: `legato serve` itself.

Off the ladder, in the same rounds: step 4 on legato's own group-committing
`db.Database` (`grouped`), the issue's aiosqlite server (`issue`), and any
`--variant NAME=DIR`: `legato serve` run with DIR first on PYTHONPATH, i.e. a
modified copy of `legato.server` (DIR holds `legato/server/`); and when DIR
also holds a copy of `bench/`, step 2 run from DIR's copies of both (a change
to how handlers are wrapped, measured on its own step).

Each rung is measured at 1 and at 32 calls in flight: calls/s, p50/p99, and
the server's CPU per call (utime + stime of /proc/PID/stat over the run,
divided by the calls made, warm-up included). Then legato (step 5), step 4 and
the variants are profiled with py-spy during a 32-in-flight run of their own,
which is not counted in the figures (see `bench.profiler`); and the pieces of
legato's create are timed alone (`bench.components`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import ceilings, payloads, profiler
from bench.loadgen import bearer
from bench.procs import Proc, start_daemon
from bench.sections import TASK_SERVICE, Run, _alternate, bench_agents

IN_FLIGHT = (1, 32)


@dataclass(frozen=True)
class Rung:
    """One server of the ladder."""

    key: str  # results key part
    step: str  # "1".."5" on the ladder; else a mark of its own
    title: str
    adds: str  # what it adds to the step below it (or what it is, off the ladder)

    @property
    def on_ladder(self) -> bool:
        return self.step.isdigit()


LADDER = [
    Rung(
        "echo", "1", "bare echo", "grpc.aio answering legato's response bytes (bench/ceilings.py)"
    ),
    Rung(
        "wire",
        "2",
        "echo behind legato's handler wrapping",
        "legato's wrapping of every handler (rpc.guard): the real Authenticator (a real "
        "AgentRegistry on a temp database), the wire format and the error mapping; the "
        "request parsed as a CreateTaskRequest",
    ),
    Rung(
        "naive",
        "3",
        "naive durable",
        "one INSERT of a 6-column row + COMMIT per call, one shared connection on one "
        "database thread, WAL, synchronous NORMAL; no group commit",
    ),
    Rung(
        "schema",
        "4",
        "naive durable, legato's schema",
        "legato's store.SCHEMA and statements: open-task count read, tasks row (27 columns, "
        "6 indexes), task_labels row, events row, the open_tasks trigger; a commit per call",
    ),
    Rung(
        "legato",
        "5",
        "legato",
        "`legato serve`: validation, TaskRecord, group commit on the writer thread, event "
        "bus, claim waiters, the Task answer built and serialized",
    ),
]
OFF_LADDER = [
    Rung(
        "grouped",
        "4g",
        "step 4 on legato's db.Database",
        "step 4 with commits by legato's writer thread: group commit, a savepoint per call, "
        "checkpoints on their own thread",
    ),
    Rung(
        "issue",
        "ref",
        "the issue's naive server",
        "no handler wrapping, asyncio's loop, aiosqlite `await execute(INSERT)` + "
        "`await commit()` on one shared connection",
    ),
]


WIRE_VARIANT = "_wire"  # the key suffix of a variant's step 2


def variant_rungs(variants: list[tuple[str, Path]]) -> list[Rung]:
    rungs = []
    for name, path in variants:
        rungs.append(
            Rung(
                f"variant_{name}",
                f"5·{name}",
                f"legato, variant {name}",
                f"`legato serve` from {path}",
            )
        )
        if (path / "bench" / "naive.py").exists():
            rungs.append(
                Rung(
                    f"variant_{name}{WIRE_VARIANT}",
                    f"2·{name}",
                    f"step 2, variant {name}",
                    f"step 2 run from {path}: its bench.naive over its legato.server",
                )
            )
    return rungs


@dataclass
class Server:
    rung: Rung
    proc: Proc
    address: str
    method: str
    key: str


def key_of(rung: str, in_flight: int) -> str:
    return f"ladder.c{in_flight}.{rung}"


async def _start_naive(
    run: Run, rung: Rung, kind: str = "", pythonpath: Path | None = None
) -> Server:
    """A `bench.naive` server of `kind` (default: the rung's key); with
    `pythonpath`, both `bench` and `legato.server` are imported from there
    (`-P`: the repository's own copy, the working directory, is not on the path)."""
    assert run.payload_file is not None
    socket = run.socket(f"ladder-{rung.key}")
    socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = None
    isolate: list[str] = []
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        isolate = ["-P"]
    proc = run.procs.spawn(
        f"ladder-{rung.key}",
        [
            sys.executable,
            *isolate,
            "-m",
            "bench.naive",
            kind or rung.key,
            "--listen",
            f"unix:{socket}",
            "--payloads",
            str(run.payload_file),
            "--data-dir",
            str(run.data_dir(f"ladder-{rung.key}")),
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.popen.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.popen.stdout.readline), 60)
    word, _, key = line.decode().strip().partition(" ")
    if word != "ready":
        raise RuntimeError(f"bench.naive {rung.key} did not start; see {proc.log}")
    return Server(rung, proc, f"unix:{socket}", TASK_SERVICE + "CreateTask", key)


async def _start_legato(run: Run, rung: Rung, pythonpath: Path | None = None) -> Server:
    env = None
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    name = f"ladder-{rung.key}"
    daemon = await start_daemon(run.procs, name, run.data_dir(name), run.socket(name), env=env)
    creator, _ = await bench_agents(daemon)
    return Server(rung, daemon.proc, daemon.address, TASK_SERVICE + "CreateTask", creator)


async def start_servers(run: Run, rungs: list[Rung]) -> list[Server]:
    assert run.echo is not None, "start_ceilings runs first"
    echo = run.echo
    variants = dict(run.variants)

    async def start(rung: Rung) -> Server:
        if rung.key == "echo":
            # The echo checks no key; the creator's is sent all the same (same bytes).
            return Server(rung, echo.proc, echo.address, ceilings.echo_method("CreateTask"), "")
        if rung.key == "legato":
            return await _start_legato(run, rung)
        if rung.key.startswith("variant_") and rung.key.endswith(WIRE_VARIANT):
            name = rung.key.removeprefix("variant_").removesuffix(WIRE_VARIANT)
            return await _start_naive(run, rung, "wire", variants[name])
        if rung.key.startswith("variant_"):
            return await _start_legato(run, rung, variants[rung.key.removeprefix("variant_")])
        return await _start_naive(run, rung)

    started = list(await asyncio.gather(*(start(rung) for rung in rungs)))
    echo_key = next((s.key for s in started if s.rung.key == "legato"), "")
    for server in started:
        if server.rung.key == "echo":
            server.key = echo_key
    return started


async def measure(run: Run, server: Server, in_flight: int, seconds: float, warmup: float) -> None:
    """One run of `in_flight` concurrent CreateTasks; records calls/s, p50, p99, CPU per call."""
    worker = run.workers[0]
    pid = server.proc.pid
    server_cpu, load_cpu = server.proc.cpu_seconds(), worker.proc.cpu_seconds()
    loop_cpu = profiler.thread_cpu(pid).get(pid, 0.0)
    outcome = await worker.call(
        "unary",
        address=server.address,
        method=server.method,
        requests=[payloads.create_request()],
        response="Task",
        metadata=bearer(server.key),
        concurrency=in_flight,
        seconds=seconds,
        warmup_seconds=warmup,
    )
    calls = len(outcome["latencies_ns"]) + outcome["warmup_calls"]
    key = key_of(server.rung.key, in_flight)
    run.record_calls(key, outcome)
    if calls:
        run.results.add(f"{key}.cpu_us", (server.proc.cpu_seconds() - server_cpu) / calls * 1e6)
        # The main thread runs the event loop: in a Python server it is the one
        # that cannot use a second core.
        loop_us = (profiler.thread_cpu(pid).get(pid, 0.0) - loop_cpu) / calls * 1e6
        run.results.add(f"{key}.loop_cpu_us", loop_us)
        run.results.add(f"{key}.load_cpu_us", (worker.proc.cpu_seconds() - load_cpu) / calls * 1e6)


async def profile_server(run: Run, server: Server, seconds: int) -> dict[str, Any]:
    """py-spy's three recordings of `server` during a 32-in-flight run of its own."""
    out_dir = run.cache / f"profiles-{run.profile.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    load = asyncio.create_task(
        run.workers[0].call(
            "unary",
            address=server.address,
            method=server.method,
            requests=[payloads.create_request()],
            response="Task",
            metadata=bearer(server.key),
            concurrency=32,
            seconds=len(profiler.MODES) * (seconds + 0.6) + 0.5,
            warmup_seconds=0.3,
        )
    )
    recordings: dict[str, list[profiler.Stack]] = {}
    try:
        await asyncio.sleep(0.5)
        cpu_before, started = profiler.thread_cpu(server.proc.pid), time.perf_counter()
        for mode in profiler.MODES:
            output = out_dir / f"{server.rung.key}-{mode}.txt"
            recordings[mode] = await profiler.record(server.proc.pid, mode, seconds, output)
        cpu_after, elapsed = profiler.thread_cpu(server.proc.pid), time.perf_counter() - started
    finally:
        outcome = await load
    cpu_shares = {tid: (cpu - cpu_before.get(tid, 0.0)) / elapsed for tid, cpu in cpu_after.items()}
    summary = profiler.summarise(recordings, cpu_shares)
    summary["seconds"] = seconds
    summary["calls_per_s_while_profiled"] = len(outcome["latencies_ns"]) / (
        outcome["elapsed_ns"] / 1e9
    )
    summary["raw"] = str(out_dir)
    (out_dir / f"{server.rung.key}-summary.json").write_text(json.dumps(summary, indent=1))
    return summary


async def ladder_section(run: Run) -> None:
    """The ladder's rungs at 1 and 32 in flight, alternating; then profiles of steps 5 and 4."""
    profile = run.profile
    rungs = [*LADDER, *OFF_LADDER, *variant_rungs(run.variants)]
    if importlib.util.find_spec("aiosqlite") is None:
        rungs = [r for r in rungs if r.key != "issue"]
        run.results.notes.append(
            "ladder: aiosqlite is not installed, no row for the issue's server (make bench "
            "installs it)"
        )
    if profile.ladder_rungs:
        chosen = {*profile.ladder_rungs, "echo"}  # every figure is compared with the echo
        rungs = [r for r in rungs if r.key in chosen or r.key.startswith("variant_")]
    servers = await start_servers(run, rungs)
    run.results.facts["ladder rungs"] = ", ".join(f"{r.step} {r.key}" for r in rungs)
    for round_index in range(profile.ladder_rounds):
        for in_flight in IN_FLIGHT:
            for server in _alternate(round_index, servers):
                await measure(
                    run, server, in_flight, profile.ladder_seconds, profile.ladder_warmup_seconds
                )
        rates = run.results.values
        run.say(
            f"ladder round {round_index + 1}/{profile.ladder_rounds}, 32 in flight: "
            + ", ".join(
                f"{s.rung.step} {rates[key_of(s.rung.key, 32) + '.rate'][-1]:,.0f}/s"
                for s in servers
            )
        )
    run.results.details["ladder.variants"] = {name: str(path) for name, path in run.variants}
    for server in servers:
        stats = run.data_dir(f"ladder-{server.rung.key}") / "commits.json"
        if stats.exists():  # the server: how many of its COMMITs committed
            counts = json.loads(stats.read_text())
            run.results.details["ladder.issue_commits"] = counts
    if profiler.py_spy() is None:
        run.results.notes.append("ladder: py-spy is not installed, no profiles (make bench-ladder)")
    else:
        for server in servers:
            if server.rung.key in profile.profiled or server.rung.key.startswith("variant_"):
                try:
                    run.results.details[f"ladder.profile.{server.rung.key}"] = await profile_server(
                        run, server, profile.profile_seconds
                    )
                except RuntimeError as exc:
                    run.results.notes.append(f"ladder: no profile of {server.rung.key}: {exc}")
                run.say(f"ladder: profiled {server.rung.key}")
    for server in servers:
        if server.rung.key != "echo":
            await run.procs.stop(server.proc)
    # The pieces of legato's create timed alone, with nothing else running.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.components",
        "--scale",
        str(profile.components_scale),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    if process.returncode == 0:
        run.results.details["ladder.components"] = json.loads(out)
    else:
        run.results.notes.append(f"ladder: bench.components failed: {err.decode()[-300:]}")
