"""The processes of a run, started and stopped in one place, and what /proc says of them.

The daemon under test is a real `legato serve` subprocess; the ceilings run as
`python -m bench.ceilings`. Every process started is registered, so a run that
fails half-way still stops all of them (by pid, never by name).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LEGATO = BIN / "legato"
SERVICE = "legato.v1.TaskService"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A channel that notices the socket the moment it appears: the default first
# reconnect backoff is a whole second.
PROBE_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 2),
    ("grpc.min_reconnect_backoff_ms", 2),
    ("grpc.max_reconnect_backoff_ms", 10),
]


def event_loop_name() -> str:
    """The event loop `run_loop` uses: uvloop where installed, as the daemon does."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Runs `main` on uvloop where it is installed, else on asyncio's loop.

    The daemon picks its loop by the same rule; ceilings and load generators
    follow it so that neither side of a ratio has a cheaper loop than the other.
    """
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


@dataclass(eq=False)  # identity: a process is itself
class Proc:
    """One process this run started."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_bytes(self) -> int:
        """Resident set size (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of all its threads so far."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command.
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def context_switches(self) -> int:
        """Voluntary + involuntary context switches of all its threads: wake-ups."""
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                lines = (task / "status").read_text().splitlines()
            except FileNotFoundError:  # the thread ended meanwhile
                continue
            for line in lines:
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
        return total

    def maps_file(self, fragment: str) -> bool:
        """Whether the process has a file whose path contains `fragment` mapped (a loaded .so)."""
        return fragment in Path(f"/proc/{self.pid}/maps").read_text()

    def threads(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/task").iterdir()))


class Processes:
    """Every process of a run; `stop_all` ends those still running."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[Proc] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdout: int = subprocess.DEVNULL,
        stdin: int = subprocess.DEVNULL,
        pass_fds: tuple[int, ...] = (),
    ) -> Proc:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as err:
            popen = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=err,
                env=env,
                cwd=REPO,
                pass_fds=pass_fds,
            )
        proc = Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    async def stop(self, proc: Proc, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit code."""
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.popen.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            code = await asyncio.to_thread(proc.popen.wait)
        if proc in self._procs:
            self._procs.remove(proc)
        return code

    def running(self) -> list[Proc]:
        return [p for p in self._procs if p.alive()]

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(p) for p in list(self._procs)))

    def kill_all(self) -> None:
        """Last resort, without an event loop (e.g. at interpreter exit)."""
        for proc in self._procs:
            if proc.alive():
                proc.popen.kill()
                proc.popen.wait()
        self._procs.clear()


@dataclass
class Daemon:
    """A `legato serve` process on its own data dir and unix socket."""

    proc: Proc
    data_dir: Path
    socket: Path
    # Seconds from spawning `legato serve` to its health check answering SERVING.
    start_seconds: float

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    def db_bytes(self) -> int:
        """Bytes of the database with its WAL and shared-memory files."""
        return sum(
            p.stat().st_size for p in self.data_dir.iterdir() if p.name.startswith("legato.db")
        )


async def wait_serving(proc: Proc, socket: Path, timeout: float = 60.0) -> float:
    """Waits until the daemon's health check answers SERVING; the perf_counter time then."""
    deadline = time.monotonic() + timeout
    # Polled on the loop on purpose: a thread hop would blur a millisecond-scale measure.
    while not os.path.exists(socket):  # noqa: ASYNC240
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} did not bind {socket}; see {proc.log}")
        await asyncio.sleep(0.001)
    async with grpc.aio.insecure_channel(f"unix:{socket}", options=PROBE_OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = await health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=1.0
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter()
            except grpc.aio.AioRpcError:
                pass  # bound but not serving yet
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited; see {proc.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} never answered SERVING; see {proc.log}")
            await asyncio.sleep(0.001)


async def start_daemon(
    procs: Processes,
    name: str,
    data_dir: Path,
    socket: Path,
    *,
    durability: str = "normal",
    max_open_tasks: int = 1_000_000_000,
    env: dict[str, str] | None = None,
    database: str = "",
) -> Daemon:
    """Starts `legato serve` and returns once it answers SERVING, timing that.

    `env` replaces the environment (e.g. a PYTHONPATH that puts a modified copy
    of the server first).
    """
    argv = [
        str(LEGATO),
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"unix:{socket}",
        "--durability",
        durability,
        "--max-open-tasks",
        str(max_open_tasks),
        "--log-level",
        "warning",
        *(["--database", database] if database else []),
    ]
    socket.unlink(missing_ok=True)  # noqa: ASYNC240 (a stale socket of an earlier start)
    started = time.perf_counter()
    proc = procs.spawn(name, argv, env=env)
    serving = await wait_serving(proc, socket)
    return Daemon(proc, data_dir, socket, serving - started)
