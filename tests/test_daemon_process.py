"""The daemon as a real process: crashes, signals, a second instance, files, health, the CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import stat
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from legato.client import AsyncClient, RPCError, Task
from legato.v1 import tasks_pb2, tasks_pb2_grpc

START_TIMEOUT = 15.0
LEGATO = Path(sys.executable).with_name("legato")


@dataclass
class DaemonProcess:
    """One `python -m legato.server` process on a data dir and a unix socket."""

    data_dir: Path
    socket: Path
    grace: float
    process: asyncio.subprocess.Process
    stderr: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exited(self, timeout: float) -> int:
        """The exit code; fails the test if the process is still running after `timeout`."""
        assert self.process.stdout is not None
        rest = await asyncio.wait_for(self.process.stdout.read(), timeout)
        self.stdout_lines.extend(rest.decode().splitlines())
        return await asyncio.wait_for(self.process.wait(), timeout)

    def log(self) -> str:
        return self.stderr.read_text()


Spawn = Callable[..., Awaitable[DaemonProcess]]


def serve_args(data_dir: Path, socket: Path, grace: float) -> list[str]:
    return ["--data-dir", str(data_dir), "--listen", f"unix:{socket}", "--grace", str(grace)]


@pytest.fixture
async def spawn(short_tmp: Path) -> AsyncIterator[Spawn]:
    """`await spawn()` starts a daemon on `short_tmp` and returns once it serves.

    Every process started is killed at teardown, whatever the test did.
    """
    started: list[DaemonProcess] = []

    async def start(*, grace: float = 2.0, umask: int = 0o022) -> DaemonProcess:
        data_dir, socket = short_tmp / "data", short_tmp / "run" / "legato.sock"
        stderr = short_tmp / f"daemon-{len(started)}.log"
        with stderr.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "legato.server",
                *serve_args(data_dir, socket, grace),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                umask=umask,
            )
        daemon = DaemonProcess(data_dir, socket, grace, process, stderr)
        started.append(daemon)
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)).decode()
        assert line.startswith("legato serving on"), f"no ready line: {line!r}\n{daemon.log()}"
        daemon.stdout_lines.append(line.rstrip("\n"))
        return daemon

    yield start
    for daemon in started:
        if daemon.process.returncode is None:
            daemon.process.kill()
            await daemon.process.wait()


async def list_all(client: AsyncClient) -> list[Task]:
    tasks, token = [], ""
    while True:
        page = await client.list_tasks(page_size=1000, page_token=token)
        tasks.extend(page.tasks)
        token = page.next_page_token
        if not token:
            return tasks


# -- kill -9 ----------------------------------------------------------------------------

PRODUCERS = 4
ACKS_PER_ROUND = 150


@dataclass
class Round:
    """The creates of one round: the key is also the content, so duplicates show."""

    number: int
    acknowledged: dict[str, str] = field(default_factory=dict)  # key -> task id
    attempted: set[str] = field(default_factory=set)
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    killed: bool = False

    async def produce(self, client: AsyncClient, producer: int) -> None:
        for n in itertools.count():
            key = f"r{self.number}-p{producer}-{n}"
            self.attempted.add(key)
            try:
                handle = await client.create_task(key, labels=["@durable"], idempotency_key=key)
            except RPCError:
                if self.killed:
                    return  # the daemon died under this call: its outcome is unknown
                raise
            self.acknowledged[key] = handle.id
            if len(self.acknowledged) >= ACKS_PER_ROUND:
                self.enough.set()


async def test_every_acknowledged_create_survives_kill_9(spawn: Spawn) -> None:
    acknowledged: dict[str, str] = {}
    attempted: set[str] = set()
    daemon = await spawn()
    for number in range(3):
        round_ = Round(number)
        async with AsyncClient(daemon.address, agent="producer", timeout=10) as client:
            producers = [asyncio.create_task(round_.produce(client, p)) for p in range(PRODUCERS)]
            await asyncio.wait_for(round_.enough.wait(), 20)
            round_.killed = True
            daemon.signal(signal.SIGKILL)  # while the producers' creates are in flight
            assert await daemon.exited(10) == -signal.SIGKILL
            await asyncio.wait_for(asyncio.gather(*producers), 10)
        # Each producer had one create in flight when the daemon died.
        assert len(round_.attempted) - len(round_.acknowledged) == PRODUCERS
        acknowledged.update(round_.acknowledged)
        attempted |= round_.attempted

        daemon = await spawn()
        async with AsyncClient(daemon.address, agent="producer", timeout=10) as client:
            for key, task_id in acknowledged.items():
                assert (await client.get_task(task_id)).content == key
            tasks = await list_all(client)
            assert len(tasks) >= len(acknowledged)
            assert [key for key, n in Counter(t.content for t in tasks).items() if n > 1] == []

            # Retrying every create of the round, answered or not, makes no second task.
            for key in sorted(round_.attempted):
                handle = await client.create_task(key, labels=["@durable"], idempotency_key=key)
                assert handle.id == acknowledged.get(key, handle.id)
            assert len(await list_all(client)) == len(attempted)


# -- SIGTERM ----------------------------------------------------------------------------


async def test_sigterm_ends_watch_streams_and_exits_within_the_grace(spawn: Spawn) -> None:
    daemon = await spawn(grace=2.0)
    async with AsyncClient(daemon.address, agent="coder") as client:
        ids = [(await client.create_task(f"task {i}", labels=["@watched"])).id for i in range(3)]

    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        watch = stub.WatchTasks(tasks_pb2.WatchTasksRequest(labels=["@watched"], after_seq=0))
        backlog = [await watch.read() for _ in ids]  # the stream is open and caught up
        assert [e.task.id if isinstance(e, tasks_pb2.TaskEvent) else e for e in backlog] == ids

        stopping = time.monotonic()
        daemon.signal(signal.SIGTERM)
        # The daemon ends watch streams itself; left to `server.stop(grace)` they
        # would be held open for the whole grace period.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(watch.read(), daemon.grace)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "after_seq" in (ended.value.details() or "")  # it says how to resume

    assert await daemon.exited(daemon.grace + 1) == 0, daemon.log()
    assert time.monotonic() - stopping <= daemon.grace + 1
    assert daemon.stdout_lines[-1] == "legato stopped"

    restarted = await spawn()
    async with AsyncClient(restarted.address) as client:
        assert [t.id for t in await list_all(client)] == ids


# -- one daemon per data dir ------------------------------------------------------------


@pytest.mark.parametrize("socket_name", ["legato.sock", "other.sock"])
async def test_a_second_daemon_on_the_same_data_dir_refuses_to_start(
    spawn: Spawn, socket_name: str
) -> None:
    first = await spawn()
    second = await asyncio.create_subprocess_exec(
        str(LEGATO),
        "serve",
        *serve_args(first.data_dir, first.socket.with_name(socket_name), 1.0),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(second.communicate(), START_TIMEOUT)
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()

    assert second.returncode != 0
    assert "already serving" in stderr.decode()
    assert first.process.returncode is None
    async with AsyncClient(first.address, timeout=5) as client:
        handle = await client.create_task("still here?", labels=["@x"])
        assert (await client.get_task(handle.id)).content == "still here?"


# -- files ------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_files_are_private_to_the_owner_even_under_a_loose_umask(
    spawn: Spawn, short_tmp: Path
) -> None:
    (short_tmp / "data").mkdir(mode=0o755)
    os.chmod(short_tmp / "data", 0o755)  # an existing dir with loose permissions
    daemon = await spawn(umask=0o000)
    async with AsyncClient(daemon.address) as client:
        await client.create_task("something private", labels=["@x"])  # the WAL now exists

    assert mode(daemon.data_dir) == 0o700
    assert mode(daemon.socket.parent) == 0o700
    for name in ("legato.db", "legato.db-wal", "legato.db-shm", "legato.lock"):
        assert mode(daemon.data_dir / name) == 0o600, name
    assert stat.S_ISSOCK(daemon.socket.stat().st_mode)
    assert mode(daemon.socket) & 0o077 == 0


# -- health and reflection --------------------------------------------------------------


@pytest.fixture
async def channel(spawn: Spawn) -> AsyncIterator[grpc.aio.Channel]:
    daemon = await spawn()
    async with grpc.aio.insecure_channel(daemon.address) as opened:
        yield opened


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "legato.v1.TaskService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_task_service(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="legato.v1.TaskService"),
    ]
    listed, described = [r async for r in reflection.ServerReflectionInfo(iter(requests))]

    names = {service.name for service in listed.list_services_response.service}
    assert {"legato.v1.TaskService", "grpc.health.v1.Health"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in described.file_descriptor_response.file_descriptor_proto
    ]
    tasks_file = next(f for f in files if f.name == "legato/v1/tasks.proto")
    assert [s.name for s in tasks_file.service] == ["TaskService"]


# -- the CLI ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


async def legato(address: str, *args: str, agent: str = "coder") -> Ran:
    """Runs the `legato` command with LEGATO_ADDRESS pointing at `address`."""
    env = {**os.environ, "LEGATO_ADDRESS": address, "LEGATO_AGENT": agent}
    process = await asyncio.create_subprocess_exec(
        str(LEGATO),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


async def test_cli_delegates_a_task_end_to_end(spawn: Spawn) -> None:
    address = (await spawn()).address

    created = await legato(
        address, "task", "create", "current RPM for Tier 1?", "-l", "@researcher",
        "--context", '{"tier": 1}',
    )  # fmt: skip
    assert (created.code, created.stderr) == (0, "")
    task_id = created.stdout.strip()
    assert task_id.startswith("t_") and "\n" not in task_id

    listed = await legato(address, "task", "list")
    assert listed.code == 0
    [line] = listed.stdout.splitlines()
    assert line.split()[:3] == [task_id, "pending", "@researcher"]

    claimed = await legato(address, "task", "claim", "-l", "@researcher", "--json",
                           agent="researcher")  # fmt: skip
    assert claimed.code == 0, claimed.stderr
    claim = json.loads(claimed.stdout)
    assert claim["task"]["id"] == task_id and claim["task"]["status"] == "claimed"
    assert claim["task"]["claimed_by"] == "researcher"
    assert claim["task"]["context"] == {"tier": 1}

    completed = await legato(
        address, "task", "complete", task_id, "--token", claim["lease_token"],
        "--result", '{"rpm": 500, "source": "docs"}', agent="researcher",
    )  # fmt: skip
    assert completed.code == 0, completed.stderr
    assert "done" in completed.stdout

    got = await legato(address, "task", "get", task_id, "--json")
    assert got.code == 0, got.stderr
    task = json.loads(got.stdout)
    assert (task["status"], task["result"]) == ("done", {"rpm": 500, "source": "docs"})
    assert (task["created_by"], task["claimed_by"]) == ("coder", "researcher")


async def test_cli_unknown_task_is_one_line_on_stderr_and_exit_1(spawn: Spawn) -> None:
    address = (await spawn()).address

    ran = await legato(address, "task", "get", "t_unknown")

    assert ran.code == 1 and ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1
    assert "t_unknown" in ran.stderr and "not found" in ran.stderr


async def test_cli_without_a_daemon_says_how_to_start_one(short_tmp: Path) -> None:
    ran = await legato(f"unix:{short_tmp}/missing.sock", "task", "list")

    assert ran.code == 1 and ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1
    assert "legato serve" in ran.stderr
