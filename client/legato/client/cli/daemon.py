"""`legato status`, `legato stop`, `legato doctor` and `legato ui`: the daemon seen from outside.

`legato serve` and `legato backup` are the daemon's own (`legato.server.cli`);
they are named here for `legato --help` only.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from legato.client._core import ClientTLS, PathLike, unreachable_hint
from legato.client.cli.output import dump
from legato.common.paths import LOG_NAME, default_address, unix_socket_path
from legato.common.tls import TLSError

if TYPE_CHECKING:
    from legato.client.cli import Parents
    from legato.server.ops import Check

# `legato status` when no daemon is SERVING there (as an init script's status).
EXIT_NOT_RUNNING = 3
STOP_TIMEOUT = 30.0


def _lock_holder(address: str) -> dict[str, Any] | None:
    from legato.client.local import lock_holder

    return lock_holder(address)


def _health(address: str, tls: ClientTLS | None) -> tuple[str, str]:
    """(status, detail): SERVING, NOT_SERVING or UNREACHABLE, and what gRPC said."""
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, tls.credentials())
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3.0
            )
        except grpc.RpcError as exc:
            details = exc.details() or exc.code().name
            hint = unreachable_hint(address, tls, details)
            return "UNREACHABLE", f"{details}. {hint}" if hint else details
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status), ""


def cmd_status(args: argparse.Namespace) -> int:
    """Where the daemon is, whether it is SERVING, and (for a local socket) its process."""
    address = args.address or default_address()
    tls = ClientTLS.resolve(args.tls_ca, args.tls_cert, args.tls_key)
    state, detail = _health(address, tls)
    holder = _lock_holder(address) or {}
    report: dict[str, Any] = {"address": address, "status": state}
    if holder:
        report.update(
            pid=holder.get("pid"),
            data_dir=holder.get("data_dir"),
            backend=holder.get("backend", "sqlite"),
        )
        if holder.get("data_dir"):
            report["log"] = str(Path(holder["data_dir"]) / LOG_NAME)
    socket = unix_socket_path(address)
    if state == "UNREACHABLE" and not holder and socket is not None:
        # Nothing runs there: gRPC's words for it ("failed to connect to all
        # addresses; last error: FAILED_PRECONDITION: ...") say no more than that.
        detail = (
            f"a socket left behind at {socket}; no daemon holds it"
            if socket.exists()
            else f"no socket at {socket}"
        )
    if detail:
        report["detail"] = detail
    if args.json:
        print(dump(report))
    else:
        words = {"UNREACHABLE": "not running (nothing answers)"}.get(state, state)
        print(f"legato daemon on {address}: {words}")
        for name in ("pid", "data_dir", "backend", "log", "detail"):
            if name in report:
                print(f"  {name.replace('_', ' ') + ':':<10} {report[name]}")
        if state == "UNREACHABLE" and not holder:
            print(
                "  start it with `legato serve --detach` (a command that talks to it, such as "
                "`legato task list`, also starts it; `status`, `stop` and `doctor` only look)"
            )
    return 0 if state == "SERVING" else EXIT_NOT_RUNNING


# Where there is no pidfd (not Linux, or Linux before 5.3): how often to look.
EXIT_POLL_INTERVAL = 0.05


def _watch(pid: int) -> int | None:
    """A pidfd of process `pid`, opened before it is signalled so that its pid cannot be
    reused under us; None where the platform has none (then its pid is polled)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError as exc:  # ENOSYS on kernels before 5.3; ESRCH if it has exited
        if isinstance(exc, ProcessLookupError):
            raise
        return None
    return fd


def _wait_exit(pid: int, watch: int | None, timeout: float) -> bool:
    """Whether process `pid` (its pidfd `watch`, if any) ended within `timeout`."""
    if watch is not None:
        return bool(select.select([watch], [], [], timeout)[0])
    give_up_at = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= give_up_at:
            return False
        time.sleep(EXIT_POLL_INTERVAL)


def cmd_stop(args: argparse.Namespace) -> int:
    """Stops the daemon of a local socket gracefully (SIGTERM) and waits for it to exit."""
    address = args.address or default_address()
    if unix_socket_path(address) is None:
        raise SystemExit(
            f"legato: {address} is not a unix socket: stop that daemon where it runs (SIGTERM "
            "to its process, or its supervisor)"
        )
    holder = _lock_holder(address)
    if not holder or not holder.get("pid"):
        print(f"legato: no daemon serves {address}; nothing to stop", file=sys.stderr)
        return 0
    pid = int(holder["pid"])
    try:
        watch = _watch(pid)
    except ProcessLookupError:
        return 0
    try:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return 0
        started = time.monotonic()
        if not _wait_exit(pid, watch, args.timeout):
            print(
                f"legato: the daemon (pid {pid}) is still stopping after {args.timeout:g} s; "
                f"its log: {Path(holder.get('data_dir', '.')) / LOG_NAME}",
                file=sys.stderr,
            )
            return 1
    finally:
        if watch is not None:
            os.close(watch)
    took = time.monotonic() - started
    print(f"legato stopped the daemon on {address} (pid {pid}) in {took:.1f} s")
    return 0


def _tls_checks(
    address: str, ca: PathLike | None, cert: PathLike | None, key: PathLike | None
) -> tuple[list[Check], ClientTLS | None, grpc.ChannelCredentials | None]:
    """The client's TLS files (arguments, else `LEGATO_TLS_*`): readable, PEM, the key
    private and its certificate's. No check when TLS is not configured."""
    from legato.server.ops import FAIL, OK, Check

    tls = None
    try:
        tls = ClientTLS.resolve(ca, cert, key)
        if tls is None:
            return [], None, None
        if address.startswith("unix"):
            raise TLSError(
                f"TLS is set (LEGATO_TLS_CA, --tls-ca ...) but {address} is a unix socket, "
                "which the daemon serves in plaintext; unset it, or check the daemon's HOST:PORT"
            )
        credentials = tls.credentials()
    except TLSError as exc:
        return [Check(FAIL, "tls", str(exc))], tls, None
    trusted = f"CA {tls.ca}" if tls.ca is not None else "the system's CAs"
    mine = f", client certificate {tls.cert} (key private)" if tls.cert is not None else ""
    return [Check(OK, "tls", f"trusts {trusted}{mine}")], tls, credentials


def doctor(
    *,
    data_dir: Path | None = None,
    address: str | None = None,
    tls_ca: PathLike | None = None,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
) -> list[Check]:
    """The checks of `legato doctor`: the daemon's files (`legato.server.ops.doctor`), and
    this client's way to the daemon.

    `tls_ca`, `tls_cert` and `tls_key` default to `LEGATO_TLS_CA`, `LEGATO_TLS_CERT`
    and `LEGATO_TLS_KEY`, as for a client; with any of them the daemon is asked over TLS.
    """
    from legato.server.ops import doctor as check_files

    address = address or default_address()
    checks, tls, credentials = _tls_checks(address, tls_ca, tls_cert, tls_key)
    return check_files(
        data_dir=data_dir,
        address=address,
        tls_checks=checks,
        credentials=credentials,
        unreachable_hint=lambda details: unreachable_hint(address, tls, details),
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    """`legato doctor`: one line per check; exit 0 only if every check is ok."""
    from legato.server.ops import OK

    checks = doctor(
        data_dir=Path(args.data_dir) if args.data_dir else None,
        address=args.address,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    for check in checks:
        print(dump(asdict(check)) if args.json else check.line())
    return 0 if all(check.status == OK for check in checks) else 1


def cmd_ui(args: argparse.Namespace) -> int:
    """`legato ui`: the web UI, a client of the daemon (see `legato.ui`)."""
    from legato.client.cli import agent_key
    from legato.client.local import ensure_daemon, resolve_key
    from legato.ui import DEFAULT_LISTEN, UIConfig, run

    ensure_daemon(args.address)
    config = UIConfig(
        api_key=agent_key(args.as_agent) if args.as_agent else resolve_key(args.key),
        address=args.address,
        listen=args.listen or DEFAULT_LISTEN,
        open_browser=args.open,
    )
    return run(config)


def register(commands: Any, parents: Parents) -> None:
    """Adds the daemon's commands: `serve` and `backup` by name, the rest in full."""
    from legato.client.cli import add_client_tls

    commands.add_parser(
        "serve", add_help=False, help="run the daemon (--detach: in the background)"
    )
    commands.add_parser(
        "backup",
        add_help=False,
        help="copy the daemon's database to PATH while it serves (online, consistent)",
    )

    def connection_only(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--address", help="daemon address (default: LEGATO_ADDRESS or the default socket)"
        )
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
        add_client_tls(parser)

    status = commands.add_parser(
        "status",
        help="where the daemon listens, its pid, data dir and backend, and whether it is "
        f"SERVING (exit 0; else {EXIT_NOT_RUNNING})",
    )
    connection_only(status)
    status.set_defaults(run=cmd_status, uses_client=False)

    stop = commands.add_parser(
        "stop", help="stop the daemon of the local socket gracefully and wait for it to exit"
    )
    stop.add_argument(
        "--address", help="its unix:PATH (default: LEGATO_ADDRESS or the default socket)"
    )
    stop.add_argument(
        "--timeout",
        type=float,
        default=STOP_TIMEOUT,
        metavar="SECONDS",
        help=f"give up waiting after SECONDS (default {STOP_TIMEOUT:g})",
    )
    stop.set_defaults(run=cmd_stop, uses_client=False)

    doctor = commands.add_parser(
        "doctor", help="check the data dir, database, daemon and admin key; say what to fix"
    )
    doctor.add_argument(
        "--data-dir",
        help="the daemon's data dir (default: LEGATO_DATA_DIR or the per-user data dir)",
    )
    connection_only(doctor)
    doctor.set_defaults(run=cmd_doctor, uses_client=False)

    ui = commands.add_parser(
        "ui",
        help="a web UI: every agent's tasks, live, and a hand to answer or cancel",
        parents=[parents.connection],
    )
    ui.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="where to serve (default 127.0.0.1:8731; port 0 picks one); keep it on loopback",
    )
    ui.add_argument("--open", action="store_true", help="open the link in the default browser")
    ui.set_defaults(run=cmd_ui, uses_client=False)
