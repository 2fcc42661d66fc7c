"""Operator tools: `legato backup` copies the database online, `legato doctor` checks a setup.

They live beside the daemon because they read its files; the daemon itself
never imports them. Both work on the files of a data dir (`--data-dir`, else `LEGATO_DATA_DIR`,
else the per-user default) and need no API key: whoever can read the data dir
owns its database anyway. Neither changes any data; opening the database
read-only may create its `-wal` and `-shm` files, owner-only, as SQLite does
for any reader of a WAL database.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from legato.common.paths import (
    ADMIN_KEY_FILE,
    DB_NAME,
    LOCK_NAME,
    default_address,
    default_data_dir,
)
from legato.v1 import agents_pb2, agents_pb2_grpc

DB_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm")
PROBE_TIMEOUT = 3.0

__all__ = ["BackupError", "BackupResult", "Check", "backup", "doctor"]


class BackupError(Exception):
    """The backup was not made; the message says why and what to do."""


@dataclass(frozen=True)
class BackupResult:
    """What `backup` wrote."""

    path: Path
    tasks: int
    events: int
    size: int


@contextmanager
def _private_umask() -> Iterator[None]:
    # Files SQLite creates beside a database (journal, -wal, -shm) get the
    # process umask: keep them owner-only, like the database itself.
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _readonly(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def backup(destination: Path, *, data_dir: Path | None = None, force: bool = False) -> BackupResult:
    """Copies the daemon's database to `destination` while the daemon serves.

    SQLite's online backup API copies every page in one step, inside one read
    transaction: the copy is the database as it was at one commit, and in WAL
    mode the daemon's writers are not held up meanwhile. The copy is written
    to a temporary file (mode 0600) beside `destination`, checked with
    `PRAGMA quick_check`, made a self-contained single file (no WAL), and only
    then moved into place, so `destination` never holds half a backup. An
    existing `destination` is refused unless `force`.
    """
    source = (data_dir or default_data_dir()) / DB_NAME
    if not source.is_file():
        raise BackupError(
            f"no database at {source}; pass --data-dir (or set LEGATO_DATA_DIR) to the daemon's "
            "data dir"
        )
    destination = destination.expanduser()
    if destination.is_dir():
        raise BackupError(
            f"{destination} is a directory; give a file name, e.g. {destination}/legato-backup.db"
        )
    if destination.exists() and not force:
        raise BackupError(f"{destination} already exists; pass --force to overwrite it")
    if destination.resolve() in {(source.parent / name).resolve() for name in DB_FILES}:
        raise BackupError(f"{destination} is the live database; choose another path")
    if not destination.parent.is_dir():
        raise BackupError(f"no directory {destination.parent} to write the backup in")
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        with _private_umask():
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            with closing(_readonly(source)) as src, closing(sqlite3.connect(partial)) as copy:
                src.backup(copy)  # pages=-1: all pages in one step, one consistent snapshot
                copy.execute("PRAGMA journal_mode = DELETE")
                checked = copy.execute("PRAGMA quick_check").fetchone()[0]
                if checked != "ok":
                    raise BackupError(f"the copy failed its integrity check ({checked}); retry")
                tasks = int(copy.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
                events = int(copy.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        os.chmod(partial, 0o600)
        if force:
            os.replace(partial, destination)
        else:
            try:
                os.link(partial, destination)  # fails, unlike a rename, if it appeared meanwhile
            except FileExistsError:
                raise BackupError(
                    f"{destination} already exists; pass --force to overwrite it"
                ) from None
            os.unlink(partial)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy {source}: {exc}") from exc
    finally:
        for leftover in (partial, partial.with_name(partial.name + "-journal")):
            leftover.unlink(missing_ok=True)
    return BackupResult(destination, tasks, events, destination.stat().st_size)


# -- doctor -----------------------------------------------------------------------------

OK, WARN, FAIL = "ok", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    """One finding of `doctor`: its status, what was checked, and what to do about it."""

    status: str  # ok, WARN or FAIL
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix else text


def _mode_check(name: str, path: Path, expected: int, kind: str) -> Check:
    info = path.lstat()
    mode = stat.S_IMODE(info.st_mode)
    chmod = f"chmod {expected:o} {path}"
    if info.st_uid != os.getuid():
        return Check(
            FAIL,
            name,
            f"{path} belongs to user id {info.st_uid}, not to you",
            f"legato uses only your own files: chown it to yourself, or use your own {kind}",
        )
    if mode & 0o077 and not expected & 0o077:
        return Check(
            FAIL, name, f"{path} has mode {mode:04o}: other users can read or change it", chmod
        )
    if mode != expected:
        return Check(WARN, name, f"{path} has mode {mode:04o}, expected {expected:04o}", chmod)
    return Check(OK, name, f"{path} ({expected:04o}, yours)")


def _lock_holder(path: Path) -> int | None:
    """The pid holding the daemon's flock on `path`, or None if nobody does.

    Read from /proc/locks, so that looking never takes the lock itself (a daemon
    starting that instant would find it taken). Elsewhere, a shared lock is tried
    and dropped at once.
    """
    info = path.stat()
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        locks = Path("/proc/locks").read_text()
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = path.read_text().strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None
    for line in locks.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:2154665 0 EOF" (ids shifted after "->")
        if "->" in fields:
            fields.remove("->")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4])
    return None


def _check_data_dir(data_dir: Path) -> list[Check]:
    if not data_dir.is_dir():
        return [
            Check(
                FAIL,
                "data dir",
                f"{data_dir} does not exist",
                "start the daemon once (`legato serve`), or point --data-dir / "
                "LEGATO_DATA_DIR at the data dir it uses",
            )
        ]
    return [_mode_check("data dir", data_dir, 0o700, "data dir")]


def _check_database(data_dir: Path) -> list[Check]:
    database = data_dir / DB_NAME
    if not database.is_file():
        return [
            Check(
                FAIL,
                "database",
                f"no {DB_NAME} in {data_dir}",
                "start the daemon once (`legato serve`) to create it",
            )
        ]
    checks = [
        _mode_check(f"database file {name}", data_dir / name, 0o600, "data dir")
        for name in DB_FILES
        if (data_dir / name).exists()
    ]
    try:
        with _private_umask(), closing(_readonly(database)) as db:
            result = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
            tasks = int(db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
    except sqlite3.Error as exc:
        checks.append(
            Check(
                FAIL,
                "integrity",
                f"cannot read {database}: {exc}",
                "stop the daemon and restore the last backup (`legato backup` makes one)",
            )
        )
        return checks
    if result != ["ok"]:
        checks.append(
            Check(
                FAIL,
                "integrity",
                f"PRAGMA quick_check: {'; '.join(result[:3])}",
                "stop the daemon and restore the last backup (`legato backup` makes one)",
            )
        )
    else:
        checks.append(Check(OK, "integrity", f"quick_check ok ({tasks} task(s))"))
    return checks


def _check_lock(data_dir: Path) -> tuple[Check, int | None]:
    lock = data_dir / LOCK_NAME
    if not lock.is_file():
        return Check(
            WARN,
            "lock",
            f"no {LOCK_NAME} in {data_dir}: no daemon ever served it",
            "start the daemon: `legato serve`",
        ), None
    mode = _mode_check("lock", lock, 0o600, "data dir")
    if mode.status != OK:
        return mode, None
    holder = _lock_holder(lock)
    if holder is None:
        return Check(
            WARN,
            "lock",
            f"{lock}: no daemon holds it (the daemon is not running)",
            "start the daemon: `legato serve`",
        ), None
    return Check(OK, "lock", f"held by the daemon (pid {holder})"), holder


def _check_socket(address: str) -> list[Check]:
    if not address.startswith("unix:"):
        return [Check(OK, "socket", f"{address} is a TCP address; no socket file to check")]
    path = Path(address.removeprefix("unix:").removeprefix("//"))
    checks = []
    if path.parent.is_dir():
        checks.append(_mode_check("socket dir", path.parent, 0o700, "socket dir"))
    if not path.exists():
        checks.append(
            Check(
                FAIL,
                "socket",
                f"no socket at {path}: the daemon is not running there",
                "start it with `legato serve`, or set LEGATO_ADDRESS / "
                "--address to where it listens",
            )
        )
    elif not stat.S_ISSOCK(path.lstat().st_mode):
        checks.append(
            Check(FAIL, "socket", f"{path} is not a socket", "remove it and restart the daemon")
        )
    else:
        checks.append(Check(OK, "socket", f"{path} exists"))
    return checks


def _check_health(channel: grpc.Channel, address: str, hint: Callable[[str], str]) -> Check:
    health = health_pb2_grpc.HealthStub(channel)
    try:
        response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT)
    except grpc.RpcError as exc:
        fix = "start it with `legato serve` (a socket left by a daemon that died is reused)"
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            more = hint(exc.details() or "")
            fix = f"{fix}. {more}" if more else fix
        return Check(FAIL, "health", f"no daemon answers at {address} ({exc.code().name})", fix)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return Check(
            FAIL,
            "health",
            f"the daemon at {address} says {name}",
            "it is shutting down: wait for it to stop, then start it again",
        )
    return Check(OK, "health", f"the daemon at {address} is SERVING")


def _check_admin_key(data_dir: Path, channel: grpc.Channel | None) -> Check:
    path = data_dir / ADMIN_KEY_FILE
    if not path.is_file():
        return Check(
            FAIL,
            "admin.key",
            f"no {ADMIN_KEY_FILE} in {data_dir}",
            "restart the daemon (`legato serve`): it issues a new admin key when the "
            "file is missing",
        )
    mode = _mode_check("admin.key", path, 0o600, "data dir")
    if mode.status != OK:
        return mode
    if channel is None:
        return Check(
            WARN,
            "admin.key",
            "present, but not checked: no daemon answers",
            "start the daemon, then run `legato doctor` again",
        )
    key = path.read_text().strip()
    agents = agents_pb2_grpc.AgentServiceStub(channel)
    try:
        agent = agents.WhoAmI(
            agents_pb2.WhoAmIRequest(),
            timeout=PROBE_TIMEOUT,
            metadata=(("authorization", f"Bearer {key}"),),
        )
    except grpc.RpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return Check(
                FAIL,
                "admin.key",
                "the daemon does not accept it (rotated or revoked)",
                f"delete {path} and restart the daemon: it issues a new admin key",
            )
        return Check(
            WARN,
            "admin.key",
            f"not checked: WhoAmI answered {code.name}",
            "run `legato doctor` again",
        )
    if agent.role != agents_pb2.ROLE_ADMIN:
        return Check(
            FAIL,
            "admin.key",
            f"it is the key of {agent.name!r}, which is no admin",
            f"delete {path} and restart the daemon: it issues a new admin key",
        )
    return Check(OK, "admin.key", f"accepted by the daemon (agent {agent.name!r}, admin)")


def _no_hint(details: str) -> str:
    return ""


def doctor(
    *,
    data_dir: Path | None = None,
    address: str | None = None,
    tls_checks: Sequence[Check] = (),
    credentials: grpc.ChannelCredentials | None = None,
    unreachable_hint: Callable[[str], str] = _no_hint,
) -> list[Check]:
    """Checks a legato setup; one `Check` per finding, in the order a user would fix them.

    How to reach the daemon is the client's business: `tls_checks` are its
    findings about its TLS files (a failed one skips the health check),
    `credentials` its channel credentials (None: plaintext), and
    `unreachable_hint` turns the details of a failed connection into what to
    change (`legato doctor` passes the client's own rules).
    """
    data_dir = data_dir or default_data_dir()
    address = address or default_address()
    checks = _check_data_dir(data_dir)
    if checks[0].status == FAIL and not data_dir.is_dir():
        return checks
    checks += _check_database(data_dir)
    lock, _ = _check_lock(data_dir)
    checks.append(lock)
    checks += _check_socket(address)
    checks += tls_checks
    if any(check.status == FAIL for check in tls_checks):
        checks.append(
            Check(FAIL, "health", "not checked: the TLS files above cannot be used", "fix them")
        )
        checks.append(_check_admin_key(data_dir, None))
        return checks
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, credentials)
    with channel:
        health = _check_health(channel, address, unreachable_hint)
        checks.append(health)
        checks.append(_check_admin_key(data_dir, channel if health.status == OK else None))
    return checks
