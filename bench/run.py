"""`python -m bench`: runs the sections, prints the results, writes BENCHMARKS.md and the plot."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench import report
from bench.loadgen import Worker
from bench.procs import REPO, Processes, event_loop_name
from bench.profiles import FULL, SMOKE, Profile
from bench.sections import SECTIONS, Run, start_ceilings
from bench.stats import Results

CACHE = REPO / "bench" / "results"


class Progress:
    """Progress lines, stamped with the seconds since the run began."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {text}", flush=True)


async def run_all(profile: Profile, sections: Sequence[str], say: Progress) -> Results:
    """Runs `sections` in order; a failing section is recorded and the next one runs."""
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
        run = Run(profile, procs, scratch, CACHE, results, workers, say)
        results.facts["event loop of ceilings and load generators"] = event_loop_name()
        await start_ceilings(run)
        say("ceilings ready")
        for name in sections:
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
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else FULL
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
    sections = args.section or list(SECTIONS)
    say(f"{profile.name} run: {', '.join(sections)}")
    results = asyncio.run(run_all(profile, sections, say))
    wall = time.perf_counter() - say.started

    skipped = report.plot(results, profile, plot_path)
    if skipped:
        results.notes.append(skipped)
        print(f"note: {skipped}")
    command = "make bench-smoke" if args.smoke else "make bench"
    if argv is not None or sys.argv[1:] not in ([], ["--smoke"]):
        command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    relative_plot = (
        Path(plot_path).relative_to(markdown_path.parent).as_posix()
        if plot_path.is_relative_to(markdown_path.parent)
        else str(plot_path)
    )
    raw = CACHE / f"results-{profile.name}.json"
    raw.write_text(
        json.dumps(
            {
                "command": command,
                "wall_seconds": wall,
                "values": results.values,
                "facts": results.facts,
                "notes": results.notes,
                "errors": results.errors,
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
        plot_name=None if skipped else relative_plot,
    )
    markdown_path.write_text(_with_postgres_section(markdown_path, text))
    print()
    print(report.console(results, profile))
    print()
    print(f"wrote {markdown_path}" + ("" if skipped else f" and {plot_path}") + f"; raw: {raw}")
    print(f"wall time: {wall:.0f} s")
    for error in results.errors:
        print(f"section failed: {error.splitlines()[0]}", file=sys.stderr)
    return 1 if results.errors else 0
