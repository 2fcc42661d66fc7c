"""Fixtures: a real daemon on a temp unix socket with a real database, and
agents with real API keys created through the admin key the daemon bootstraps.

Every test that takes the `config` (or `daemon`) fixture runs twice, once per
backend: `[sqlite]` on a temp SQLite file, `[postgres]` on a real PostgreSQL
server (`LEGATO_TEST_DATABASE_URL`, default postgresql://postgres@127.0.0.1:5432/test),
in a database made for the session (legato_test_<random>, dropped at the end)
and a schema of its own per test: daemons run in the test's process get one
whose tables an earlier test made and emptied (`pg_reused_url`), daemon
processes a new one (`pg_url`). A test that holds for SQLite only says why
with `@pytest.mark.sqlite_only("...")`; the modules of `ONE_BACKEND`, whose
subject is a layer above the storage, run on SQLite only. Without a reachable
server the PostgreSQL half is skipped, saying how to point it at one; with
CI=true it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2
from legato.client import AsyncClient, EventType, TaskEvent
from legato.server.daemon import Config, Daemon
from legato.v1 import tasks_pb2, tasks_pb2_grpc
from psycopg import conninfo

# `await connect("coder")` → a client of a new agent `coder` holding `@coder`;
# `await connect("both", ["@a", "@b"])` chooses the labels.
Connect = Callable[..., Awaitable[AsyncClient]]


def _with_key(details: grpc.aio.ClientCallDetails, key: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", f"Bearer {key}")
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# Two classes, not one: a grpc.aio channel files an interceptor under the first
# kind it is an instance of, so one class of both kinds never sees streams.
class _UnaryKey(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, key: str):
        self._key = key

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_key(details, self._key), request)


class _StreamKey(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, key: str):
        self._key = key

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_key(details, self._key), request)


def keyed_channel(
    address: str, key: str, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A raw grpc.aio channel whose every call carries `key`, for tests that
    need to send what the friendly client would not."""
    return grpc.aio.insecure_channel(
        address, options=options, interceptors=[_UnaryKey(key), _StreamKey(key)]
    )


# The longest a test waits for one event before it fails instead of hanging.
EVENT_GUARD = 10.0


def watch_task(client: AsyncClient, task_id: str) -> AsyncGenerator[TaskEvent, None]:
    """The task's whole history, then its live events."""
    return client.watch(task_ids=[task_id], after_seq=0)


async def next_event(events: AsyncGenerator[TaskEvent, None], wanted: EventType) -> TaskEvent:
    """The next event of type `wanted` on the stream, skipping the others."""

    async def scan() -> TaskEvent:
        async for event in events:
            if event.type is wanted:
                return event
        raise AssertionError(f"the watch ended before a {wanted.name} event")

    return await asyncio.wait_for(scan(), EVENT_GUARD)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: unix socket paths are limited to ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="lg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqlite_only(why): the test is about the SQLite backend itself; it runs on SQLite only",
    )


# Modules whose subject is a layer above the daemon, not its storage: they run
# against one backend. Every daemon behaviour they lean on (claims, watches,
# revocations, leases) has its own scenarios in the modules that run on both.
ONE_BACKEND = {
    "test_mcp": "the MCP bridge translates tool calls into the client's calls",
    "test_sync_client": "the sync client is the async one's other face (test_delegation*)",
    "test_worker_loop": "the client's work loops; the endings they ride out (cancel, deadline, "
    "lease, restart) are test_lifecycle's, test_delegation_flow's and test_trust_identity's",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only")
        one = metafunc.module.__name__.rpartition(".")[2] in ONE_BACKEND
        backends = ("sqlite",) if only is not None or one else BACKENDS
        metafunc.parametrize("backend", backends, scope="function")


def server_url() -> str:
    """The PostgreSQL server the suite uses (any database on it: others are made)."""
    return os.environ.get("LEGATO_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


def with_database(url: str, dbname: str) -> str:
    """`url` with another database name."""
    return make_url({**conninfo.conninfo_to_dict(url), "dbname": dbname})


def make_url(params: dict[str, Any]) -> str:
    """A postgresql:// URL of libpq parameters, as a daemon's --database takes it."""
    from urllib.parse import quote

    user = params.get("user") or ""
    password = f":{quote(str(params['password']), safe='')}" if params.get("password") else ""
    auth = f"{quote(str(user), safe='')}{password}@" if user else ""
    host = params.get("host") or "127.0.0.1"
    port = f":{params['port']}" if params.get("port") else ""
    query = "&".join(
        f"{key}={quote(str(value), safe='')}"
        for key, value in params.items()
        if key not in ("user", "password", "host", "port", "dbname") and value is not None
    )
    return f"postgresql://{auth}{host}{port}/{params['dbname']}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of the session's own on the test server: its URL. Dropped at the end."""
    url = server_url()
    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        why = (
            f"PostgreSQL is not reachable at {url} ({str(exc).strip()}); start one, or point "
            "the suite at one with LEGATO_TEST_DATABASE_URL=postgresql://USER@HOST:PORT/DB "
            "(the user must be allowed to CREATE DATABASE)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    name = f"legato_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield with_database(url, name)
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A schema of the test's own in the session's database: the URL a daemon is given."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    params = conninfo.conninfo_to_dict(pg_database)
    yield make_url({**params, "options": f"-csearch_path={schema}"})
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


# legato's tables, emptied in the order their foreign keys allow; the counter
# back to 0. What a daemon finds then is what it finds in a new schema.
EMPTY_SCHEMA = """
DELETE FROM task_labels;
DELETE FROM events;
DELETE FROM open_counts;
DELETE FROM tasks;
DELETE FROM agents;
UPDATE seq_counter SET last = 0;
"""


@pytest.fixture(scope="session")
def pg_emptied_schemas() -> list[str]:
    """Schemas of the session's database whose tables a daemon made and a test
    emptied since: free for the next test (they go with the database)."""
    return []


@pytest.fixture
def pg_reused_url(pg_database: str, pg_emptied_schemas: list[str]) -> Iterator[str]:
    """Like `pg_url`, for the daemons the test runs in its own process, which have
    all stopped when it ends: a schema whose tables an earlier test's daemon
    made, emptied. Making legato's tables costs a few hundred ms per schema,
    paid once per session instead of once per test; emptying them costs a few ms.
    """
    params = conninfo.conninfo_to_dict(pg_database)
    if pg_emptied_schemas:
        schema = pg_emptied_schemas.pop()
    else:
        schema = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    yield make_url({**params, "options": f"-csearch_path={schema}"})
    with psycopg.connect(pg_database, autocommit=True) as conn:
        if _emptied(conn, schema):
            pg_emptied_schemas.append(schema)
        else:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _emptied(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Empties the schema's tables if a daemon of this legato made them all; whether it did."""
    from legato.server.store.postgres import SCHEMA_VERSION

    made = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
        (f"{schema}.legato_schema", f"{schema}.seq_counter"),
    ).fetchone()
    if made is None or not made[0]:
        return False
    with conn.transaction():
        conn.execute(f"SET LOCAL search_path = {schema}")
        version = conn.execute("SELECT version FROM legato_schema").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            return False
        conn.execute(EMPTY_SCHEMA)
    return True


@pytest.fixture
def database(backend: str, request: pytest.FixtureRequest) -> str:
    """The `--database` of the test's daemons: "" (SQLite) or a PostgreSQL schema
    with nothing in it."""
    if backend == "postgres":
        url: str = request.getfixturevalue("pg_reused_url")
        return url
    return ""


@pytest.fixture
def config(short_tmp: Path, database: str) -> Config:
    return Config(
        data_dir=short_tmp / "data",
        listen=f"unix:{short_tmp}/run/legato.sock",
        grace=2.0,
        database=database,
    )


@pytest.fixture
async def daemon(config: Config) -> AsyncIterator[Daemon]:
    async with Daemon(config) as running:
        yield running


@pytest.fixture
def admin_key(daemon: Daemon) -> str:
    return daemon.admin_key_path.read_text().strip()


@pytest.fixture
async def admin(daemon: Daemon, admin_key: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon.config.address, api_key=admin_key, timeout=10) as client:
        yield client


@pytest.fixture
async def agent_key(admin: AsyncClient) -> Callable[..., Awaitable[str]]:
    """`await agent_key("coder")` creates agent `coder` (labels default `@coder`); its key."""

    async def create(name: str, labels: Sequence[str] | None = None) -> str:
        _, key = await admin.create_agent(name, labels=[f"@{name}"] if labels is None else labels)
        return key

    return create


@pytest.fixture
async def connect(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]]
) -> AsyncIterator[Connect]:
    clients: list[AsyncClient] = []

    async def open_client(name: str, labels: Sequence[str] | None = None) -> AsyncClient:
        key = await agent_key(name, labels)
        client = AsyncClient(daemon.config.address, api_key=key, timeout=10)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.aclose()


@pytest.fixture
async def coder(connect: Connect) -> AsyncClient:
    return await connect("coder")


@pytest.fixture
async def researcher(connect: Connect) -> AsyncClient:
    return await connect("researcher")


if TYPE_CHECKING:
    from legato.v1.tasks_pb2_grpc import TaskServiceAsyncStub


@pytest.fixture
async def raw_pair(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]]
) -> AsyncIterator[tuple[TaskServiceAsyncStub, TaskServiceAsyncStub]]:
    """Raw stubs of a creator `coder` (@coder) and a worker `researcher` (@researcher),
    for tests where the bytes and codes on the wire are the subject."""
    coder_key = await agent_key("coder")
    researcher_key = await agent_key("researcher", ["@researcher"])
    async with (
        keyed_channel(daemon.config.address, coder_key) as coder_channel,
        keyed_channel(daemon.config.address, researcher_key) as researcher_channel,
    ):
        yield (
            tasks_pb2_grpc.TaskServiceStub(coder_channel),
            tasks_pb2_grpc.TaskServiceStub(researcher_channel),
        )


async def claim_raw(
    stub: TaskServiceAsyncStub, label: str = "@researcher", lease: int = 60
) -> tasks_pb2.ClaimTaskResponse:
    """A claim through a raw stub that must find a task."""
    response = await stub.ClaimTask(
        tasks_pb2.ClaimTaskRequest(labels=[label], lease=duration_pb2.Duration(seconds=lease))
    )
    assert response.HasField("task"), "nothing to claim"
    return response
