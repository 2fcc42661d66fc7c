"""What a run prints and writes: tables of medians with min-max, ratios, targets, the plot."""

from __future__ import annotations

import datetime
import math
import os
import platform
import sqlite3
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import google.protobuf
import grpc

from bench.payloads import OBSERVER_TASKS
from bench.procs import REPO
from bench.profiles import Profile
from bench.stats import Results, Summary

# What was tried and measured round by round, kept by hand; a full run puts it
# in BENCHMARKS.md after the ladder.
FINDINGS = REPO / "bench" / "findings.md"
DASH = "\u2013"  # en dash
TIMES = "\u00d7"  # multiplication sign


# -- numbers ----------------------------------------------------------------------------


def number(value: float) -> str:
    """A value with as many digits as a noisy measure deserves."""
    if math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def spread(summary: Summary) -> str:
    """`median (min-max)`, or the value alone for a single round."""
    if not summary.valid:
        return "n/a"
    if summary.rounds == 1 or summary.low == summary.high:
        return number(summary.median)
    return f"{number(summary.median)} ({number(summary.low)}{DASH}{number(summary.high)})"


def times(ratio: float) -> str:
    return "n/a" if math.isnan(ratio) else f"{ratio:.2f}{TIMES}"


# -- targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target of the issue, checked on this run's medians."""

    name: str
    measured: float
    limit: float
    # "min": measured must be at least limit; "max": at most; "below": strictly less.
    bound: str
    unit: str

    @property
    def status(self) -> str:
        if math.isnan(self.measured):
            return "n/a"
        if self.bound == "min":
            met = self.measured >= self.limit
        elif self.bound == "max":
            met = self.measured <= self.limit
        else:
            met = self.measured < self.limit
        return "PASS" if met else "MISS"

    @property
    def wanted(self) -> str:
        sign = {"min": "≥", "max": "≤", "below": "<"}[self.bound]
        return f"{sign} {number(self.limit)}{self.unit}"

    @property
    def got(self) -> str:
        return f"{number(self.measured)}{self.unit}"

    @property
    def short(self) -> str:
        return f"{self.status} ({self.wanted})"


def targets(results: Results, profile: Profile) -> list[Target]:
    r = results
    small, large = (f"{n:,}" for n in profile.scale_sizes)
    found = [
        Target(
            "CreateTask, 32 in flight, durability normal: calls/s vs bare echo",
            r.ratio("unary.create_c32.legato.rate", "unary.create_c32.echo.rate"),
            0.8,
            "min",
            TIMES,
        ),
        Target(
            "CreateTask, 32 in flight, durability normal: calls/s vs bare echo (stretch)",
            r.ratio("unary.create_c32.legato.rate", "unary.create_c32.echo.rate"),
            0.9,
            "min",
            TIMES,
        ),
        Target(
            "CreateTask, 32 in flight, durability full: calls/s vs bare echo",
            r.ratio("unary.create_c32.legato_full.rate", "unary.create_c32.echo.rate"),
            0.75,
            "min",
            TIMES,
        ),
        # Group commit should beat one commit per call (the ladder's step 3).
        Target(
            "CreateTask, 32 in flight: calls/s vs the ladder's naive durable server",
            r.ratio("ladder.c32.legato.rate", "ladder.c32.naive.rate"),
            1.0,
            "min",
            TIMES,
        ),
        Target(
            "GetTask, 32 in flight: calls/s vs bare echo",
            r.ratio("unary.get_c32.legato.rate", "unary.get_c32.echo.rate"),
            0.85,
            "min",
            TIMES,
        ),
        Target(
            "ClaimTask, 16 competing workers: calls/s vs bare echo",
            r.ratio("unary.claim_w16.legato.rate", "unary.claim_w16.echo.rate"),
            0.7,
            "min",
            TIMES,
        ),
    ]
    for watchers in profile.watcher_counts:
        found.append(
            Target(
                f"delivery p99 with {watchers:,} watchers vs bare fan-out",
                r.ratio(f"delivery.w{watchers}.legato.p99", f"delivery.w{watchers}.fanout.p99"),
                1.2,
                "max",
                TIMES,
            )
        )
    for op, title in SCALE_OPS:
        found.append(
            Target(
                f"{title} p50 at {large} vs {small} tasks",
                r.ratio(f"scale.{op}.large.p50", f"scale.{op}.small.p50"),
                1.3,
                "max",
                TIMES,
            )
        )
    found += [
        Target(
            f"idle daemon with {profile.idle_watchers} watchers: CPU",
            r.median("footprint.idle_cpu_pct"),
            1.0,
            "below",
            " % of a core",
        ),
        Target(
            f"RSS with {profile.rss_watchers:,} idle watchers",
            r.median("footprint.rss_watchers_mb"),
            100.0,
            "below",
            " MB",
        ),
        Target(
            "legato serve → SERVING, empty", r.median("startup.serve_empty"), 0.5, "below", " s"
        ),
        Target(
            f"legato serve → SERVING, {large} tasks",
            r.median("startup.serve_large"),
            2.0,
            "below",
            " s",
        ),
        Target("legato mcp → initialize answer", r.median("startup.mcp"), 0.5, "below", " s"),
    ]
    return found


def _target(found: Sequence[Target], prefix: str) -> str:
    for target in found:
        if target.name.startswith(prefix):
            return target.short
    return ""


SCALE_OPS = [
    ("get", "GetTask"),
    ("claim", "ClaimTask"),
    ("list_first", "ListTasks first page (100)"),
    ("list_pending", "ListTasks page of PENDING @listed"),
    ("list_few", f"ListTasks first page, agent seeing {OBSERVER_TASKS}"),
]


# -- tables ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    # The section (`bench.run.SECTIONS`) that measures it: a run of some
    # sections only shows their tables.
    section: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def tables(results: Results, profile: Profile) -> list[Table]:
    r = results
    found = targets(results, profile)
    s = r.summary

    def calls(case: str, legato: str, title: str, in_flight: str, target: str = "") -> list[str]:
        base = f"unary.{case}"
        return [
            title,
            in_flight,
            spread(s(f"{base}.{legato}.rate")),
            spread(s(f"{base}.echo.rate")),
            times(r.ratio(f"{base}.{legato}.rate", f"{base}.echo.rate")),
            spread(s(f"{base}.{legato}.p50")),
            spread(s(f"{base}.{legato}.p99")),
            spread(s(f"{base}.echo.p50")),
            spread(s(f"{base}.echo.p99")),
            target,
        ]

    unary = Table(
        "Unary calls: legato vs a bare grpc.aio echo server",
        [
            "call",
            "in flight",
            "legato calls/s",
            "echo calls/s",
            "ratio",
            "legato p50 ms",
            "legato p99 ms",
            "echo p50 ms",
            "echo p99 ms",
            "target",
        ],
        [
            calls("create_c1", "legato", "CreateTask (normal)", "1"),
            calls(
                "create_c32",
                "legato",
                "CreateTask (normal)",
                "32",
                _target(found, "CreateTask, 32 in flight, durability normal"),
            ),
            calls(
                "create_c32",
                "legato_full",
                "CreateTask (full)",
                "32",
                _target(found, "CreateTask, 32 in flight, durability full"),
            ),
            calls("get_c1", "legato", "GetTask", "1"),
            calls("get_c32", "legato", "GetTask", "32", _target(found, "GetTask, 32 in flight")),
            calls(
                "claim_w16",
                "legato",
                "ClaimTask, competing workers",
                "16",
                _target(found, "ClaimTask, 16 competing workers"),
            ),
        ],
        note=(
            f"{profile.unary_rounds} rounds of {profile.unary_seconds:g} s per run (after a "
            f"{profile.unary_warmup_seconds:g} s warm-up), legato and echo alternating; one "
            "load-generator process; the echo server answers with legato's own response bytes. "
            "Ratios are of the medians."
        ),
        section="unary",
    )

    delivery_rows = []
    for watchers in profile.watcher_counts:
        base = f"delivery.w{watchers}"
        delivery_rows.append(
            [
                f"{watchers:,}",
                spread(s(f"{base}.legato.p50")),
                spread(s(f"{base}.legato.p99")),
                spread(s(f"{base}.fanout.p50")),
                spread(s(f"{base}.fanout.p99")),
                times(r.ratio(f"{base}.legato.p50", f"{base}.fanout.p50")),
                times(r.ratio(f"{base}.legato.p99", f"{base}.fanout.p99")),
                _target(found, f"delivery p99 with {watchers:,} watchers"),
            ]
        )
    delivery = Table(
        "Create → watcher delivery: legato vs a bare fan-out server",
        [
            "watchers",
            "legato p50 ms",
            "legato p99 ms",
            "fan-out p50 ms",
            "fan-out p99 ms",
            "p50 ratio",
            "p99 ratio",
            "target",
        ],
        delivery_rows,
        note=(
            "From the start of the CreateTask (or Publish) call to each watcher's receipt, "
            "time.time_ns on both sides; one event at a time (the next once all watchers have "
            f"the last); {', '.join(map(str, profile.delivery_events))} events for "
            f"{', '.join(map(str, profile.watcher_counts))} watchers, "
            f"{profile.delivery_rounds} rounds alternating; watchers spread over "
            f"{profile.watcher_processes} processes, {profile.streams_per_channel} streams per "
            "connection; p50/p99 over all receipts of a round."
        ),
        section="delivery",
    )
    result = Table(
        "Complete → handle.result()",
        ["measure", "p50 ms", "p99 ms"],
        [
            [
                "CompleteTask call start → the creator's `await handle.result()` returns",
                spread(s("delivery.result.p50")),
                spread(s("delivery.result.p99")),
            ]
        ],
        note=(
            f"{profile.result_samples} tasks per round, {profile.delivery_rounds} rounds; "
            "creator and worker clients in one process apart from the daemon."
        ),
        section="delivery",
    )

    small, large = (f"{n:,}" for n in profile.scale_sizes)
    scale_rows = []
    for op, title in SCALE_OPS:
        base = f"scale.{op}"
        scale_rows.append(
            [
                title,
                spread(s(f"{base}.small.p50")),
                spread(s(f"{base}.small.p99")),
                spread(s(f"{base}.large.p50")),
                spread(s(f"{base}.large.p99")),
                times(r.ratio(f"{base}.large.p50", f"{base}.small.p50")),
                _target(found, f"{title} p50"),
            ]
        )
    scale = Table(
        f"Scale: {small} vs {large} tasks of history",
        [
            "operation (1 in flight)",
            f"{small}: p50 ms",
            f"{small}: p99 ms",
            f"{large}: p50 ms",
            f"{large}: p99 ms",
            "p50 ratio",
            "target",
        ],
        scale_rows,
        note=(
            "History: DONE tasks on @bench generated straight into SQLite (bench/dbgen.py). "
            "GetTask on random ids of the history; ClaimTask of fresh pending tasks "
            f"({profile.scale_claims} per round); ListTasks as the creator agent: the first "
            "page of everything, and a page filtered to PENDING tasks of @listed (100 fresh "
            "ones, after the history); and the first page of an agent that sees only the "
            f"{OBSERVER_TASKS} tasks it created after the history, none of it. "
            f"{profile.scale_rounds} rounds alternating the two databases."
        ),
        section="scale",
    )

    def row(title: str, key: str, unit: str = "", target: str = "") -> list[str]:
        return [title, spread(s(key)) + unit, target]

    footprint = Table(
        "Footprint",
        ["measure", "value", "target"],
        [
            row("daemon RSS, idle", "footprint.rss_idle_mb", " MB"),
            row(
                f"daemon RSS with {profile.rss_watchers:,} idle watchers",
                "footprint.rss_watchers_mb",
                " MB",
                _target(found, "RSS with"),
            ),
            row("RSS per watcher", "footprint.rss_per_watcher_kb", " KB"),
            row(
                f"idle daemon CPU with {profile.idle_watchers} watchers "
                f"({profile.idle_cpu_seconds:g} s)",
                "footprint.idle_cpu_pct",
                " % of a core",
                _target(found, "idle daemon"),
            ),
            row(
                "idle daemon wake-ups (context switches, all threads)",
                "footprint.idle_wakeups",
                "/s",
            ),
            row("daemon threads with watchers open", "footprint.threads"),
            row(
                "database bytes per task, generated history (1 event each)",
                "scale.bytes_per_task_generated",
                " B",
            ),
            row(
                "database bytes per task, daemon-written (create, claim, complete: 3 events)",
                "footprint.bytes_per_task_lifecycle",
                " B",
            ),
            row(
                "create → claim → complete, 16 tasks in flight",
                "footprint.lifecycle_rate",
                " tasks/s",
            ),
        ],
        section="footprint",
    )
    startup = Table(
        "Start-up",
        ["measure", "seconds", "target"],
        [
            row(
                "`legato serve` → health SERVING, empty data dir",
                "startup.serve_empty",
                "",
                _target(found, "legato serve → SERVING, empty"),
            ),
            row(
                f"`legato serve` → health SERVING, {large} tasks",
                "startup.serve_large",
                "",
                _target(found, f"legato serve → SERVING, {large}"),
            ),
            row(
                "`legato mcp` → answer to initialize",
                "startup.mcp",
                "",
                _target(found, "legato mcp"),
            ),
            row("`legato agent whoami`, end to end", "startup.cli"),
            row("floor: `python -c 'import grpc, legato.v1.tasks_pb2'`", "startup.python_grpc"),
        ],
        note=f"Median (min{DASH}max) of {profile.start_repeats} starts "
        f"({profile.large_start_repeats} with {large} tasks).",
        section="startup",
    )
    return [unary, delivery, result, scale, footprint, startup]


def targets_table(results: Results, profile: Profile, *, partial: bool = False) -> Table:
    """The targets; in a run of some sections only (`partial`), those it measured."""
    shown = [t for t in targets(results, profile) if not (partial and math.isnan(t.measured))]
    return Table(
        "Targets",
        ["target", "wanted", "measured", "status"],
        [[t.name, t.wanted, t.got, f"**{t.status}**"] for t in shown],
        note="Ratios are of medians measured in this run. A MISS is reported, never fatal.",
    )


def _shown_tables(
    results: Results, profile: Profile, ran: Sequence[str] | None
) -> tuple[list[Table], list[Table]]:
    """The tables of the sections that ran, and the ladder's."""
    from bench import ladder_report  # builds on Table: imported once this module is

    main = [t for t in tables(results, profile) if ran is None or t.section in ran]
    ladder = ladder_report.tables(results, profile) if ran is None or "ladder" in ran else []
    return main, ladder


# -- the machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(load_before: str) -> list[tuple[str, str]]:
    dirty = (
        " (with uncommitted changes)"
        if _git("status", "--porcelain", "--", "server", "client", "proto")
        else ""
    )
    return [
        ("CPU", f"{os.cpu_count()} {TIMES} {_cpu_model()}"),
        ("memory", _memory()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("load average before / after", f"{load_before} / {load_average()}"),
        ("python", platform.python_version()),
        ("grpcio", grpc.__version__),
        ("protobuf", google.protobuf.__version__),
        ("sqlite3", sqlite3.sqlite_version),
        (
            "legato",
            f"{metadata.version('legato')}, commit {_git('rev-parse', '--short', 'HEAD')}{dirty}",
        ),
    ]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- documents ---------------------------------------------------------------------------------


def markdown(
    results: Results,
    profile: Profile,
    *,
    command: str,
    wall_seconds: float,
    load_before: str,
    plot_name: str | None,
    ladder_plot_name: str | None = None,
    ran: Sequence[str] | None = None,
) -> str:
    """BENCHMARKS.md; `ran`: the sections run, when not all of them."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# legato benchmarks",
        "",
        f"Generated by `{command}` ({profile.name} run) on {today}, in {wall_seconds:.0f} s. "
        "Every number below was measured in that run; run it again to refresh this file. "
        "legato and its ceilings alternate within each round; cells are the median over rounds "
        f"with (min{DASH}max).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine(load_before)),
        *(f"| {k} | {v} |" for k, v in results.facts.items()),
        "",
    ]
    if plot_name:
        lines += [f"![latency]({plot_name})", ""]
    lines += ["## Results", ""]
    main, ladder = _shown_tables(results, profile, ran)
    targets_shown = targets_table(results, profile, partial=ran is not None)
    for table in [targets_shown, *main] if targets_shown.rows else main:
        lines += [table.markdown(), ""]
    if ladder:
        lines += [
            "## The CreateTask ladder",
            "",
            "Where the gap between legato's CreateTask and the bare echo goes: five servers, "
            "each adding one thing to the one before, measured in the same rounds "
            "(`bench/ladder.py`, servers of steps 2\u20134 in `bench/naive.py`; "
            "`make bench-ladder` runs it alone).",
            "",
        ]
        if ladder_plot_name:
            lines += [f"![ladder]({ladder_plot_name})", ""]
        for table in ladder:
            lines += [table.markdown(), ""]
    if ran is None and FINDINGS.exists():
        # Hand-kept: what each round tried and measured, which a run cannot regenerate.
        lines += [FINDINGS.read_text().strip(), ""]
    if results.notes or results.errors:
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in results.notes]
        lines += [f"- **section failed**: {error.splitlines()[0]}" for error in results.errors]
        lines.append("")
    lines += [
        "## How it is measured",
        "",
        "- The daemon is a real `legato serve` subprocess on a unix socket; load comes from "
        "separate `python -m bench.loadgen` processes driven over pipes, never from the "
        "daemon's event loop.",
        "- Ceilings (`bench/ceilings.py`) are bare grpc.aio servers with the daemon's gRPC "
        "options: the echo server answers each call with the bytes legato answered when probed; "
        "the fan-out server sends a TaskEvent of legato's size to every subscribed stream on "
        "each Publish. Both are driven by the same load-generator code with the same requests.",
        "- RSS is VmRSS of /proc/PID/status; CPU is utime + stime of /proc/PID/stat, all threads.",
        "- SERVING is the daemon's gRPC health check answering SERVING, polled every millisecond "
        "from the moment its socket exists; the time counts from spawning `legato serve`.",
        "- The ladder's servers of steps 2\u20134 (`bench/naive.py`) use legato's own "
        "handler wrapping, registry and store code, imported from `legato.server`; profiles are "
        "py-spy recordings of the server process (`bench/profiler.py`).",
        "",
    ]
    return "\n".join(lines)


def console(results: Results, profile: Profile, ran: Sequence[str] | None = None) -> str:
    main, ladder = _shown_tables(results, profile, ran)
    targets_shown = targets_table(results, profile, partial=ran is not None)
    shown = [*main, *ladder, *([targets_shown] if targets_shown.rows else [])]
    return "\n\n".join(t.markdown() for t in shown)


# -- the plot -----------------------------------------------------------------------------------


def plot(results: Results, profile: Profile, path: Path) -> str | None:
    """Writes the latency plot; returns why it was skipped, or None."""
    return _plotted("the plot", lambda: _draw(results, profile, path))


def plot_ladder(results: Results, profile: Profile, path: Path) -> str | None:
    """Writes the ladder plot; returns why it was skipped, or None."""
    from bench import ladder_report

    if not ladder_report.rungs_of(results):
        return "the ladder did not run: no ladder plot"
    return _plotted(
        "the ladder plot", lambda: ladder_report.draw(results, profile, path, _cpu_model())
    )


def _plotted(what: str, draw: Callable[[], None]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return f"matplotlib is not installed: no {what} (make bench installs it)"
    try:
        draw()
    except Exception as exc:  # a plot must not cost the run its numbers
        return f"{what} could not be drawn: {type(exc).__name__}: {exc}"
    return None


def _draw(results: Results, profile: Profile, path: Path) -> None:
    import matplotlib.pyplot as plt

    def finite(values: Sequence[float]) -> list[float]:
        return [0.0 if math.isnan(v) else v for v in values]

    def log_scale(ax: Any, values: Sequence[float]) -> None:
        """Log y with headroom for the p99 marks; linear if nothing was measured."""
        measured = [v for v in values if v > 0 and not math.isnan(v)]
        if measured:
            ax.set_yscale("log")
            ax.set_ylim(min(measured) / 2, max(measured) * 2)

    s = results.summary
    figure, (ax_unary, ax_delivery, ax_scale) = plt.subplots(1, 3, figsize=(17, 5.2))

    def bars(
        ax: Any,
        groups: list[str],
        series: list[tuple[str, Callable[[int], str], str]],
    ) -> None:
        width = 0.8 / len(series)
        plotted: list[float] = []
        for index, (label, key_of, color) in enumerate(series):
            xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
            p50 = [s(key_of(g) + ".p50") for g in range(len(groups))]
            p99 = [s(key_of(g) + ".p99") for g in range(len(groups))]
            plotted += [v.median for v in p50] + [v.median for v in p99]
            heights = finite([v.median for v in p50])
            errors = [
                finite([max(0.0, v.median - v.low) for v in p50]),
                finite([max(0.0, v.high - v.median) for v in p50]),
            ]
            ax.bar(xs, heights, width, yerr=errors, label=f"{label} p50", color=color, capsize=2)
            ax.scatter(
                xs, finite([v.median for v in p99]), marker="_", s=200, color="black", zorder=3
            )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20, ha="right")
        log_scale(ax, plotted)
        ax.set_ylabel("latency, ms (bars: p50 with min-max; dashes: p99)")
        ax.legend(fontsize=8)

    cases = [
        ("create_c1", "legato", "Create x1"),
        ("create_c32", "legato", "Create x32"),
        ("create_c32", "legato_full", "Create x32 full"),
        ("get_c1", "legato", "Get x1"),
        ("get_c32", "legato", "Get x32"),
        ("claim_w16", "legato", "Claim x16"),
    ]
    bars(
        ax_unary,
        [c[2] for c in cases],
        [
            ("legato", lambda g: f"unary.{cases[g][0]}.{cases[g][1]}", "tab:blue"),
            ("bare echo", lambda g: f"unary.{cases[g][0]}.echo", "tab:gray"),
        ],
    )
    ax_unary.set_title("Unary calls")

    watchers = list(profile.watcher_counts)
    plotted: list[float] = []
    for target, color, label in (
        ("legato", "tab:blue", "legato"),
        ("fanout", "tab:gray", "bare fan-out"),
    ):
        for quantile, style in (("p50", "-o"), ("p99", "--s")):
            ys = [s(f"delivery.w{w}.{target}.{quantile}").median for w in watchers]
            plotted += ys
            ax_delivery.plot(watchers, ys, style, color=color, label=f"{label} {quantile}")
    ax_delivery.set_xscale("log")
    ax_delivery.set_xticks(watchers, [f"{w:,}" for w in watchers])
    log_scale(ax_delivery, plotted)
    ax_delivery.set_xlabel("watchers")
    ax_delivery.set_ylabel("create → receipt, ms")
    ax_delivery.set_title("Delivery to watchers")
    ax_delivery.legend(fontsize=8)

    small, large = (f"{n:,}" for n in profile.scale_sizes)
    bars(
        ax_scale,
        ["GetTask", "ClaimTask", "List first", "List pending", f"List, sees {OBSERVER_TASKS}"],
        [
            (f"{small} tasks", lambda g: f"scale.{SCALE_OPS[g][0]}.small", "tab:green"),
            (f"{large} tasks", lambda g: f"scale.{SCALE_OPS[g][0]}.large", "tab:red"),
        ],
    )
    ax_scale.set_title("Cost vs history")
    figure.suptitle(f"legato ({profile.name} run, {os.cpu_count()} x {_cpu_model()})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
