"""Listening beyond loopback without TLS: `legato serve` says what that exposes."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from legato.client import AsyncClient
from legato.server.daemon import listen_warning

LEGATO = Path(sys.executable).with_name("legato")
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Started:
    address: str  # from the ready line: the port the daemon was given for port 0
    stderr_before_ready: str
    data_dir: Path


ServeOn = Callable[[str], Awaitable[Started]]


@pytest.fixture
async def serve_on(short_tmp: Path) -> AsyncIterator[ServeOn]:
    """`await serve_on("HOST:0")` starts `legato serve --listen HOST:0` and returns
    once it serves, with what it wrote to stderr before its ready line."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(listen: str) -> Started:
        data_dir = short_tmp / f"data-{len(processes)}"
        stderr_path = short_tmp / f"stderr-{len(processes)}.log"
        env = {k: v for k, v in os.environ.items() if k != "LEGATO_DATA_DIR"}
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                str(LEGATO), "serve", "--data-dir", str(data_dir), "--listen", listen,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            )  # fmt: skip
        processes.append(process)
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)).decode()
        # The warning is written before the ready line, so it is in the file by now.
        before_ready = stderr_path.read_text()
        assert line.startswith("legato serving on "), f"{line!r}\n{before_ready}"
        address = line.removeprefix("legato serving on ").split(" ", 1)[0]
        return Started(address, before_ready, data_dir)

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def whoami_as_admin(started: Started) -> str:
    key = (started.data_dir / "admin.key").read_text().strip()
    target = started.address.replace("0.0.0.0", "127.0.0.1", 1)
    async with AsyncClient(target, api_key=key, timeout=10) as client:
        return (await client.whoami()).name


async def test_listening_on_all_interfaces_warns_that_keys_travel_in_clear(
    serve_on: ServeOn,
) -> None:
    started = await serve_on("0.0.0.0:0")

    warning = started.stderr_before_ready
    assert "WARNING" in warning and "0.0.0.0:0" in warning
    assert "TLS" in warning and "in clear" in warning
    assert "loopback" in warning
    assert not started.address.endswith(":0")  # the ready line gives the real port
    assert await whoami_as_admin(started) == "admin"


async def test_listening_on_loopback_gives_no_warning(serve_on: ServeOn) -> None:
    started = await serve_on("127.0.0.1:0")

    assert "WARNING" not in started.stderr_before_ready
    assert started.address.startswith("127.0.0.1:") and not started.address.endswith(":0")
    assert await whoami_as_admin(started) == "admin"


@pytest.mark.parametrize(
    ("address", "warns"),
    [
        ("unix:/run/user/1000/legato/legato.sock", False),
        ("127.0.0.1:7000", False),
        ("127.8.9.10:7000", False),
        ("localhost:7000", False),
        ("LocalHost:7000", False),
        ("[::1]:7000", False),
        ("[::ffff:127.0.0.1]:7000", False),
        ("0.0.0.0:7000", True),
        ("[::]:7000", True),
        (":7000", True),
        ("192.168.1.20:7000", True),
        ("[fe80::1]:7000", True),
        ("devbox.example:7000", True),
    ],
)
def test_which_addresses_warn(address: str, warns: bool) -> None:
    assert (listen_warning(address) is not None) is warns


async def test_an_abstract_unix_socket_is_refused_in_one_line(short_tmp: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        str(LEGATO), "serve", "--data-dir", str(short_tmp / "data"),
        "--listen", "unix-abstract:legato-test",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
    finally:
        if process.returncode is None:  # it served instead of refusing
            process.kill()
            await process.wait()

    assert process.returncode == 1 and stdout == b""
    [line] = stderr.decode().splitlines()
    assert "abstract unix sockets have no permissions" in line and "unix:PATH" in line
