"""`python -m bench.postgres`: the PostgreSQL backend, measured in one run against its
references on the same machine and the same server.

- CreateTask at 1 and 32 in flight: legato on PostgreSQL, legato on SQLite,
  and the enqueue of a PostgreSQL-native queue (pgqueuer, a bench-only
  dependency) on the same server, rounds alternating. legato's calls come
  from a load-generator process (`bench.loadgen`) over gRPC; pgqueuer's
  enqueues are library calls from this process, one connection per call in
  flight, as its users make them.
- ClaimTask + CompleteTask throughput: workers spread over three daemons on
  one database, draining tasks made beforehand.
- Delivery across daemons: from the start of a CreateTask on daemon A to a
  watcher on daemon B receiving its event, one event at a time.

Writes the figures to bench/results/postgres.json and the section between the
`postgres` markers of BENCHMARKS.md (a full `make bench` keeps that section).
`--smoke`: small counts, writes under bench/results/smoke/ only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
from legato.client import AsyncClient
from legato.v1 import tasks_pb2, tasks_pb2_grpc

from bench import payloads
from bench.loadgen import Worker, bearer
from bench.procs import REPO, Daemon, Processes, start_daemon
from bench.stats import percentile

URL = os.environ.get(
    "LEGATO_BENCH_DATABASE_URL",
    os.environ.get("LEGATO_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
)
TASK_SERVICE = "/legato.v1.TaskService/"
BEGIN, END = "<!-- postgres:begin -->", "<!-- postgres:end -->"
TIMES = "\u00d7"


@dataclass(frozen=True)
class Counts:
    rounds: int
    seconds: float
    warmup: float
    claim_tasks: int
    claim_workers: int
    delivery_events: int


FULL = Counts(rounds=3, seconds=2.0, warmup=0.3, claim_tasks=3000, claim_workers=9,
              delivery_events=300)  # fmt: skip
SMOKE = Counts(rounds=1, seconds=0.5, warmup=0.1, claim_tasks=300, claim_workers=6,
               delivery_events=40)  # fmt: skip


def schema_url(url: str, schema: str, *settings: str) -> str:
    separator = "&" if "?" in url else "?"
    options = "%20".join(f"-c{s.replace('=', '%3D')}" for s in (f"search_path={schema}", *settings))
    return f"{url}{separator}options={options}"


def rate(outcome: dict[str, Any]) -> float:
    return len(outcome["latencies_ns"]) / (outcome["elapsed_ns"] / 1e9)


def ms(latencies_ns: Sequence[int], q: float) -> float:
    return percentile(sorted(latencies_ns), q) / 1e6


CLAIM_LABEL = "@claims"


async def agents(daemon: Daemon, admin_key: str, *names: str) -> list[str]:
    keys = []
    async with AsyncClient(daemon.address, api_key=admin_key) as admin:
        for name in names:
            _, key = await admin.create_agent(name, labels=[payloads.LABEL, CLAIM_LABEL])
            keys.append(key)
    return keys


async def pgqueuer_enqueue(
    url: str, in_flight: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """pgqueuer's enqueue from `in_flight` coroutines, each on its own connection."""
    from pgqueuer.queries import Queries

    conns = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(in_flight)]
    try:
        queries = [Queries.from_psycopg_connection(conn) for conn in conns]
        payload = payloads.create_request()

        async def run(q: Any, until: float, latencies: list[int]) -> None:
            while time.perf_counter() < until:
                started = time.perf_counter_ns()
                await q.enqueue("bench", payload)
                latencies.append(time.perf_counter_ns() - started)

        warm: list[int] = []
        await asyncio.gather(*(run(q, time.perf_counter() + warmup, warm) for q in queries))
        latencies: list[int] = []
        started = time.perf_counter_ns()
        until = time.perf_counter() + seconds
        await asyncio.gather(*(run(q, until, latencies) for q in queries))
        return {"latencies_ns": latencies, "elapsed_ns": time.perf_counter_ns() - started}
    finally:
        for conn in conns:
            await conn.close()


async def create_section(
    counts: Counts, worker: Worker, targets: dict[str, tuple[Daemon, str]], pgq_url: str
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    request = payloads.create_request()
    for in_flight in (1, 32):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in (*targets, "pgqueuer")}
        for round_index in range(counts.rounds):
            order = [*targets, "pgqueuer"]
            order = order[round_index % len(order) :] + order[: round_index % len(order)]
            for name in order:
                if name == "pgqueuer":
                    outcome = await pgqueuer_enqueue(
                        pgq_url, in_flight, counts.seconds, counts.warmup
                    )
                else:
                    daemon, key = targets[name]
                    outcome = await worker.call(
                        "unary",
                        address=daemon.address,
                        method=TASK_SERVICE + "CreateTask",
                        requests=[request],
                        response="Task",
                        metadata=bearer(key),
                        concurrency=in_flight,
                        seconds=counts.seconds,
                        warmup_seconds=counts.warmup,
                    )
                runs[name].append(outcome)
        for name, outcomes in runs.items():
            figures[f"create_c{in_flight}.{name}"] = {
                "rate": statistics.median(rate(o) for o in outcomes),
                "p50_ms": statistics.median(ms(o["latencies_ns"], 50) for o in outcomes),
                "p99_ms": statistics.median(ms(o["latencies_ns"], 99) for o in outcomes),
            }
    return figures


async def claim_section(counts: Counts, daemons: list[Daemon], admin_key: str) -> dict[str, Any]:
    creator, *workers = await agents(
        daemons[0],
        admin_key,
        "claim-creator",
        *(f"claimer{n}" for n in range(counts.claim_workers)),
    )
    request = payloads.create_request(label=CLAIM_LABEL)
    async with grpc.aio.insecure_channel(daemons[0].address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        parsed = tasks_pb2.CreateTaskRequest.FromString(request)
        for _ in range(0, counts.claim_tasks, 50):
            await asyncio.gather(
                *(stub.CreateTask(parsed, metadata=bearer(creator)) for _ in range(50))
            )
    done = 0
    claim = tasks_pb2.ClaimTaskRequest.FromString(payloads.claim_request(label=CLAIM_LABEL))

    async def work(daemon: Daemon, key: str) -> None:
        nonlocal done
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            while True:
                claimed = await stub.ClaimTask(claim, metadata=bearer(key))
                if not claimed.HasField("task"):
                    return
                await stub.CompleteTask(
                    tasks_pb2.CompleteTaskRequest(
                        id=claimed.task.id, lease_token=claimed.lease_token
                    ),
                    metadata=bearer(key),
                )
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(work(daemons[n % 3], key) for n, key in enumerate(workers)))
    seconds = time.perf_counter() - started
    return {"claim_complete": {"tasks": done, "workers": len(workers), "rate": done / seconds}}


async def delivery_section(counts: Counts, a: Daemon, b: Daemon, admin_key: str) -> dict[str, Any]:
    (key,) = await agents(a, admin_key, f"deliverer-{secrets.token_hex(3)}")
    latencies: list[int] = []
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        create = tasks_pb2_grpc.TaskServiceStub(on_a).CreateTask
        watch = tasks_pb2_grpc.TaskServiceStub(on_b).WatchTasks(
            tasks_pb2.WatchTasksRequest(labels=["@delivery"]), metadata=bearer(key)
        )
        try:
            for n in range(-10, counts.delivery_events):  # the first ten warm up
                sent = time.perf_counter_ns()
                task = await create(
                    tasks_pb2.CreateTaskRequest(content=f"d{n}", labels=["@delivery"]),
                    metadata=bearer(key),
                )
                while True:
                    event = await asyncio.wait_for(watch.read(), 10)
                    assert isinstance(event, tasks_pb2.TaskEvent)
                    if event.task.id == task.id:
                        break
                if n >= 0:
                    latencies.append(time.perf_counter_ns() - sent)
        finally:
            watch.cancel()
    return {
        "delivery": {
            "events": len(latencies),
            "p50_ms": ms(latencies, 50),
            "p99_ms": ms(latencies, 99),
        }
    }


def targets_table(figures: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for n in (1, 32):
        pg, lite, pgq = (
            figures[f"create_c{n}.{k}"]["rate"] for k in ("postgres", "sqlite", "pgqueuer")
        )
        to_lite, to_pgq = pg / lite, pg / pgq
        rows.append(
            (
                f"CreateTask, {n} in flight: PostgreSQL vs SQLite backend",
                f"≥ 0.50{TIMES}",
                f"{to_lite:.2f}{TIMES}",
                "PASS" if to_lite >= 0.5 else "MISS",
            )
        )
        rows.append(
            (
                f"CreateTask, {n} in flight: PostgreSQL vs pgqueuer enqueue",
                f"> 1.00{TIMES}",
                f"{to_pgq:.2f}{TIMES}",
                "PASS" if to_pgq > 1 else "MISS",
            )
        )
    p99 = figures["delivery"]["p99_ms"]
    rows.append(("create on A → watcher on B, p99", "< 10 ms", f"{p99:.2f} ms",
                 "PASS" if p99 < 10 else "MISS"))  # fmt: skip
    return rows


def markdown(figures: dict[str, Any], facts: dict[str, str], counts: Counts) -> str:
    lines = [
        BEGIN,
        "## PostgreSQL backend",
        "",
        f"Generated by `make bench-postgres` on {facts['when']}, in {facts['seconds']} s; "
        f"PostgreSQL {facts['server']} on this machine (synchronous_commit "
        f"{facts['synchronous_commit']}), pgqueuer {facts['pgqueuer']}; load average before / "
        f"after {facts['load']}. A MISS is reported, never fatal.",
        "",
        "| target | wanted | measured | status |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | **{d}** |" for a, b, c, d in targets_table(figures)),
        "",
        f"CreateTask: {counts.rounds} rounds of {counts.seconds:g} s per target (after "
        f"{counts.warmup:g} s of warm-up), targets alternating; medians over rounds.",
        "",
        "| call | in flight | calls/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    names = {
        "postgres": "legato, PostgreSQL",
        "sqlite": "legato, SQLite",
        "pgqueuer": "pgqueuer enqueue",
        "postgres_relaxed": "legato, PostgreSQL, synchronous_commit off (reference)",
    }
    for n in (1, 32):
        for key, name in names.items():
            f = figures[f"create_c{n}.{key}"]
            lines.append(
                f"| {name} | {n} | {f['rate']:,.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} |"
            )
    claim = figures["claim_complete"]
    delivery = figures["delivery"]
    lines += [
        "",
        "legato on SQLite at `--durability normal` does not wait for a sync at commit; on "
        "PostgreSQL a commit waits for the server's WAL flush (synchronous_commit on, the "
        "server's default, which `normal` leaves as it is). The reference row shows what that "
        "flush costs here; with it off, an acknowledged create survives a daemon's `kill -9` "
        "but not a crash of the server.",
        "",
        "What a create costs on PostgreSQL: alone, the creator's advisory lock and one guarded "
        "statement (idempotency key, open count, the task, its labels, its count, the event "
        "counter, the event, NOTIFY) in one round trip, then COMMIT and the sync in a second; "
        "queued with others, the lot of them in two statements, then one counter statement "
        "and one COMMIT for the group. pgqueuer's enqueue is one INSERT from this "
        "process, with no RPC in front of it: at 1 in flight legato on SQLite, gRPC included, "
        "takes longer than that.",
        "",
        "| measure | figure |",
        "|---|---|",
        f"| ClaimTask + CompleteTask, {claim['workers']} workers over 3 daemons, "
        f"{claim['tasks']:,} tasks | {claim['rate']:,.0f} tasks/s |",
        f"| create on A → watcher on B ({delivery['events']} events, one at a time) | "
        f"p50 {delivery['p50_ms']:.2f} ms, p99 {delivery['p99_ms']:.2f} ms |",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


async def run(counts: Counts) -> tuple[dict[str, Any], dict[str, str]]:
    scratch = Path(tempfile.mkdtemp(prefix="legato-pgbench-"))
    results = REPO / "bench" / "results"
    procs = Processes(results / "logs-postgres")
    # legato's, pgqueuer's, and legato's without the commit flush: apart, so
    # that no daemon hears another's commits while creates are measured.
    schemas = [f"legato_bench_{secrets.token_hex(4)}" for _ in range(3)]
    with psycopg.connect(URL, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f"CREATE SCHEMA {schema}")
        server = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        sync = str(conn.execute("SHOW synchronous_commit").fetchone()[0])  # type: ignore[index]
    legato_url, pgq_url = (schema_url(URL, s) for s in schemas[:2])
    began = time.perf_counter()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    worker = Worker.start(procs, "loadgen-postgres")
    try:
        from pgqueuer.queries import Queries

        async with await psycopg.AsyncConnection.connect(pgq_url, autocommit=True) as conn:
            await Queries.from_psycopg_connection(conn).install()
        lite = await start_daemon(procs, "sqlite", scratch / "lite", scratch / "lite.sock")

        async def pg_daemon(name: str, url: str) -> Daemon:
            return await start_daemon(
                procs, f"pg-{name}", scratch / f"pg{name}", scratch / f"pg{name}.sock", database=url
            )

        first = await pg_daemon("a", legato_url)
        admin_key = first.admin_key()
        (lite_key,) = await agents(lite, lite.admin_key(), "creator")
        (pg_key,) = await agents(first, admin_key, "creator")
        # The same database without waiting for the server's WAL flush at each
        # commit: what that flush costs, for reference only.
        relaxed = await pg_daemon("relaxed", schema_url(URL, schemas[2], "synchronous_commit=off"))
        (relaxed_key,) = await agents(relaxed, relaxed.admin_key(), "creator")
        targets = {
            "postgres": (first, pg_key),
            "sqlite": (lite, lite_key),
            "postgres_relaxed": (relaxed, relaxed_key),
        }
        figures = await create_section(counts, worker, targets, pgq_url)
        await procs.stop(relaxed.proc)
        await procs.stop(lite.proc)
        daemons = [first, await pg_daemon("b", legato_url), await pg_daemon("c", legato_url)]
        figures |= await claim_section(counts, daemons, admin_key)
        figures |= await delivery_section(counts, daemons[0], daemons[1], admin_key)
    finally:
        worker.close()
        await procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
        with psycopg.connect(URL, autocommit=True) as conn:
            for schema in schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    from importlib.metadata import version

    facts = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": f"{time.perf_counter() - began:.0f}",
        "server": server,
        "synchronous_commit": sync,
        "pgqueuer": version("pgqueuer"),
        "load": f"{load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    }
    return figures, facts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.postgres", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small counts; report under results/")
    args = parser.parse_args(argv)
    counts = SMOKE if args.smoke else FULL
    figures, facts = asyncio.run(run(counts))
    section = markdown(figures, facts, counts)
    out = REPO / "bench" / "results" / ("smoke" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "postgres.json").write_text(json.dumps({"figures": figures, "facts": facts}, indent=1))
    write_section(out / "BENCHMARKS.md" if args.smoke else REPO / "BENCHMARKS.md", section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
