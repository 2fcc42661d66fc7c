"""The ladder's tables (figures, what each step adds, the profiles) and its plot.

`bench.report` puts them into BENCHMARKS.md and the console output, and
imports this module when it needs it (this one builds on its `Table`).
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from bench.ladder import (
    IN_FLIGHT,
    LADDER,
    OFF_LADDER,
    WIRE_VARIANT,
    Rung,
    key_of,
    variant_rungs,
)
from bench.profiles import Profile
from bench.report import Table, number, spread, times
from bench.stats import Results, Summary

DASH = "\u2013"


def _in_checkout(path: str) -> str:
    """`path` relative to the checkout, as the file is read beside it; as given if outside."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return path


TIMES = "\u00d7"


def rungs_of(results: Results) -> list[Rung]:
    """The rungs this run measured, ladder first."""
    paths: dict[str, str] = results.details.get("ladder.variants", {})
    variants = [(name, Path(path)) for name, path in paths.items()]
    found = [*LADDER, *OFF_LADDER, *variant_rungs(variants)]
    return [r for r in found if f"{key_of(r.key, 32)}.rate" in results.values]


def _wall_us(results: Results, rung: str, in_flight: int = 32) -> float:
    """Microseconds of wall time per call: 1 / the median rate."""
    rate = results.median(f"{key_of(rung, in_flight)}.rate")
    return math.nan if math.isnan(rate) or rate == 0 else 1e6 / rate


def paired(results: Results, key: str, base: str) -> Summary:
    """The ratio of `key` to `base` round by round (both measured in every round, in
    turn): less exposed to a neighbour's load changing between rounds than a ratio of
    medians."""
    tops, bottoms = results.values.get(key, []), results.values.get(base, [])
    ratios = [t / b for t, b in zip(tops, bottoms, strict=False) if b and not math.isnan(t / b)]
    if not ratios:
        return Summary(math.nan, math.nan, math.nan, 0)
    return Summary(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def _ratios(summary: Summary) -> str:
    if not summary.valid:
        return "n/a"
    if summary.rounds == 1:
        return f"{summary.median:.2f}{TIMES}"
    return f"{summary.median:.2f}{TIMES} ({summary.low:.2f}{DASH}{summary.high:.2f})"


def _signed(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return ("+" if value >= 0 else "\u2212") + number(abs(value))


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value * 100:.0f} %"


def _base_of(rung: Rung) -> str:
    """The rung an off-ladder one is compared with."""
    if rung.key == "grouped":
        return "schema"
    if rung.key == "issue":
        return "echo"
    if rung.key.endswith(WIRE_VARIANT):  # a variant's own step 2
        return "wire"
    return "legato"


# Comparisons shown besides the steps: legato over step 4 on its own db.Database
# is what legato's layers above the store cost.
EXTRA = [("legato", "grouped")]


def tables(results: Results, profile: Profile) -> list[Table]:
    """The ladder's figures, what each step costs, and the profiles; none if it did not run."""
    rungs = rungs_of(results)
    if not rungs:
        return []
    s = results.summary
    r = results

    def figures(rung: Rung) -> list[str]:
        c1, c32 = key_of(rung.key, 1), key_of(rung.key, 32)
        return [
            rung.step,
            rung.title,
            spread(s(f"{c1}.rate")),
            spread(s(f"{c32}.rate")),
            times(r.ratio(f"{c32}.rate", f"{key_of('echo', 32)}.rate")),
            _ratios(paired(r, f"{c32}.rate", f"{key_of('echo', 32)}.rate")),
            spread(s(f"{c1}.p50")),
            spread(s(f"{c32}.p50")),
            spread(s(f"{c32}.p99")),
            spread(s(f"{c32}.cpu_us")),
            spread(s(f"{c32}.loop_cpu_us")),
            spread(s(f"{c32}.load_cpu_us")),
        ]

    measured = Table(
        "CreateTask ladder: from a bare echo to legato",
        [
            "step",
            "server",
            "calls/s, 1 in flight",
            "calls/s, 32 in flight",
            f"{TIMES} echo (32)",
            f"{TIMES} echo, round by round (32)",
            "p50 ms (1)",
            "p50 ms (32)",
            "p99 ms (32)",
            "server CPU µs/call (32)",
            "of which the loop thread",
            "load generator CPU µs/call (32)",
        ],
        [figures(rung) for rung in rungs],
        note=(
            f"{profile.ladder_rounds} rounds of {profile.ladder_seconds:g} s per server and "
            f"in-flight count (after a {profile.ladder_warmup_seconds:g} s warm-up), every server "
            "in each round, the order reversed every other round; one load-generator process, "
            "the same CreateTaskRequest bytes to all. CPU per call: utime + stime of the "
            "server process (all threads) over the run, divided by its calls (warm-up "
            "included); the loop thread's is the main thread's alone "
            "(/proc/PID/task/PID/stat). Steps 1\u20134 answer with legato's CreateTask "
            "response bytes; rows whose step is not a number are off the ladder, measured in "
            "the same rounds. The ratio to the echo is given both as a ratio of the medians and "
            "as the median (min\u2013max) of the ratios of each round."
        ),
        section="ladder",
    )

    echo_wall = _wall_us(r, "echo")
    legato_wall = _wall_us(r, "legato")
    echo_cpu = r.median(f"{key_of('echo', 32)}.cpu_us")
    legato_cpu = r.median(f"{key_of('legato', 32)}.cpu_us")
    rows = []
    below: Rung | None = None
    by_key = {rung.key: rung for rung in rungs}
    pairs: list[tuple[Rung, Rung | None, bool]] = []
    for rung in rungs:
        if rung.on_ladder:
            pairs.append((rung, below, True))
            below = rung
        else:
            pairs.append((rung, by_key.get(_base_of(rung)), False))
    for key, base_key in EXTRA:
        if key in by_key and base_key in by_key:
            pairs.append((by_key[key], by_key[base_key], False))
    for rung, base, on in pairs:
        if base is None:
            continue
        wall = _wall_us(r, rung.key) - _wall_us(r, base.key)
        cpu = r.median(f"{key_of(rung.key, 32)}.cpu_us") - r.median(
            f"{key_of(base.key, 32)}.cpu_us"
        )
        p50 = (
            r.median(f"{key_of(rung.key, 1)}.p50") - r.median(f"{key_of(base.key, 1)}.p50")
        ) * 1000
        rows.append(
            [
                rung.step,
                f"{base.step} {DASH}> {rung.step}" if on else f"vs {base.step}",
                rung.adds
                if on or base.key == _base_of(rung)
                else f"{rung.title} over {base.title}",
                _signed(wall),
                _percent(wall / (legato_wall - echo_wall)) if on else "",
                _signed(cpu),
                _percent(cpu / (legato_cpu - echo_cpu)) if on else "",
                _signed(p50),
            ]
        )
    costs = Table(
        "What each step costs",
        [
            "step",
            "from",
            "what it adds",
            "wall µs/call (32)",
            "share of the gap",
            "server CPU µs/call (32)",
            "share of the CPU gap",
            "p50 µs (1)",
        ],
        rows,
        note=(
            "Differences of medians. Wall µs per call at 32 in flight is 1,000,000 / calls/s: "
            "the gap is legato's minus the echo's, and each step's share of it is what the step "
            "adds over the one below. The same for the server's CPU per call, and for the p50 "
            "latency of one call at a time. Off-ladder rows are compared with the row named."
        ),
        section="ladder",
    )
    return [measured, costs, *component_tables(results), *profile_tables(results)]


def component_tables(results: Results) -> list[Table]:
    found = results.details.get("ladder.components")
    if not found:
        return []
    rows = [[piece, thread, number(us)] for piece, thread, us in found]
    return [
        Table(
            "The pieces of legato's create, timed alone",
            ["piece", "thread", "µs per create"],
            rows,
            note=(
                "`python -m bench.components`: legato's own functions on real records and a real "
                "SQLite file (WAL, NORMAL), each timed with timeit (best of 5 repeats), after the "
                "ladder's servers have stopped. What grpc does around them is not included: the "
                "ladder's steps 1 and 2 measure it."
            ),
            section="ladder",
        )
    ]


def profile_tables(results: Results) -> list[Table]:
    found = {
        key.removeprefix("ladder.profile."): value
        for key, value in results.details.items()
        if key.startswith("ladder.profile.") and value.get("ticks")
    }
    if not found:
        return []
    titles = {r.key: f"{r.step} {r.key}" for r in rungs_of(results)}
    names = list(found)

    def pct(value: float) -> str:
        return f"{value * 100:.1f} %"

    def column(summary: dict[str, Any], mode: str, part: str) -> dict[str, float]:
        return {name: share for name, share in summary[mode][part]}

    first = found[names[0]]
    overview_rows = [
        ["GIL held, any thread", *(pct(found[n]["gil"]["total"]) for n in names)],
        ["CPU, all threads (/proc)", *(pct(found[n]["cpu_total"]) for n in names)],
        [
            "calls/s while profiled",
            *(f"{found[n]['calls_per_s_while_profiled']:,.0f}" for n in names),
        ],
    ]

    def cpu_of(summary: dict[str, Any]) -> dict[str, float]:
        return {name: share for name, share in summary["cpu_threads"]}

    threads = sorted(
        {t for n in names for t, _ in found[n]["cpu_threads"]},
        key=lambda t: -max(cpu_of(found[n]).get(t, 0.0) for n in names),
    )
    for thread in threads:
        overview_rows.append(
            [
                f"thread {thread}: GIL held / CPU",
                *(
                    f"{pct(column(found[n], 'gil', 'threads').get(thread, 0.0))} / "
                    f"{pct(cpu_of(found[n]).get(thread, 0.0))}"
                    for n in names
                ),
            ]
        )
    for mode, what in (("gil", "innermost Python frame"), ("native", "innermost frame")):
        packages = sorted(
            {p for n in names for p, _ in found[n][mode]["packages"]},
            key=lambda p: -max(column(found[n], mode, "packages").get(p, 0.0) for n in names),
        )
        for package in packages:
            overview_rows.append(
                [
                    f"GIL held, {what} in {package}",
                    *(pct(column(found[n], mode, "packages").get(package, 0.0)) for n in names),
                ]
            )
    overview = Table(
        "Where the time goes: py-spy, 32 in flight",
        ["share of wall time", *(titles.get(n, n) for n in names)],
        overview_rows,
        note=(
            f"py-spy record at {first['rate']} Hz for {first['seconds']:g} s per mode on the "
            "server process during a 32-in-flight run of its own (not counted above): `--idle` "
            "for the ticks and thread names, `--gil` for the thread holding the GIL and its "
            "Python frames, `--gil --native` for the native frames under them (grpc's core "
            "is stripped: its frames are addresses). Shares are of ticks (wall time). CPU per "
            "thread is utime + stime of /proc/PID/task/TID/stat over the three recordings. "
            "A frame's self time is the samples where it is innermost. "
            f"Raw files: {_in_checkout(first['raw'])}."
        ),
        section="ladder",
    )
    out = [overview]
    for name in names:
        summary = found[name]
        rows = [[frame, pct(share)] for frame, share in summary["gil"]["self"][:12]]
        native = [[frame, pct(share)] for frame, share in summary["native"]["self"][:10]]
        own = [[frame, pct(share)] for frame, share in summary["gil"]["legato_self"][:10]]
        inclusive = [
            [frame, pct(share)] for frame, share in summary["gil"]["legato_inclusive"][:10]
        ]
        out.append(
            Table(
                f"{titles.get(name, name)}: top frames holding the GIL (self)",
                ["frame", "share of wall time"],
                rows,
                section="ladder",
            )
        )
        out.append(
            Table(
                f"{titles.get(name, name)}: top native frames holding the GIL (self)",
                ["frame", "share of wall time"],
                native,
                section="ladder",
            )
        )
        if own:
            out.append(
                Table(
                    f"{titles.get(name, name)}: legato's own code holding the GIL",
                    ["frame (innermost legato frame)", "self + callees outside legato"],
                    [[a, b] for a, b in own],
                    note="Each sample counted for the innermost frame of legato.server in it.",
                    section="ladder",
                )
            )
            out.append(
                Table(
                    f"{titles.get(name, name)}: legato's frames, inclusive",
                    ["frame", "share of wall time with it on the stack, GIL held"],
                    inclusive,
                    section="ladder",
                )
            )
    return out


def draw(results: Results, profile: Profile, path: Path, cpu_model: str) -> None:
    """The ladder plot: calls/s at 1 and 32 in flight, and server CPU per call, by rung."""
    import matplotlib.pyplot as plt

    rungs = rungs_of(results)
    s = results.summary
    labels = [f"{r.step}\n{r.key}" for r in rungs]
    figure, (ax_rate, ax_cpu) = plt.subplots(1, 2, figsize=(14, 4.8))
    xs = range(len(rungs))
    width = 0.4

    def bar(ax: Any, offset: float, in_flight: int, key: str, color: str) -> None:
        values = [s(f"{key_of(r.key, in_flight)}.{key}") for r in rungs]
        heights = [0.0 if math.isnan(v.median) else v.median for v in values]
        errors = [
            [0.0 if math.isnan(v.median) else max(0.0, v.median - v.low) for v in values],
            [0.0 if math.isnan(v.median) else max(0.0, v.high - v.median) for v in values],
        ]
        ax.bar(
            [x + offset for x in xs],
            heights,
            width,
            yerr=errors,
            capsize=2,
            label=f"{in_flight} in flight",
            color=color,
        )

    colors = {1: "tab:gray", 32: "tab:blue"}
    for index, in_flight in enumerate(IN_FLIGHT):
        bar(ax_rate, (index - 0.5) * width, in_flight, "rate", colors[in_flight])
    ax_rate.set_ylabel("CreateTask calls/s (median, min-max)")
    ax_rate.set_title("Throughput by rung")
    for index, in_flight in enumerate(IN_FLIGHT):
        bar(ax_cpu, (index - 0.5) * width, in_flight, "cpu_us", colors[in_flight])
    ax_cpu.set_ylabel("server CPU µs per call (median, min-max)")
    ax_cpu.set_title("Server CPU per call by rung")
    for ax in (ax_rate, ax_cpu):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.legend(fontsize=8)
    figure.suptitle(
        f"CreateTask ladder ({profile.name} run, {os.cpu_count()} x {cpu_model}): "
        "1 echo, 2 +handler wrapping, 3 +naive commit, 4 +legato's schema, 5 legato"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
