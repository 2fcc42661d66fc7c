"""The daemon's own commands: `legato serve` (also `python -m legato.server`) and `legato backup`.

They live with the daemon, so that the daemon runs without the client
package's command line; the `legato` command hands these two to `main` here.
`legato serve --detach` starts the daemon in the background, logging to
`legato.log` in its data dir, and returns once it is SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from legato.common.paths import (
    LOG_NAME,
    SOCKET_NAME,
    UnsafeAddress,
    daemon_environment,
    default_data_dir,
    default_runtime_dir,
    lock_holder,
    private_dir,
)
from legato.common.tls import TLSError
from legato.server.tls import ServerTLS

# The child of `--detach` writes its address to this descriptor once it is
# SERVING; end of file before that means it stopped (its log says why).
READY_FD_ENV = "LEGATO_READY_FD"
# A daemon on SQLite is SERVING in a fraction of a second; PostgreSQL
# migrations under a lock held by other daemons may take longer.
DETACH_TIMEOUT = 60.0
# What the child writes to the ready descriptor instead of its address when
# another daemon holds its data dir or socket: its parent decides whether that
# is the daemon asked for (two starters at once) or a conflict to report.
REFUSED_PREFIX = "refused: "


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The options of `legato serve`."""
    serve.add_argument("--listen", help="unix:PATH or HOST:PORT (default: a private unix socket)")
    serve.add_argument(
        "--data-dir", help="where the database lives (default: the per-user data dir)"
    )
    serve.add_argument(
        "--database",
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB: a database shared by several daemons "
        "(default: LEGATO_DATABASE_URL, else the SQLite file in the data dir)",
    )
    serve.add_argument(
        "--durability",
        choices=["normal", "full"],
        default="normal",
        help="normal survives a daemon crash; full also survives power loss",
    )
    serve.add_argument(
        "--grace", type=float, default=5.0, help="seconds to drain calls on shutdown"
    )
    serve.add_argument(
        "--max-open-tasks",
        type=_positive_int,
        default=1000,
        help="pending + claimed tasks one agent may have created (default 1000)",
    )
    serve.add_argument(
        "--watch-buffer",
        type=_positive_int,
        default=10_000,
        help="events a watcher may leave unread before it is cut off (default 10000)",
    )
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve TLS (HOST:PORT only) with this certificate (PEM, naming the host clients "
        "connect to)",
    )
    serve.add_argument(
        "--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM, mode 0600)"
    )
    serve.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="mutual TLS: accept only clients with a certificate signed by this CA",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--detach",
        action="store_true",
        help=f"run in the background, logging to {LOG_NAME} in the data dir; returns once the "
        "daemon is SERVING (`legato stop` stops it)",
    )


def add_backup_arguments(backup: argparse.ArgumentParser) -> None:
    """The options of `legato backup`."""
    backup.add_argument("path", help="the file to write (mode 0600)")
    backup.add_argument(
        "--data-dir",
        help="the daemon's data dir (default: LEGATO_DATA_DIR or the per-user data dir)",
    )
    backup.add_argument("--force", action="store_true", help="overwrite PATH if it exists")


def build_parser(prog: str = "legato") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="The legato daemon.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_arguments(commands.add_parser("serve", help="run the daemon"))
    add_backup_arguments(
        commands.add_parser(
            "backup", help="copy the daemon's database to PATH while it serves (online, consistent)"
        )
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """`legato serve ...` or `legato backup ...`; the exit status."""
    args = build_parser().parse_args(list(argv))
    if args.command == "backup":
        return cmd_backup(args)
    # The child of `--detach` serves in the foreground whatever its arguments say:
    # argparse takes any abbreviation of `--detach` (`--deta`), and a child that
    # detached again would start another, and that one another, without end.
    if args.detach and READY_FD_ENV not in os.environ:
        return detach(args, [a for a in argv[1:] if not _is_detach(a)])
    return cmd_serve(args)


def _is_detach(argument: str) -> bool:
    """Whether argparse reads `argument` as `--detach` (it takes unique prefixes)."""
    return len(argument) > len("--d") and "--detach".startswith(argument)


def _server_tls(args: argparse.Namespace) -> ServerTLS | None:
    """`--tls-cert`, `--tls-key` and `--tls-client-ca` of `legato serve`: all or nothing
    for the first two; the third needs them."""
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise TLSError(
            "TLS needs both the daemon's certificate and its key: --tls-cert FILE --tls-key FILE"
            + (" (--tls-client-ca adds client certificates to them)" if args.tls_client_ca else "")
        )
    return ServerTLS(
        cert=Path(args.tls_cert),
        key=Path(args.tls_key),
        client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Runs the daemon in this process until SIGINT/SIGTERM; the exit status."""
    from legato.server.daemon import (
        EXIT_DATABASE_FAILED,
        AlreadyRunning,
        Config,
        run_event_loop,
        serve,
    )
    from legato.server.store import DatabaseFailed, Durability

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        tls = _server_tls(args)
    except TLSError as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    config = Config(
        database=args.database or os.environ.get("LEGATO_DATABASE_URL", ""),
        durability=Durability(args.durability),
        grace=args.grace,
        listen=args.listen or "",
        max_open_tasks=args.max_open_tasks,
        watch_buffer=args.watch_buffer,
        tls=tls,
    )
    if args.data_dir:
        config = replace(config, data_dir=Path(args.data_dir))
    ready_fd = os.environ.pop(READY_FD_ENV, "")

    async def serve_and_report() -> None:
        ready = asyncio.Event()

        async def report() -> None:
            await ready.wait()
            os.write(int(ready_fd), f"{config.address}\n".encode())
            os.close(int(ready_fd))

        reporter = asyncio.ensure_future(report()) if ready_fd else None
        try:
            await serve(config, ready=ready)
        finally:
            if reporter is not None:
                reporter.cancel()

    try:
        run_event_loop(serve_and_report())
    except AlreadyRunning as exc:
        if ready_fd:
            one_line = str(exc).replace("\n", " ")
            os.write(int(ready_fd), f"{REFUSED_PREFIX}{one_line}\n".encode())
        else:
            print(f"legato: {exc}", file=sys.stderr)
        return 1
    except (UnsafeAddress, TLSError, ValueError) as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"legato: cannot start the daemon: {exc}", file=sys.stderr)
        return 1
    except DatabaseFailed as exc:
        print(
            f"legato: the daemon stopped because its database failed ({exc.reason}); "
            "its log above has the traceback. Restart it: nothing acknowledged was lost",
            file=sys.stderr,
        )
        return EXIT_DATABASE_FAILED
    return 0


def detach(args: argparse.Namespace, serve_argv: Sequence[str]) -> int:
    """`legato serve --detach`: the daemon as a child in a session of its own, its
    output appended to the log; returns 0 once it reports SERVING, else its exit
    status with the end of its log."""
    data_dir = private_dir(Path(args.data_dir) if args.data_dir else default_data_dir())
    address = args.listen or f"unix:{default_runtime_dir() / SOCKET_NAME}"
    if _already_serving(address, data_dir):
        return 0
    log_path = data_dir / LOG_NAME
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    started_at = os.lseek(log_fd, 0, os.SEEK_END)
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "legato.server", *serve_argv],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=(write_end,),
            env={**daemon_environment(), READY_FD_ENV: str(write_end)},
            # Not the caller's working directory, which may be deleted or unmounted
            # long before the daemon stops.
            cwd=data_dir,
            # Its own session: closing this terminal (SIGHUP) or Ctrl-C here
            # does not reach it.
            start_new_session=True,
        )
    finally:
        os.close(write_end)
        os.close(log_fd)
    try:
        ready = _read_ready(read_end, DETACH_TIMEOUT)
    finally:
        os.close(read_end)
    if ready and ready.startswith(REFUSED_PREFIX):
        child.wait()
        if _already_serving(address, data_dir):  # another starter's daemon won the race
            return 0
        refusal = f"legato: {ready.removeprefix(REFUSED_PREFIX)}"
        with log_path.open("a") as log_file:  # for the record, as any failed start
            print(refusal, file=log_file)
        print(refusal, file=sys.stderr)
        return child.returncode or 1
    if ready:
        print(
            f"legato serving on {ready} in the background (pid {child.pid}, data dir "
            f"{data_dir}, log {log_path}); `legato status` shows it, `legato stop` stops it",
            flush=True,
        )
        return 0
    if ready is None:
        print(
            f"legato: the daemon (pid {child.pid}) did not report SERVING within "
            f"{DETACH_TIMEOUT:g} s; it is still running: see {log_path}",
            file=sys.stderr,
        )
        return 1
    # End of file: the child is exiting, or has; its status is coming.
    child.wait()
    with log_path.open("rb") as log_file:
        log_file.seek(started_at)
        tail = log_file.read().decode(errors="replace").strip().splitlines()[-5:]
    for line in tail:
        print(line, file=sys.stderr)
    print(f"legato: the daemon did not start (exit {child.returncode}); log: {log_path}",
          file=sys.stderr)  # fmt: skip
    return child.returncode or 1


def _already_serving(address: str, data_dir: Path) -> bool:
    """Whether a daemon on `data_dir` already serves the unix socket `address`; if so,
    says where. A daemon there on another data dir is for the child to refuse."""
    try:
        holder = lock_holder(address)
    except UnsafeAddress:
        return False  # the child says why
    if not holder or Path(holder.get("data_dir", "")) != data_dir.absolute():
        return False
    print(
        f"legato already serving on {address} (pid {holder.get('pid')}, data dir {data_dir}); "
        "`legato status` shows it, `legato stop` stops it",
        flush=True,
    )
    return True


def _read_ready(fd: int, timeout: float) -> str | None:
    """The line the daemon writes once SERVING; "" at end of file, None on timeout."""
    received = b""
    give_up_at = time.monotonic() + timeout
    while b"\n" not in received:
        left = give_up_at - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        received += chunk
    return received.decode().strip()


def cmd_backup(args: argparse.Namespace) -> int:
    """`legato backup PATH`: an online copy of the daemon's database (see `ops.backup`)."""
    from legato.server.ops import BackupError, backup

    data_dir = Path(args.data_dir) if args.data_dir else None
    try:
        made = backup(Path(args.path), data_dir=data_dir, force=args.force)
    except BackupError as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {made.tasks} tasks and {made.events} events to {made.path} ({made.size} B)")
    return 0
