"""`python -m bench.ab NAME=DIR ...`: legato against modified copies of its server,
on the unary calls of the issue's targets, in the same rounds.

For each call (CreateTask at 32 in flight, durability normal and full; GetTask
at 32 in flight; ClaimTask by 16 competing workers) every server runs once per
round, in an order reversed every other round, beside the bare echo. DIR holds
`legato/server/`, put first on PYTHONPATH of its `legato serve`. Prints, per
call and server: median calls/s (min to max), the median of the per-round ratios
to the echo and to legato's own, p50 ms, and the server's CPU µs per call
(utime + stime of /proc/PID/stat over the run). The machine is shared and
noisy: only figures of the same run compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import ceilings, payloads
from bench.loadgen import Worker, bearer
from bench.procs import Daemon, Processes, run_loop, start_daemon
from bench.profiles import FULL
from bench.run import CACHE, Progress
from bench.sections import TASK_SERVICE, Run, bench_agents, create_tasks, start_ceilings
from bench.stats import Results, percentile


@dataclass(frozen=True)
class Server:
    name: str
    daemon: Daemon | None  # None: the echo
    address: str
    creator: str
    worker: str
    task_ids: tuple[str, ...]


CALLS = ("create_c32", "create_full_c32", "get_c32", "claim_w16")


async def _start(run: Run, name: str, durability: str, path: Path | None) -> Server:
    env = None if path is None else {**os.environ, "PYTHONPATH": str(path)}
    label = f"ab-{name}-{durability}"
    daemon = await start_daemon(
        run.procs, label, run.data_dir(label), run.socket(label), durability=durability, env=env
    )
    creator, worker = await bench_agents(daemon)
    ids = await create_tasks(daemon.address, creator, payloads.create_request(), 200)
    return Server(name, daemon, daemon.address, creator, worker, tuple(ids))


async def measure(variants: Sequence[tuple[str, Path]], rounds: int, seconds: float) -> None:
    say = Progress()
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="legato-ab-"))
    procs = Processes(CACHE / "logs-ab")
    worker = Worker.start(procs, "loadgen-ab")
    results = Results()
    run = Run(FULL, procs, scratch, CACHE, results, [worker], say)
    try:
        await start_ceilings(run)
        assert run.echo is not None
        named: list[tuple[str, Path | None]] = [("legato", None), *variants]
        normal = [await _start(run, name, "normal", path) for name, path in named]
        full = [await _start(run, name, "full", path) for name, path in named]
        echo = Server("echo", None, run.echo.address, normal[0].creator, normal[0].worker, ())
        supply = {s.name: 0 for s in normal}
        claim_rate = 3000.0
        for round_index in range(rounds):
            for call in CALLS:
                servers = [*(full if call == "create_full_c32" else normal), echo]
                if round_index % 2:
                    servers.reverse()
                for server in servers:
                    method = {"create": "CreateTask", "get": "GetTask", "claim": "ClaimTask"}[
                        call.split("_")[0]
                    ]
                    address = server.address
                    target = (
                        ceilings.echo_method(method)
                        if server.daemon is None
                        else TASK_SERVICE + method
                    )
                    requests = {
                        "CreateTask": [payloads.create_request()],
                        "GetTask": [
                            payloads.get_request(i) for i in (server.task_ids or normal[0].task_ids)
                        ],
                        "ClaimTask": [payloads.claim_request()],
                    }[method]
                    claims = method == "ClaimTask" and server.daemon is not None
                    if claims:
                        needed = int(claim_rate * (seconds + 0.3) * 1.3)
                        if supply[server.name] < needed:
                            await create_tasks(
                                address,
                                server.creator,
                                payloads.create_request(),
                                needed - supply[server.name],
                            )
                            supply[server.name] = needed
                    key = server.worker if method == "ClaimTask" else server.creator
                    cpu_before = server.daemon.proc.cpu_seconds() if server.daemon else 0.0
                    outcome = await worker.call(
                        "unary",
                        address=address,
                        method=target,
                        requests=requests,
                        response="ClaimTaskResponse" if method == "ClaimTask" else "Task",
                        metadata=bearer(key),
                        concurrency=16 if method == "ClaimTask" else 32,
                        seconds=seconds,
                        warmup_seconds=0.3,
                        stop_when_empty=claims,
                    )
                    calls = len(outcome["latencies_ns"]) + outcome["warmup_calls"]
                    if server.daemon is not None:
                        cpu = server.daemon.proc.cpu_seconds() - cpu_before
                        results.add(f"{call}.{server.name}.cpu", cpu / calls * 1e6)
                    if method == "CreateTask" and server in normal:
                        supply[server.name] += calls
                    if claims:
                        supply[server.name] -= calls
                    rate = len(outcome["latencies_ns"]) / (outcome["elapsed_ns"] / 1e9)
                    if claims:
                        claim_rate = max(claim_rate, rate)
                    results.add(f"{call}.{server.name}.rate", rate)
                    results.add(
                        f"{call}.{server.name}.p50", percentile(outcome["latencies_ns"], 50) / 1e6
                    )
            say(f"round {round_index + 1}/{rounds} done; load {os.getloadavg()[0]:.1f}")
    finally:
        worker.close()
        await procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
    _print(results, [name for name, _ in named], rounds)


def _print(results: Results, names: list[str], rounds: int) -> None:
    values = results.values

    def med(key: str) -> str:
        got = values.get(key, [])
        if not got:
            return "\u2014"
        return f"{statistics.median(got):,.0f} ({min(got):,.0f}\u2013{max(got):,.0f})"

    def ratio(call: str, a: str, b: str) -> str:
        ra, rb = values.get(f"{call}.{a}.rate", []), values.get(f"{call}.{b}.rate", [])
        if not ra or not rb:
            return "\u2014"
        per_round = [x / y for x, y in zip(ra, rb, strict=False)]
        low, high = min(per_round), max(per_round)
        return f"{statistics.median(per_round):.2f}\u00d7 ({low:.2f}\u2013{high:.2f})"

    print(f"\n{rounds} rounds\n")
    print("| call | server | calls/s | \u00d7 echo | \u00d7 legato | p50 ms | server CPU µs/call |")
    print("|---|---|---|---|---|---|---|")
    for call in CALLS:
        for name in [*names, "echo"]:
            p50 = values.get(f"{call}.{name}.p50", [])
            print(
                f"| {call} | {name} | {med(f'{call}.{name}.rate')} | {ratio(call, name, 'echo')} "
                f"| {ratio(call, name, 'legato')} | "
                f"{statistics.median(p50):.2f} | {med(f'{call}.{name}.cpu')} |"
                if p50
                else f"| {call} | {name} | — | | | | |"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("variants", nargs="*", metavar="NAME=DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    variants: list[tuple[str, Path]] = []
    for spec in args.variants:
        name, _, directory = spec.partition("=")
        path = Path(directory).resolve()
        if not name.isidentifier() or not (path / "legato" / "server").is_dir():
            parser.error(f"{spec!r}: expected NAME=DIR with DIR/legato/server/")
        variants.append((name, path))
    run_loop(measure(variants, args.rounds, args.seconds))


if __name__ == "__main__":
    main()
