"""The daemon as a real process, raw stubs to drive it, and the figures a test records.

Every reliability test runs `python -m legato.server` as a subprocess on a
temp data dir and unix socket, so that it can be killed with SIGKILL, stopped
with SIGTERM and measured through /proc like any daemon a user runs.

`LEGATO_CHAOS=long` selects the long form of every test (`make chaos`); the
short form runs inside `make test`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from legato.common.paths import DB_NAME
from legato.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2_grpc

T = TypeVar("T")

LONG = os.environ.get("LEGATO_CHAOS", "").strip().lower() == "long"
MODE = "long" if LONG else "short"
RESULTS_DIR = Path(__file__).with_name("results")

# A daemon prints its ready line within a second here; this only stops a hang.
START_TIMEOUT = 30.0
READY_PREFIX = b"legato serving on"

# Reconnect quickly after a restart: grpc's default backoff (1 s, growing to
# 2 min) would leave clients idle long after the daemon is back.
FAST_RECONNECT: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
]


def scale(short: T, long: T) -> T:
    """`long` under LEGATO_CHAOS=long, else `short`."""
    return long if LONG else short


def record(name: str, figures: dict[str, Any]) -> Path:
    """Writes a test's figures to tests/reliability/results/NAME.json."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {
        "test": name,
        "mode": MODE,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **figures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class DaemonProcess:
    """One legato daemon on `root/data` and `root/run/legato.sock`, restartable.

    Its stderr (the daemon's log) is appended across restarts to `root/daemon.log`.
    """

    def __init__(
        self, root: Path, *, grace: float = 2.0, args: Sequence[str] = (), database: str = ""
    ):
        self.root = root
        # `--database`: "" for the SQLite file in the data dir, else a PostgreSQL URL.
        self.database = database
        self.data_dir = root / "data"
        self.socket = root / "run" / "legato.sock"
        self.grace = grace
        self.args = list(args)
        self.log_path = root / "daemon.log"
        self.process: asyncio.subprocess.Process | None = None
        self.admin_key = ""
        self.starts = 0
        self.kills = 0

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_NAME

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        return self._running().pid

    def _running(self) -> asyncio.subprocess.Process:
        assert self.process is not None and self.process.returncode is None, "daemon not running"
        return self.process

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "legato.server",
            "--data-dir", str(self.data_dir), "--listen", self.address,
            "--grace", str(self.grace), "--log-level", "warning", *self.args,
            *(["--database", self.database] if self.database else []),
        ]  # fmt: skip

    async def start(self) -> float:
        """Starts the daemon and returns once it printed its ready line; the seconds it took."""
        assert not self.running, "daemon already running"
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *self.command(), stdout=asyncio.subprocess.PIPE, stderr=log
            )
        self.process = process
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b"(nothing within the start timeout)"
        if not line.startswith(READY_PREFIX):
            process.kill()
            await process.wait()
            self.process = None
            raise AssertionError(f"the daemon did not start: {line!r}\n{self.log_tail()}")
        self.starts += 1
        # A daemon joining a shared database that already has an admin writes no key.
        key_file = self.data_dir / "admin.key"
        self.admin_key = key_file.read_text().strip() if key_file.exists() else ""
        return time.monotonic() - began

    async def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        process = self._running()
        process.kill()
        code = await asyncio.wait_for(process.wait(), 10)
        assert code == -signal.SIGKILL, f"daemon exited {code} instead of dying of SIGKILL"
        self.kills += 1
        self.process = None

    async def terminate(self, timeout: float) -> tuple[int, float, list[str]]:
        """SIGTERM; the exit code, the seconds until exit and the stdout lines after the ready one.

        Fails the test if the process has not exited after `timeout` seconds.
        """
        process = self._running()
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        try:
            rest = await asyncio.wait_for(process.stdout.read(), timeout)
            code = await asyncio.wait_for(
                process.wait(), max(0.1, timeout - (time.monotonic() - began))
            )
        except TimeoutError:
            process.kill()
            await process.wait()
            self.process = None
            raise AssertionError(
                f"the daemon did not exit within {timeout:.1f} s of SIGTERM\n{self.log_tail()}"
            ) from None
        self.process = None
        return code, time.monotonic() - began, rest.decode(errors="replace").splitlines()

    async def close(self) -> None:
        """Kills the daemon if it still runs (teardown)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- what /proc shows of the process ------------------------------------------------

    def status_field(self, name: str) -> int:
        """A numeric field of /proc/PID/status (VmRSS in KiB, Threads, ...)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
        raise KeyError(name)

    def rss_kib(self) -> int:
        return self.status_field("VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return self.status_field("Threads")

    def thread_names(self) -> list[str]:
        """The names of the daemon's threads (`/proc/PID/task/*/comm`), sorted."""
        names = []
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                names.append(Path(f"/proc/{self.pid}/task/{task}/comm").read_text().strip())
            except FileNotFoundError:  # it ended meanwhile
                continue
        return sorted(names)


class Raw:
    """Raw legato.v1 stubs on one channel; every call carries `key` as a bearer token.

    Raw stubs, not the friendly client: the tests decide exactly when a call is
    retried, and see every status code as it is.
    """

    def __init__(
        self, address: str, key: str, *, options: Sequence[tuple[str, Any]] = FAST_RECONNECT
    ):
        self.channel = grpc.aio.insecure_channel(address, options=list(options))
        self.tasks = tasks_pb2_grpc.TaskServiceStub(self.channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = bearer(key)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Raw:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def create_agent(daemon: DaemonProcess, name: str, labels: Sequence[str]) -> str:
    """Creates agent `name` with the daemon's admin key; returns the new agent's key."""
    async with Raw(daemon.address, daemon.admin_key) as admin:
        response = await admin.agents.CreateAgent(
            agents_pb2.CreateAgentRequest(name=name, labels=list(labels)),
            metadata=admin.metadata,
            timeout=10,
        )
    return response.api_key


async def health_status(address: str) -> int:
    """The daemon's overall health status (health_pb2.HealthCheckResponse.SERVING = 1)."""
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(response.status)
