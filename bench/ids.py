"""`python -m bench.ids [HISTORY]`: what random task ids and idempotency keys cost
the SQLite writer against time-ordered ones (legato's), on a history.

A database file is filled with HISTORY tasks (default 200,000), half of each
kind, then groups of 32 creates are written by the SQLite store's own batched
insert (`_create_many`), one transaction a group, each kind in turn for 30
alternating rounds of 10 groups. Printed per kind: median microseconds of the
writer per create and WAL frames (pages) written per create.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from legato.client._core import new_idempotency_key
from legato.server.db import connect
from legato.server.model import Status, TaskRecord
from legato.server.store import Durability
from legato.server.store.sqlite import SCHEMA, _create_many
from legato.server.tasks import new_task_id

Make = Callable[[], str]
GROUP = 32


def random_id() -> str:
    return "t_" + secrets.token_urlsafe(16)  # task ids before they began with the time


def random_key() -> str:
    return f"auto-{uuid.uuid4().hex}"  # automatic keys before they began with the time


KINDS: dict[str, tuple[Make, Make]] = {
    "random ids, random keys (before)": (random_id, random_key),
    "time-ordered ids, random keys": (new_task_id, random_key),
    "time-ordered ids and keys (legato)": (new_task_id, new_idempotency_key),
}


def measure(history: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="legato-ids-") as scratch:
        conn = connect(Path(scratch) / "legato.db", Durability.NORMAL)
        conn.executescript(SCHEMA)

        def task(task_id: str, key: str) -> TaskRecord:
            now = time.time_ns() // 1000
            return TaskRecord(
                id=task_id,
                content="bench: a task of a few words " * 4,
                labels=("@bench",),
                context=b"{}",
                created_by="creator",
                created_at=now,
                max_attempts=3,
                idempotency_key=key,
                status=Status.PENDING,
                updated_at=now,
            )

        def group(make_id: Make, make_key: Make) -> None:
            conn.execute("BEGIN IMMEDIATE")
            _create_many(conn, [(task(make_id(), make_key()), None) for _ in range(GROUP)])
            conn.execute("COMMIT")

        kinds = list(KINDS.values())
        for i in range(history // GROUP):
            group(*kinds[i % 2 * 2])  # half random, half time-ordered
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        print(f"history: {history:,} tasks")
        micros: dict[str, list[float]] = {name: [] for name in KINDS}
        frames: dict[str, list[float]] = {name: [] for name in KINDS}
        for round_index in range(rounds):
            order = list(KINDS.items())
            for name, (make_id, make_key) in order if round_index % 2 else order[::-1]:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                started = time.perf_counter()
                for _ in range(10):
                    group(make_id, make_key)
                micros[name].append((time.perf_counter() - started) / (10 * GROUP) * 1e6)
                logged = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
                frames[name].append(logged / (10 * GROUP))
        conn.close()
    base = statistics.median(micros[next(iter(KINDS))])
    print("| ids and keys | writer us/create | x before | WAL frames/create |")
    print("|---|---|---|---|")
    for name in KINDS:
        median = statistics.median(micros[name])
        print(
            f"| {name} | {median:.1f} | {median / base:.2f} | "
            f"{statistics.median(frames[name]):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ids", description=__doc__)
    parser.add_argument("history", nargs="?", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    measure(args.history, args.rounds)


if __name__ == "__main__":
    main()
