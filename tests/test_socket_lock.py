"""One daemon per socket: a second `legato serve` never takes over the socket (or
the TCP port) another live daemon serves, whatever its data dir, and a socket
left behind by `kill -9` is taken over as before."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from legato.client import AsyncClient

LEGATO = Path(sys.executable).with_name("legato")
START_TIMEOUT = 15.0


@dataclass
class Serving:
    """A `legato serve` process that printed its ready line."""

    process: asyncio.subprocess.Process
    data_dir: Path
    ready_line: str

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()


@dataclass(frozen=True)
class Refused:
    code: int
    stderr: str


@dataclass
class Runner:
    """Runs `legato serve` with its own per-user runtime dir, so that the
    default socket is this test's own."""

    tmp: Path
    started: list[asyncio.subprocess.Process]

    @property
    def runtime_dir(self) -> Path:
        return self.tmp / "xdg"

    @property
    def default_socket(self) -> Path:
        return self.runtime_dir / "legato" / "legato.sock"

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LEGATO_ADDRESS", "LEGATO_DATA_DIR", "XDG_RUNTIME_DIR")
        }
        self.runtime_dir.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        return env

    async def _launch(
        self, data_dir: str, args: tuple[str, ...], umask: int = 0o022
    ) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            str(LEGATO),
            "serve",
            "--data-dir",
            str(self.tmp / data_dir),
            "--grace",
            "1",
            *args,
            env=self._env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            umask=umask,
        )
        self.started.append(process)
        return process

    async def serve(self, data_dir: str, *args: str, umask: int = 0o022) -> Serving:
        process = await self._launch(data_dir, args, umask)
        assert process.stdout is not None and process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)).decode()
        if not line.startswith("legato serving on"):
            _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
            raise AssertionError(f"no ready line: {line!r}\n{stderr.decode()}")
        return Serving(process, self.tmp / data_dir, line.strip())

    async def refused(self, data_dir: str, *args: str) -> Refused:
        """Starts a daemon that must refuse to serve; its exit code and stderr."""
        process = await self._launch(data_dir, args)
        assert process.stdout is not None and process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)).decode()
        assert not line.startswith("legato serving on"), f"it started: {line!r}"
        _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
        assert process.returncode is not None
        return Refused(process.returncode, stderr.decode())


@pytest.fixture
async def legato_serve(short_tmp: Path) -> AsyncIterator[Runner]:
    runner = Runner(short_tmp, [])
    yield runner
    for process in runner.started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def answers(address: str, admin_key: str) -> bool:
    async with AsyncClient(address, api_key=admin_key, timeout=5) as client:
        handle = await client.create_task("still here?", labels=["@x"])
        return (await client.get_task(handle.id)).content == "still here?"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_second_daemon_with_another_data_dir_is_refused_the_default_socket(
    legato_serve: Runner,
) -> None:
    first = await legato_serve.serve("first", umask=0o000)

    second = await legato_serve.refused("second")

    assert second.code != 0
    assert f"pid {first.process.pid}" in second.stderr
    assert str(first.data_dir) in second.stderr
    assert f"already listening on unix:{legato_serve.default_socket}" in second.stderr
    assert "--listen unix:" in second.stderr  # how to choose another socket
    assert first.process.returncode is None
    assert await answers(f"unix:{legato_serve.default_socket}", first.admin_key)

    # Private even though the first daemon ran under a umask of 000.
    lock = legato_serve.default_socket.with_name("legato.sock.lock")
    assert mode(lock) == 0o600
    assert mode(lock.parent) == 0o700
    assert mode(first.data_dir / "legato.lock") == 0o600


async def test_the_data_dir_refusal_gives_advice_that_works(legato_serve: Runner) -> None:
    first = await legato_serve.serve("first")

    second = await legato_serve.refused("first")

    assert second.code != 0
    assert "already serving" in second.stderr
    assert f"pid {first.process.pid}" in second.stderr
    assert f"unix:{legato_serve.default_socket}" in second.stderr
    # Another data dir alone would meet the first daemon on the default socket.
    assert "--data-dir DIR --listen unix:PATH" in second.stderr
    other = await legato_serve.serve("other", "--listen", f"unix:{legato_serve.tmp}/other.sock")
    assert await answers(f"unix:{legato_serve.tmp}/other.sock", other.admin_key)
    assert await answers(f"unix:{legato_serve.default_socket}", first.admin_key)


async def test_after_kill_9_the_next_daemon_takes_over_the_stale_socket(
    legato_serve: Runner,
) -> None:
    first = await legato_serve.serve("first")
    first.process.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(first.process.wait(), START_TIMEOUT) == -signal.SIGKILL
    assert stat.S_ISSOCK(legato_serve.default_socket.stat().st_mode)  # left behind

    after = await legato_serve.serve("second")

    assert await answers(f"unix:{legato_serve.default_socket}", after.admin_key)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_second_daemon_is_refused_a_tcp_port_another_serves(
    legato_serve: Runner,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    first = await legato_serve.serve("first", "--listen", address)

    second = await legato_serve.refused("second", "--listen", address)

    assert second.code != 0
    assert f"cannot listen on {address}" in second.stderr
    assert await answers(address, first.admin_key)
