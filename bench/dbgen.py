"""Databases with history: 10k or 1M finished tasks, generated straight into SQLite.

A daemon started once on an empty data dir creates the schema, the admin and
the benchmark's two agents; then plain sqlite3 inserts the tasks in one
transaction, row for row as the daemon stores them (a DONE task, its
`task_labels` row and one CREATED event), in well under a minute for 1M. The
result is cached under bench/results/ and rebuilt when the daemon's schema or
this generator changes; each run works on a copy.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from legato.client import AsyncClient
from legato.server.model import Status, TaskRecord
from legato.server.store import rows
from legato.server.store import sqlite as store

from bench.payloads import CONTEXT, CREATOR, LABEL, RESULT, WORKER, content, struct_bytes
from bench.procs import Processes, start_daemon

# Bump when the rows generated here change.
GENERATOR_VERSION = 2
SAMPLE_IDS = 2000
STATE_SENTINEL = 7_777_777_777_777_777
BATCH = 50_000


@dataclass(frozen=True)
class HistoryDb:
    """A cached data dir with `tasks` finished tasks and the keys of its agents."""

    tasks: int
    data_dir: Path
    creator_key: str
    worker_key: str
    sample_ids: list[str]
    build_seconds: float
    cached: bool

    def copy_to(self, target: Path) -> Path:
        """A copy of the data dir to serve (runs write to it; the cache stays as built)."""
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o700)
        for name in ("legato.db", "admin.key"):
            shutil.copyfile(self.data_dir / name, target / name)
            (target / name).chmod(0o600)
        return target


def fingerprint() -> str:
    """Changes whenever the schema the daemon creates or the generated rows change."""
    text = f"{store.SCHEMA}\n{store.SCHEMA_VERSION}\n{GENERATOR_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def history_db(procs: Processes, cache: Path, tasks: int, scratch: Path) -> HistoryDb:
    """The cached database of `tasks` finished tasks, built first if needed."""
    home = cache / f"db-{tasks}"
    meta_path = home / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint() and (home / "data" / "legato.db").exists():
            return HistoryDb(
                tasks,
                home / "data",
                meta["creator_key"],
                meta["worker_key"],
                meta["sample_ids"],
                meta["build_seconds"],
                cached=True,
            )
    shutil.rmtree(home, ignore_errors=True)
    started = time.perf_counter()
    data_dir = home / "data"
    daemon = await start_daemon(procs, f"dbgen-{tasks}", data_dir, scratch / f"gen{tasks}.sock")
    try:
        async with AsyncClient(daemon.address, api_key=daemon.admin_key()) as admin:
            _, creator_key = await admin.create_agent(CREATOR, labels=["@creator"])
            _, worker_key = await admin.create_agent(WORKER, labels=[LABEL])
    finally:
        await procs.stop(daemon.proc)
    ids = insert_history(data_dir / "legato.db", tasks)
    build_seconds = time.perf_counter() - started
    meta = {
        "fingerprint": fingerprint(),
        "tasks": tasks,
        "creator_key": creator_key,
        "worker_key": worker_key,
        "sample_ids": random.sample(ids, min(SAMPLE_IDS, len(ids))),
        "build_seconds": build_seconds,
    }
    meta_path.write_text(json.dumps(meta))
    return HistoryDb(
        tasks,
        data_dir,
        creator_key,
        worker_key,
        meta["sample_ids"],
        build_seconds,
        cached=False,
    )


def _done_task_row(columns: list[str]) -> tuple[list[Any], dict[str, int]]:
    """A DONE task as a row of `tasks` in column order, and where the per-task fields go."""
    values: dict[str, Any] = {
        "rowid": 0,
        "id": "",
        "content": content("history:"),
        "labels": json.dumps([LABEL]),
        "context": struct_bytes(CONTEXT),
        "created_by": CREATOR,
        "created_at": 0,
        "max_attempts": 3,
        "parent_id": "",
        "root_id": "",
        "idempotency_key": "",
        "status": int(Status.DONE),
        "result": struct_bytes(RESULT),
        "error": "",
        "claimed_by": WORKER,
        "attempt": 1,
        "version": 3,
        "updated_at": 0,
        "lease_token": "",
        "lease_expires_at": None,
        "lease_us": 0,
        "depth": 0,
        "deadline": None,
        "output_size": 0,
        "question": "",
        "answer": "",
        "released": 0,
        "claim_seq": 0,
    }
    unknown = [c for c in columns if c not in values]
    if unknown:
        raise RuntimeError(
            f"tasks has columns the benchmark's generator does not know: {unknown}; "
            "teach bench/dbgen.py their values and bump GENERATOR_VERSION"
        )
    varying = ("rowid", "id", "root_id", "created_at", "updated_at")
    return [values[c] for c in columns], {name: columns.index(name) for name in varying}


def _created_state() -> str:
    """The `state` JSON of a CREATED event, as the store writes it, with a sentinel time."""
    task = TaskRecord(
        id="t_x",
        content="",
        labels=(LABEL,),
        context=b"",
        created_by=CREATOR,
        created_at=STATE_SENTINEL,
        max_attempts=3,
        updated_at=STATE_SENTINEL,
    )
    return rows.state_json(task, None)


def insert_history(db: Path, tasks: int) -> list[str]:
    """Appends `tasks` finished tasks to the database at `db`; returns their ids."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -1000000")  # 1 GB: the id index stays in memory
        columns = [row[1] for row in conn.execute("PRAGMA table_info(tasks)")]
        label_columns = [row[1] for row in conn.execute("PRAGMA table_info(task_labels)")]
        event_columns = [row[1] for row in conn.execute("PRAGMA table_info(events)")]
        if label_columns != ["label", "task_rowid", "pending"] or event_columns != [
            "seq", "task_rowid", "type", "actor", "at", "state"
        ]:  # fmt: skip
            raise RuntimeError(
                f"task_labels {label_columns} / events {event_columns} changed; "
                "update bench/dbgen.py and bump GENERATOR_VERSION"
            )
        template, at = _done_task_row(columns)
        first = conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM tasks").fetchone()[0] + 1
        ids = ["t_" + secrets.token_urlsafe(16) for _ in range(tasks)]
        start_us = time.time_ns() // 1000 - tasks * 1000  # one task a millisecond, until now
        state = _created_state()
        sentinel = str(STATE_SENTINEL)

        def task_rows() -> Iterator[list[Any]]:
            for index, task_id in enumerate(ids):
                row = template.copy()
                created = start_us + index * 1000
                row[at["rowid"]] = first + index
                row[at["id"]] = row[at["root_id"]] = task_id
                row[at["created_at"]] = created
                row[at["updated_at"]] = created + 500
                yield row

        placeholders = ",".join("?" * len(columns))
        conn.execute("BEGIN")
        conn.executemany(
            f"INSERT INTO tasks ({','.join(columns)}) VALUES ({placeholders})",
            task_rows(),
        )
        conn.executemany(
            "INSERT INTO task_labels (label, task_rowid, pending) VALUES (?, ?, 0)",
            ((LABEL, first + index) for index in range(tasks)),
        )
        conn.executemany(
            "INSERT INTO events (task_rowid, type, actor, at, state) VALUES (?, 1, ?, ?, ?)",
            (
                (
                    first + index,
                    CREATOR,
                    start_us + index * 1000,
                    state.replace(sentinel, str(start_us + index * 1000)),
                )
                for index in range(tasks)
            ),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    return ids
