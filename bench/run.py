"""`python -m bench`: runs the sections, prints the results, writes BENCHMARKS.md and the plot."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench import report, sections
from bench.ladder import ladder_section
from bench.loadgen import Worker
from bench.procs import REPO, Processes, event_loop_name
from bench.profiles import FULL, SMOKE, Profile
from bench.sections import Run, start_ceilings
from bench.stats import Results

CACHE = REPO / "bench" / "results"
SECTIONS = {**sections.SECTIONS, "ladder": ladder_section}


class Progress:
    """Progress lines, stamped with the seconds since the run began."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {text}", flush=True)


async def run_all(
    profile: Profile,
    names: Sequence[str],
    say: Progress,
    variants: Sequence[tuple[str, Path]] = (),
) -> Results:
    """Runs the sections `names` in order; a failing section is recorded and the next one runs."""
    results = Results()
    CACHE.mkdir(parents=True, exist_ok=True)
    logs = CACHE / f"logs-{profile.name}"
    shutil.rmtree(logs, ignore_errors=True)
    # Unix socket paths are limited to ~100 bytes: sockets and data live in /tmp.
    scratch = Path(tempfile.mkdtemp(prefix="legato-bench-"))
    procs = Processes(logs)
    workers: list[Worker] = []
    try:
        workers = [Worker.start(procs, f"loadgen-{i}") for i in range(profile.watcher_processes)]
        run = Run(profile, procs, scratch, CACHE, results, workers, say, variants=list(variants))
        results.facts["event loop of ceilings and load generators"] = event_loop_name()
        await start_ceilings(run)
        say("ceilings ready")
        for name in names:
            before = set(procs.running())
            started = time.perf_counter()
            try:
                await SECTIONS[name](run)
            except Exception:
                results.errors.append(f"{name}: {traceback.format_exc()}")
                say(f"section {name} FAILED:\n{traceback.format_exc()}")
                for proc in set(procs.running()) - before:
                    await procs.stop(proc)
            say(f"{name} done in {time.perf_counter() - started:.0f} s")
    finally:
        for worker in workers:
            worker.close()
        await procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _with_postgres_section(path: Path, text: str) -> str:
    """`text` followed by the PostgreSQL section the file had (`make bench-postgres`
    measures it separately, against a server this run does not need)."""
    from bench.postgres import BEGIN, END

    old = path.read_text() if path.exists() else ""
    if BEGIN not in old or END not in old:
        return text
    section = BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    return text.rstrip("\n") + "\n\n" + section


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure legato and its ceilings; write BENCHMARKS.md and bench/latency.png.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the quick form CI runs: small counts, no 1M database, report under bench/results/",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where BENCHMARKS.md and latency.png go (default: the repository for a full run, "
        "bench/results/smoke for --smoke)",
    )
    parser.add_argument(
        "--section",
        action="append",
        choices=list(SECTIONS),
        help="run only this section (repeatable); for working on the harness",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also measure (in the ladder) `legato serve` with DIR first on PYTHONPATH: a "
        "modified copy of the server, DIR holding legato/server/ (repeatable)",
    )
    parser.add_argument(
        "--rungs",
        help="the ladder's rungs to measure, comma-separated keys (default: all), e.g. "
        "echo,legato to set variants against legato alone",
    )
    parser.add_argument(
        "--ladder-rounds", type=int, help="rounds of the ladder (default: the profile's)"
    )
    args = parser.parse_args(argv)
    variants: list[tuple[str, Path]] = []
    for spec in args.variant:
        name, _, directory = spec.partition("=")
        path = Path(directory).resolve()
        if not name.isidentifier() or not (path / "legato" / "server").is_dir():
            parser.error(f"--variant {spec!r}: expected NAME=DIR with DIR/legato/server/")
        variants.append((name, path))
    profile = SMOKE if args.smoke else FULL
    if args.ladder_rounds is not None:
        profile = dataclasses.replace(profile, ladder_rounds=args.ladder_rounds)
    if args.rungs is not None:
        profile = dataclasses.replace(profile, ladder_rungs=tuple(args.rungs.split(",")))
    if args.out is not None:
        markdown_path, plot_path = args.out / "BENCHMARKS.md", args.out / "latency.png"
    elif args.smoke:
        markdown_path, plot_path = (
            CACHE / "smoke" / "BENCHMARKS.md",
            CACHE / "smoke" / "latency.png",
        )
    else:
        markdown_path, plot_path = REPO / "BENCHMARKS.md", REPO / "bench" / "latency.png"
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    plot_path.parent.mkdir(parents=True, exist_ok=True)

    say = Progress()
    load_before = report.load_average()
    names = args.section or list(SECTIONS)
    say(f"{profile.name} run: {', '.join(names)}")
    results = asyncio.run(run_all(profile, names, say, variants))
    wall = time.perf_counter() - say.started

    ran = None if args.section is None else names
    skipped: str | None = "no section with latencies ran: no latency plot"
    if ran is None or {"unary", "delivery", "scale"} & set(names):
        skipped = report.plot(results, profile, plot_path)
        if skipped:
            results.notes.append(skipped)
            print(f"note: {skipped}")
    ladder_plot = plot_path.with_name("ladder.png")
    ladder_skipped: str | None = "the ladder did not run"
    if ran is None or "ladder" in names:
        ladder_skipped = report.plot_ladder(results, profile, ladder_plot)
        if ladder_skipped:
            results.notes.append(ladder_skipped)
            print(f"note: {ladder_skipped}")
    command = "make bench-smoke" if args.smoke else "make bench"
    if argv is not None or sys.argv[1:] not in ([], ["--smoke"]):
        command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)

    def relative(path: Path) -> str:
        if path.is_relative_to(markdown_path.parent):
            return path.relative_to(markdown_path.parent).as_posix()
        return str(path)

    raw = CACHE / f"results-{profile.name}.json"
    if ran is not None:  # a run of some sections does not replace the whole run's figures
        raw = CACHE / f"results-{profile.name}-{'-'.join(names)}.json"
    raw.write_text(
        json.dumps(
            {
                "command": command,
                "wall_seconds": wall,
                "values": results.values,
                "facts": results.facts,
                "notes": results.notes,
                "errors": results.errors,
                "details": results.details,
            },
            indent=1,
        )
    )
    text = report.markdown(
        results,
        profile,
        command=command,
        wall_seconds=wall,
        load_before=load_before,
        plot_name=None if skipped else relative(plot_path),
        ladder_plot_name=None if ladder_skipped else relative(ladder_plot),
        ran=ran,
    )
    markdown_path.write_text(_with_postgres_section(markdown_path, text))
    print()
    print(report.console(results, profile, ran))
    print()
    plots = [str(p) for p, why in ((plot_path, skipped), (ladder_plot, ladder_skipped)) if not why]
    print(f"wrote {markdown_path}" + "".join(f" and {p}" for p in plots) + f"; raw: {raw}")
    print(f"wall time: {wall:.0f} s")
    for error in results.errors:
        print(f"section failed: {error.splitlines()[0]}", file=sys.stderr)
    return 1 if results.errors else 0
