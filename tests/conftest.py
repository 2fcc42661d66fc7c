"""Fixtures: a real daemon on a temp unix socket with a real SQLite file."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from legato.client import AsyncClient
from legato.server.daemon import Config, Daemon


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: unix socket paths are limited to ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="lg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def config(short_tmp: Path) -> Config:
    return Config(
        data_dir=short_tmp / "data", listen=f"unix:{short_tmp}/run/legato.sock", grace=2.0
    )


@pytest.fixture
async def daemon(config: Config) -> AsyncIterator[Daemon]:
    async with Daemon(config) as running:
        yield running


@pytest.fixture
async def connect(daemon: Daemon) -> AsyncIterator[Callable[[str], AsyncClient]]:
    """`connect(agent)` opens a client of the test daemon, closed after the test."""
    clients: list[AsyncClient] = []

    def open_client(agent: str = "") -> AsyncClient:
        client = AsyncClient(daemon.config.address, agent=agent, timeout=10)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.aclose()


@pytest.fixture
def coder(connect: Callable[[str], AsyncClient]) -> AsyncClient:
    return connect("coder")


@pytest.fixture
def researcher(connect: Callable[[str], AsyncClient]) -> AsyncClient:
    return connect("researcher")
