"""Operator tools: `legato backup` while writers are active, `legato doctor` healthy and broken.

Backup: the `legato` command copies the database of a serving daemon while
four producers keep creating tasks. Checked: exit 0, the copy is mode 0600,
passes `integrity_check` and the database invariants, holds every task
acknowledged before the backup started, and holds what the command said it
copied; an existing file is refused without --force and replaced with it.

Doctor: against a healthy daemon every line is ok and the exit code 0; then
against broken setups (a database file chmod 0644, admin.key missing, the
daemon stopped) the exit code is 1 and the line of the broken part is FAIL or
WARN and says what to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import stat
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from reliability.conftest import MakeDaemon
from reliability.harness import DaemonProcess, create_agent, record
from reliability.invariants import assert_sound, connect_readonly
from reliability.load import Producer, progressed

LEGATO = Path(sys.executable).with_name("legato")
LABEL = "@backup"
PRODUCERS = 4
# The backup starts once this many creates were acknowledged.
BEFORE_BACKUP = 300
GUARD = 60.0

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return self.stdout.splitlines()


async def legato(daemon: DaemonProcess, *args: str, env_data_dir: bool = True) -> Ran:
    """Runs the `legato` command against `daemon` (LEGATO_ADDRESS, and LEGATO_DATA_DIR
    unless `env_data_dir` is False)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEGATO_")}
    env["LEGATO_ADDRESS"] = daemon.address
    if env_data_dir:
        env["LEGATO_DATA_DIR"] = str(daemon.data_dir)
    process = await asyncio.create_subprocess_exec(
        str(LEGATO), *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), GUARD)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_backup_is_a_consistent_private_copy_taken_while_writers_write(
    make_daemon: MakeDaemon, workdir: Path
) -> None:
    began = time.monotonic()
    daemon = make_daemon()
    await daemon.start()
    progress = asyncio.Event()
    producers = [
        Producer(f"b{n}", await create_agent(daemon, f"writer{n}", [LABEL]), LABEL, progress)
        for n in range(PRODUCERS)
    ]
    stop = asyncio.Event()
    writing = [asyncio.create_task(p.run(daemon.address, stop)) for p in producers]
    try:
        while sum(len(p.acknowledged) for p in producers) < BEFORE_BACKUP:
            progress.clear()
            await progressed(progress, writing, GUARD)
        before = {k: v for p in producers for k, v in p.acknowledged.items()}
        copy, first = workdir / "legato-backup.db", workdir / "first.db"
        backup_began = time.monotonic()
        made = await legato(
            daemon, "backup", str(copy), "--data-dir", str(daemon.data_dir), env_data_dir=False
        )
        backup_seconds = time.monotonic() - backup_began
        during = sum(len(p.acknowledged) for p in producers) - len(before)
        assert made.code == 0, made.stderr
        made_mode = stat.S_IMODE(copy.stat().st_mode)
        shutil.copyfile(copy, first)  # kept aside: --force replaces it below
        refused = await legato(daemon, "backup", str(copy))
        refused_left = digest(copy) == digest(first)
        forced = await legato(daemon, "backup", str(copy), "--force")  # by LEGATO_DATA_DIR
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writing), GUARD)

    said = re.fullmatch(
        r"backed up (\d+) tasks and (\d+) events to (.+) \((\d+) B\)\n", made.stdout
    )
    assert said, made.stdout
    assert made_mode == 0o600, oct(made_mode)
    with closing(connect_readonly(first)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file, no WAL
        stored = dict(db.execute("SELECT content, id FROM tasks").fetchall())
        events = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert (len(stored), events) == (int(said[1]), int(said[2])), "it said it copied another count"
    missing = [key for key, task_id in before.items() if stored.get(key) != task_id]
    assert missing == [], f"acknowledged before the backup, missing from it: {missing[:5]}"
    report = assert_sound(first)

    assert refused.code == 1 and "--force" in refused.stderr, refused
    assert refused_left, "a refused backup changed the existing file"
    assert forced.code == 0, forced.stderr
    forced_said = re.match(r"backed up (\d+) tasks", forced.stdout)
    assert forced_said and int(forced_said[1]) >= len(stored), forced.stdout
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert not list(workdir.glob(".*.partial*")), "a partial backup file was left behind"
    record(
        "operator_backup",
        {
            "acknowledged_before_backup": len(before),
            "acknowledged_while_backup_ran": during,
            "tasks_copied": int(said[1]),
            "events_copied": int(said[2]),
            "backup_seconds": round(backup_seconds, 2),
            "forced_copy_tasks": int(forced_said[1]),
            "missing_from_copy": len(missing),
            "copy_mode": "0600",
            "copy_integrity_check": "ok",
            **report.figures(),
            "seconds": round(time.monotonic() - began, 1),
        },
    )


def statuses(ran: Ran) -> dict[str, str]:
    """What `legato doctor` said: check name -> status (ok, WARN, FAIL)."""
    found: dict[str, str] = {}
    for line in ran.lines():
        match = re.match(r"(ok|WARN|FAIL)\s+([^:]+):", line)
        assert match, f"not a doctor line: {line!r}"
        found[match[2]] = match[1]
    return found


def line_of(ran: Ran, name: str) -> str:
    return next(line for line in ran.lines() if re.match(rf"\S+\s+{re.escape(name)}:", line))


async def test_doctor_passes_a_healthy_setup_and_says_what_to_fix_in_broken_ones(
    make_daemon: MakeDaemon,
) -> None:
    daemon = make_daemon()
    await daemon.start()
    await create_agent(daemon, "someone", ["@x"])  # a write: the WAL exists
    said: dict[str, list[str]] = {}

    healthy = await legato(daemon, "doctor")
    said["healthy"] = healthy.lines()
    assert healthy.code == 0, healthy.stdout + healthy.stderr
    assert set(statuses(healthy).values()) == {"ok"}, healthy.stdout
    assert {"data dir", "database file legato.db", "integrity", "lock", "socket", "health",
            "admin.key"} <= set(statuses(healthy))  # fmt: skip

    database = daemon.data_dir / "legato.db"
    database.chmod(0o644)
    loose = await legato(daemon, "doctor")
    said["database 0644"] = loose.lines()
    database.chmod(0o600)
    assert loose.code == 1
    assert statuses(loose)["database file legato.db"] == "FAIL", loose.stdout
    assert f"chmod 600 {database}" in line_of(loose, "database file legato.db")

    key = daemon.data_dir / "admin.key"
    kept = key.rename(daemon.root / "admin.key.kept")
    keyless = await legato(daemon, "doctor")
    said["admin.key missing"] = keyless.lines()
    kept.rename(key)
    assert keyless.code == 1
    assert statuses(keyless)["admin.key"] == "FAIL", keyless.stdout
    assert "restart the daemon" in line_of(keyless, "admin.key")

    code, _, _ = await daemon.terminate(daemon.grace + 5)
    assert code == 0
    stopped = await legato(daemon, "doctor")
    said["daemon stopped"] = stopped.lines()
    assert stopped.code == 1
    found = statuses(stopped)
    assert found["health"] == "FAIL" and found["socket"] == "FAIL", stopped.stdout
    assert found["lock"] == "WARN", stopped.stdout
    assert "legato serve" in line_of(stopped, "health")
    assert found["integrity"] == "ok"  # the database itself is fine

    # kill -9 leaves the socket file behind: it exists, but nothing answers on it.
    await daemon.start()
    await daemon.kill()
    killed = await legato(daemon, "doctor")
    said["daemon killed, stale socket"] = killed.lines()
    assert killed.code == 1
    found = statuses(killed)
    assert (found["socket"], found["health"], found["lock"]) == ("ok", "FAIL", "WARN"), found
    record("operator_doctor", {"scenarios": said})
