"""The daemon process: lock the data dir and socket, open the store, serve, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from legato.common.paths import (
    ADMIN_KEY_FILE,
    DB_NAME,
    LOCK_NAME,
    SOCKET_NAME,
    default_data_dir,
    default_runtime_dir,
    private_dir,
    socket_lock_path,
    unix_socket_path,
)
from legato.server import limits, rpc
from legato.server.agent_service import AgentService
from legato.server.auth import Authenticator
from legato.server.events import DEFAULT_BUFFER
from legato.server.health import Health
from legato.server.service import TaskService
from legato.server.store import DatabaseFailed, Durability
from legato.server.tasks import DEFAULT_MAX_OPEN_TASKS, TaskManager
from legato.server.tls import ServerTLS, TLSError
from legato.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2, tasks_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "legato.v1.TaskService"
# The exit status of `legato serve` when the daemon stopped because its
# database failed: a supervisor (systemd's Restart=on-failure) restarts it.
EXIT_DATABASE_FAILED = 3

GRPC_OPTIONS: list[tuple[str, int]] = [
    # The largest request or response; `limits` shows that every task fits one.
    ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
    # Watch streams may sit idle for hours: ping them so dead peers are noticed.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # gRPC sets SO_REUSEPORT by default: a second daemon on the same HOST:PORT
    # would start and take half of the first one's connections.
    ("grpc.so_reuseport", 0),
]


class AlreadyRunning(RuntimeError):
    """Another daemon holds the data dir or the socket."""


@dataclass(frozen=True)
class Config:
    """How the daemon runs. `listen` is `unix:PATH` or `HOST:PORT`; `tls` (for a
    `HOST:PORT` only) makes it serve TLS."""

    data_dir: Path = field(default_factory=default_data_dir)
    listen: str = ""
    # A postgresql:// URL: the database shared with other daemons; "" for the
    # SQLite file in the data dir.
    database: str = ""
    durability: Durability = Durability.NORMAL
    grace: float = 5.0
    # Pending + claimed tasks one agent may have created: a runaway agent loop
    # cannot fill the disk.
    max_open_tasks: int = DEFAULT_MAX_OPEN_TASKS
    # Events a watcher may leave unread before it is cut off with RESOURCE_EXHAUSTED.
    watch_buffer: int = DEFAULT_BUFFER
    tls: ServerTLS | None = None

    @property
    def address(self) -> str:
        return self.listen or f"unix:{default_runtime_dir() / SOCKET_NAME}"

    def credentials(self) -> grpc.ServerCredentials | None:
        """What the daemon listens with: None for plaintext, else TLS from the files of
        `tls`, read and checked; `TLSError` says what is wrong with them."""
        if self.tls is None:
            return None
        if unix_socket_path(self.address) is not None:
            # A unix socket sits in a 0700 dir: only this user reaches it, and TLS
            # would add certificates to manage and nothing to protect.
            raise TLSError(
                f"TLS is for HOST:PORT addresses, and {self.address} is a unix socket, which "
                "only your user can reach already; serve TLS with --listen HOST:PORT, or drop "
                "the --tls-* options"
            )
        return self.tls.credentials()


def listen_warning(address: str, *, tls: bool = False) -> str | None:
    """What to tell the user about listening on `address`: None with TLS, for a
    unix socket or for a loopback HOST:PORT, else the warning that keys travel
    in clear."""
    if tls or unix_socket_path(address) is not None:
        return None
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None  # a host name: it may resolve anywhere
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is not None and ip.is_loopback:
        return None
    return (
        f"WARNING: listening on {address}, beyond loopback, without TLS. API keys travel "
        "in clear in each call's metadata: anyone who can see this traffic can take them and "
        "act as your agents, and anyone who can reach the port can try keys. Keep --listen on "
        "loopback (127.0.0.1:PORT, [::1]:PORT or localhost:PORT), use the default unix "
        "socket, or serve TLS: --tls-cert FILE --tls-key FILE (see README: Remote agents)."
    )


class _HolderLock:
    """An exclusive flock on a file that names its holder, as JSON.

    The lock, not the file, is what counts: the kernel drops it when its holder
    dies, even by `kill -9`, so a file left behind never blocks the next daemon.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, holder: dict[str, Any]) -> dict[str, Any] | None:
        """Takes the lock and writes `holder` into the file; if another process
        holds it, returns what that one wrote instead."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_holder(fd)
            os.close(fd)
            return other
        os.fchmod(fd, 0o600)  # os.open's mode applies to a new file only
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if isinstance(holder, dict):
        return holder
    # Written by an older daemon (its pid alone), or not written yet.
    return {"pid": text or "unknown"}


class DaemonLock:
    """The daemon's claim on its data dir and, for a unix socket, on the socket,
    held for the daemon's life.

    Both are needed. gRPC silently unlinks and takes over a unix socket another
    server is bound to, and two daemons with different data dirs meet on the
    same default socket: without a lock on the socket itself, the second one
    would take it and leave the first running, unreachable. The socket's lock is
    a file beside it (`legato.sock.lock`) in the same 0700 dir.
    """

    def __init__(self, data_dir: Path, address: str, *, backend: str = "sqlite"):
        self._data_dir = data_dir
        self._address = address
        self._backend = backend
        self._socket = unix_socket_path(address)
        self._held: list[_HolderLock] = []

    def __enter__(self) -> DaemonLock:
        holder = {
            "pid": os.getpid(),
            "data_dir": str(self._data_dir.absolute()),
            "listen": self._address,
            # For `legato status`, which reads the holder of the socket's lock.
            "backend": self._backend,
        }
        data_lock = _HolderLock(self._data_dir / LOCK_NAME)
        other = data_lock.acquire(holder)
        if other is not None:
            listening = f", listening on {other['listen']}" if other.get("listen") else ""
            raise AlreadyRunning(
                f"another legato daemon (pid {other['pid']}{listening}) is already serving "
                f"{self._data_dir.absolute()}; stop it first, or give this one another data dir "
                "and a socket of its own: --data-dir DIR --listen unix:PATH"
            )
        self._held.append(data_lock)
        if self._socket is not None:
            private_dir(self._socket.parent)
            socket_lock = _HolderLock(socket_lock_path(self._socket))
            other = socket_lock.acquire(holder)
            if other is not None:
                self.__exit__(None, None, None)
                data_dir = f", data dir {other['data_dir']}" if other.get("data_dir") else ""
                raise AlreadyRunning(
                    f"another legato daemon (pid {other['pid']}{data_dir}) is already listening "
                    f"on unix:{self._socket}; stop it first, or choose another socket for this "
                    "one with --listen unix:PATH (its clients then need LEGATO_ADDRESS=unix:PATH)"
                )
            self._held.append(socket_lock)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        while self._held:
            self._held.pop().release()


class Daemon:
    """A running legato daemon; `async with Daemon(config)` serves until closed."""

    def __init__(self, config: Config):
        self.config = config
        self.tasks: TaskManager | None = None
        self.admin_key_path = config.data_dir / ADMIN_KEY_FILE
        self._server: grpc.aio.Server | None = None
        self._bound_port = 0
        self._health = Health()
        backend = "postgresql" if config.database else "sqlite"
        self._lock = DaemonLock(private_dir(config.data_dir), config.address, backend=backend)
        # Why the daemon's database failed, once it has; `serve` then stops it.
        self.failure: DatabaseFailed | None = None
        self._failed = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        # Whether the store can write now (False while it reconnects to its
        # database server); health says SERVING only while it can.
        self._writable = True
        self._health_updates: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # Bad TLS files are refused before the locks are taken or the database opened.
        credentials = self.config.credentials()
        self._lock.__enter__()
        try:
            await self._start(credentials)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, credentials: grpc.ServerCredentials | None) -> None:
        self.tasks = await TaskManager.open(
            self.config.data_dir / DB_NAME,
            database=self.config.database,
            durability=self.config.durability,
            max_open_tasks=self.config.max_open_tasks,
            watch_buffer=self.config.watch_buffer,
        )
        self._supervisor = asyncio.create_task(
            self._supervise(self.tasks), name="legato-supervisor"
        )
        self.tasks.store.on_writable = self._writable_changed
        self.admin_key_path = await self.tasks.agents.bootstrap_admin(
            self.config.data_dir, shared=self.tasks.store.shared
        )
        # No server interceptors: each handler is wrapped once here (auth, wire
        # format, errors) instead of on every call (see rpc's docstring).
        server = grpc.aio.server(options=GRPC_OPTIONS)
        authenticate = Authenticator(self.tasks.agents)
        rpc.register(
            server,
            tasks_pb2_grpc.add_TaskServiceServicer_to_server,
            TaskService(self.tasks),
            authenticate=authenticate,
        )
        rpc.register(
            server,
            agents_pb2_grpc.add_AgentServiceServicer_to_server,
            AgentService(self.tasks.agents),
            authenticate=authenticate,
        )
        # Open: probes carry no key. Reflection (below) is open too.
        rpc.register(
            server, health_pb2_grpc.add_HealthServicer_to_server, self._health, authenticate=None
        )
        reflection.enable_server_reflection(
            [
                tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
                agents_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        old_umask = os.umask(0o077)  # the socket file: owner only
        try:
            try:
                if credentials is None:
                    bound = server.add_insecure_port(self.config.address)
                else:
                    bound = server.add_secure_port(self.config.address, credentials)
            except RuntimeError:  # grpc's way of saying the bind failed
                bound = 0
            if bound == 0:
                raise OSError(
                    f"cannot listen on {self.config.address}; if another process (another "
                    "legato daemon?) listens there, stop it or choose another with --listen"
                )
        finally:
            os.umask(old_umask)
        self._bound_port = bound
        await server.start()
        self._server = server
        await self._set_health()

    def _writable_changed(self, writable: bool) -> None:
        self._writable = writable
        if self._server is None:
            return  # not serving yet: `_start` sets health from `_writable`
        update = asyncio.ensure_future(self._set_health())
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)

    async def _set_health(self) -> None:
        # Read when it runs, not when it was asked for: the last change wins.
        status = health_pb2.HealthCheckResponse.SERVING
        if not self._writable:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)

    @property
    def address(self) -> str:
        """Where the daemon listens: the configured address, with the port it was
        given for a HOST:0."""
        address = self.config.address
        if unix_socket_path(address) is not None or not self._bound_port:
            return address
        return f"{address.rsplit(':', 1)[0]}:{self._bound_port}"

    async def _supervise(self, tasks: TaskManager) -> None:
        """Once the database fails: NOT_SERVING, and no caller left waiting for it.

        The database has already answered every call pending on it; watch
        streams and long-poll claims wait on commits that will not come, so
        they are ended too.
        """
        failure = await tasks.store.failed()
        await self._health.enter_graceful_shutdown()
        tasks.end_waits()
        self._record(failure)

    def _record(self, failure: DatabaseFailed) -> None:
        if self.failure is None:
            self.failure = failure
            self._failed.set()

    async def failed(self) -> DatabaseFailed:
        """Waits until the database fails; by then health says NOT_SERVING and no
        call waits on it. Stopping the daemon is left to the caller (`serve`)."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING, end watch streams and claim waits, drain calls,
        close the database.

        Watch streams and long-poll claims are ended first because
        `server.stop(grace)` otherwise waits out the whole grace period while
        any of them is open.
        """
        await self._health.enter_graceful_shutdown()
        if self.tasks is not None:
            self.tasks.end_waits()
        if self._server is not None:
            await self._server.stop(self.config.grace)
            self._server = None
        if self.tasks is not None:
            store = self.tasks.store
            await self.tasks.close()
            self.tasks = None
            # It may fail as it closes too (its last checkpoint, say): that counts.
            if store.failure is not None:
                self._record(store.failure)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._lock.__exit__(None, None, None)

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Runs the daemon on uvloop where it is installed, else on asyncio's own loop.

    uvloop makes grpc.aio's callbacks cheaper; see BENCHMARKS.md for the figures.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """Runs the daemon until SIGINT or SIGTERM, or until its database fails.

    Raises `DatabaseFailed` once the daemon has stopped if its database failed:
    the process must then exit non-zero (`EXIT_DATABASE_FAILED`), so that a
    supervisor restarts it.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    warning = listen_warning(config.address, tls=config.tls is not None)
    if warning is not None:
        # Printed, not logged: --log-level must not be able to hide it.
        print(f"legato: {warning}", file=sys.stderr, flush=True)
    async with Daemon(config) as daemon:
        assert daemon.tasks is not None
        database = f"database: {daemon.tasks.store.description}, " if config.database else ""
        tls = ""
        if config.tls is not None:
            tls = ", TLS with client certificates" if config.tls.mutual else ", TLS"
        print(
            f"legato serving on {daemon.address} (data: {config.data_dir}, {database}"
            f"durability: {config.durability.value}{tls})",
            flush=True,
        )
        if ready is not None:
            ready.set()
        signalled = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(daemon.failed())
        try:
            await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signalled.cancel()
            failed.cancel()
        if daemon.failure is None:
            log.info("shutting down")
        else:
            log.error("shutting down: the database failed (%s)", daemon.failure.reason)
    if daemon.failure is not None:
        raise daemon.failure
    print("legato stopped", flush=True)
