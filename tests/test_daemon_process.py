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
ADMIN_KEY = "admin.key"
# A well-formed key no agent has.
UNKNOWN_KEY = "lgt_0123456789ab_" + "A" * 43


@dataclass
class DaemonProcess:
    """One `python -m legato.server` process on a data dir and a unix socket."""

    data_dir: Path
    socket: Path
    grace: float
    process: asyncio.subprocess.Process
    stderr: Path
    stdout_lines: list[str] = field(default_factory=list)
    # The key the daemon bootstrapped for `admin` into the data dir, read once it serves.
    admin_key: str = ""

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
    """`await spawn()` starts a daemon on `short_tmp` and returns once it serves,
    with the admin key it wrote to its data dir.

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
        daemon.admin_key = (data_dir / ADMIN_KEY).read_text().strip()
        return daemon

    yield start
    for daemon in started:
        if daemon.process.returncode is None:
            daemon.process.kill()
            await daemon.process.wait()


async def new_agent(daemon: DaemonProcess, name: str, labels: list[str]) -> str:
    """Creates agent `name` with the daemon's admin key; returns the agent's key."""
    async with AsyncClient(daemon.address, api_key=daemon.admin_key, timeout=10) as admin:
        _, key = await admin.create_agent(name, labels=labels)
    return key


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
    # The agent and its key are stored like the tasks: they too must survive the kills.
    key = await new_agent(daemon, "producer", ["@durable"])
    for number in range(3):
        round_ = Round(number)
        async with AsyncClient(daemon.address, api_key=key, timeout=10) as client:
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
        async with AsyncClient(daemon.address, api_key=key, timeout=10) as client:
            assert (await client.whoami()).name == "producer"
            for content, task_id in acknowledged.items():
                assert (await client.get_task(task_id)).content == content
            tasks = await list_all(client)
            assert len(tasks) >= len(acknowledged)
            assert [c for c, n in Counter(t.content for t in tasks).items() if n > 1] == []

            # Retrying every create of the round, answered or not, makes no second task.
            for content in sorted(round_.attempted):
                handle = await client.create_task(
                    content, labels=["@durable"], idempotency_key=content
                )
                assert handle.id == acknowledged.get(content, handle.id)
            assert len(await list_all(client)) == len(attempted)


# -- SIGTERM ----------------------------------------------------------------------------


async def test_sigterm_ends_watch_streams_and_exits_within_the_grace(spawn: Spawn) -> None:
    daemon = await spawn(grace=2.0)
    key = await new_agent(daemon, "coder", ["@coder"])
    async with AsyncClient(daemon.address, api_key=key) as client:
        ids = [(await client.create_task(f"task {i}", labels=["@watched"])).id for i in range(3)]

    async with grpc.aio.insecure_channel(daemon.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        watch = stub.WatchTasks(
            tasks_pb2.WatchTasksRequest(labels=["@watched"], after_seq=0),
            metadata=(("authorization", f"Bearer {key}"),),
        )
        backlog = [await watch.read() for _ in ids]  # the stream is open and caught up
        assert [e.task.id if isinstance(e, tasks_pb2.TaskEvent) else e for e in backlog] == ids

        stopping = time.monotonic()
        daemon.signal(signal.SIGTERM)
        # The daemon ends watch streams itself; left to `server.stop(grace)` they
        # would be held open for the whole grace period.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(watch.read(), daemon.grace)
        # UNAVAILABLE is what clients resume on. The daemon's own status says how;
        # when the process exits before a loaded client has read that status, the
        # client's transport reports the cut instead, with the same code.
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        details = ended.value.details() or ""
        assert "after_seq" in details or details.startswith("Stream removed"), details

    assert await daemon.exited(daemon.grace + 1) == 0, daemon.log()
    assert time.monotonic() - stopping <= daemon.grace + 1
    assert daemon.stdout_lines[-1] == "legato stopped"

    restarted = await spawn()
    assert restarted.admin_key == daemon.admin_key  # the same admin across restarts
    async with AsyncClient(restarted.address, api_key=key) as client:
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
    async with AsyncClient(first.address, api_key=first.admin_key, timeout=5) as client:
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
    async with AsyncClient(daemon.address, api_key=daemon.admin_key) as client:
        await client.create_task("something private", labels=["@x"])  # the WAL now exists

    assert mode(daemon.data_dir) == 0o700
    assert mode(daemon.socket.parent) == 0o700
    for name in ("legato.db", "legato.db-wal", "legato.db-shm", "legato.lock", ADMIN_KEY):
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
    """Health needs no key; the task service on the same channel does."""
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "legato.v1.TaskService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as keyless:
        await tasks_pb2_grpc.TaskServiceStub(channel).ListTasks(
            tasks_pb2.ListTasksRequest(), timeout=5
        )
    assert keyless.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_reflection_lists_and_describes_the_task_service(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="legato.v1.TaskService"),
    ]
    listed, described = [r async for r in reflection.ServerReflectionInfo(iter(requests))]

    names = {service.name for service in listed.list_services_response.service}
    assert {"legato.v1.TaskService", "legato.v1.AgentService", "grpc.health.v1.Health"} <= names
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


async def legato(address: str, data_dir: Path, *args: str, key: str | None = None) -> Ran:
    """Runs the `legato` command with LEGATO_ADDRESS pointing at `address` and
    LEGATO_DATA_DIR at `data_dir`: as the agent of `key` (LEGATO_AGENT_KEY),
    else as the admin whose key the daemon wrote into `data_dir`."""
    env = {k: v for k, v in os.environ.items() if k not in ("LEGATO_AGENT_KEY", "LEGATO_DATA_DIR")}
    env.update(LEGATO_ADDRESS=address, LEGATO_DATA_DIR=str(data_dir))
    if key is not None:
        env["LEGATO_AGENT_KEY"] = key
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
    daemon = await spawn()
    address, data = daemon.address, daemon.data_dir

    # The admin (its key read from the data dir) creates both agents.
    added = await legato(address, data, "agent", "add", "coder", "-l", "@coder")
    assert added.code == 0, added.stderr
    [export] = [line for line in added.stdout.splitlines() if "export LEGATO_AGENT_KEY=" in line]
    coder = export.split("export LEGATO_AGENT_KEY=", 1)[1].strip()
    assert coder.startswith("lgt_")
    added = await legato(address, data, "agent", "add", "researcher", "-l", "@researcher", "--json")
    assert added.code == 0, added.stderr
    new = json.loads(added.stdout)
    researcher = new["api_key"]
    assert (new["agent"]["name"], new["agent"]["labels"]) == ("researcher", ["@researcher"])
    assert researcher.startswith("lgt_") and researcher != coder

    created = await legato(
        address, data, "task", "create", "current RPM for Tier 1?", "-l", "@researcher",
        "--context", '{"tier": 1}', key=coder,
    )  # fmt: skip
    assert (created.code, created.stderr) == (0, "")  # no warning: researcher holds the label
    task_id = created.stdout.strip()
    assert task_id.startswith("t_") and "\n" not in task_id

    listed = await legato(address, data, "task", "list", key=coder)
    assert listed.code == 0
    header, line = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "AGE", "CREATOR", "LABELS", "CONTENT"]
    assert line.split()[:2] == [task_id, "pending"]
    assert line.split()[3:5] == ["coder", "@researcher"]

    claimed = await legato(address, data, "task", "claim", "-l", "@researcher", "--json",
                           key=researcher)  # fmt: skip
    assert claimed.code == 0, claimed.stderr
    claim = json.loads(claimed.stdout)
    assert claim["task"]["id"] == task_id and claim["task"]["status"] == "claimed"
    assert claim["task"]["claimed_by"] == "researcher"
    assert claim["task"]["context"] == {"tier": 1}

    completed = await legato(
        address, data, "task", "complete", task_id, "--token", claim["lease_token"],
        "--result", '{"rpm": 500, "source": "docs"}', key=researcher,
    )  # fmt: skip
    assert completed.code == 0, completed.stderr
    assert "done" in completed.stdout

    got = await legato(address, data, "task", "get", task_id, "--json", key=coder)
    assert got.code == 0, got.stderr
    task = json.loads(got.stdout)
    assert (task["status"], task["result"]) == ("done", {"rpm": 500, "source": "docs"})
    assert (task["created_by"], task["claimed_by"]) == ("coder", "researcher")


async def test_cli_unknown_task_is_one_line_on_stderr_and_exit_1(spawn: Spawn) -> None:
    daemon = await spawn()

    ran = await legato(daemon.address, daemon.data_dir, "task", "get", "t_unknown")  # as admin

    assert ran.code == 1 and ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1
    assert "t_unknown" in ran.stderr and "not found" in ran.stderr


async def test_cli_without_a_daemon_says_how_to_start_one(short_tmp: Path) -> None:
    ran = await legato(
        f"unix:{short_tmp}/missing.sock", short_tmp / "no-data", "task", "list", key=UNKNOWN_KEY
    )

    assert ran.code == 1 and ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1
    assert "legato serve" in ran.stderr


async def test_cli_without_a_key_says_where_to_get_one(spawn: Spawn, short_tmp: Path) -> None:
    daemon = await spawn()
    # Neither LEGATO_AGENT_KEY nor an admin.key in the data dir the CLI looks at.
    ran = await legato(daemon.address, short_tmp / "no-data", "task", "list")

    assert ran.code == 1 and ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1
    assert "LEGATO_AGENT_KEY" in ran.stderr and "legato agent add" in ran.stderr
