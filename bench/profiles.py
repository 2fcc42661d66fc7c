"""How much a run does: the full run of `make bench`, or the smoke run CI does."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """Counts and durations of every section of a run."""

    name: str
    # Unary calls: rounds of (legato, ceiling) pairs, each run this long after a warm-up.
    unary_rounds: int
    unary_seconds: float
    unary_warmup_seconds: float
    # Delivery: rounds, watcher counts and how many events each count measures.
    delivery_rounds: int
    watcher_counts: tuple[int, ...]
    delivery_events: tuple[int, ...]
    result_samples: int
    # Scale: the small and the large database, measured this many rounds.
    scale_sizes: tuple[int, int]
    scale_rounds: int
    scale_seconds: float
    scale_claims: int
    # Footprint.
    lifecycle_tasks: int
    idle_watchers: int
    idle_cpu_seconds: float
    rss_watchers: int
    # Start-up: how many times each cold start is timed.
    start_repeats: int
    large_start_repeats: int
    # The CreateTask ladder (bench.ladder): rounds of every rung at 1 and 32 in
    # flight, each run this long after a warm-up; then py-spy recordings of this
    # length of the rungs named in `profiled` (and of any variant).
    ladder_rounds: int = 5
    ladder_seconds: float = 2.0
    ladder_warmup_seconds: float = 0.3
    profile_seconds: int = 3  # py-spy takes whole seconds
    profiled: tuple[str, ...] = ("legato", "schema", "wire")
    # The rungs measured (keys of bench.ladder's rungs); empty: all of them.
    ladder_rungs: tuple[str, ...] = ()
    # Fraction of bench.components' counts run.
    components_scale: float = 1.0
    # Watch streams per load-generator process and per connection.
    watcher_processes: int = 4
    streams_per_channel: int = 25


FULL = Profile(
    name="full",
    unary_rounds=5,
    unary_seconds=2.0,
    unary_warmup_seconds=0.3,
    delivery_rounds=3,
    watcher_counts=(1, 100, 1000),
    delivery_events=(200, 80, 30),
    result_samples=60,
    scale_sizes=(10_000, 1_000_000),
    scale_rounds=5,
    scale_seconds=1.0,
    scale_claims=150,
    lifecycle_tasks=3000,
    idle_watchers=100,
    idle_cpu_seconds=10.0,
    rss_watchers=1000,
    start_repeats=5,
    large_start_repeats=3,
)

SMOKE = Profile(
    name="smoke",
    unary_rounds=2,
    unary_seconds=0.4,
    unary_warmup_seconds=0.1,
    delivery_rounds=2,
    watcher_counts=(1, 10, 50),
    delivery_events=(30, 15, 8),
    result_samples=10,
    scale_sizes=(1_000, 10_000),
    scale_rounds=2,
    scale_seconds=0.3,
    scale_claims=30,
    lifecycle_tasks=200,
    idle_watchers=20,
    idle_cpu_seconds=2.0,
    rss_watchers=50,
    start_repeats=2,
    large_start_repeats=1,
    ladder_rounds=1,
    ladder_seconds=0.3,
    ladder_warmup_seconds=0.1,
    profile_seconds=1,
    profiled=("legato",),
    components_scale=0.05,
)
