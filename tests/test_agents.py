"""Agents: keys, label routing, per-agent views, custody, and the admin bootstrap."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import Connect
from legato.client import AsyncClient, EventType, Role
from legato.client.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from legato.server.daemon import Config, Daemon


async def test_coder_delegates_to_researcher_with_real_keys(
    coder: AsyncClient, researcher: AsyncClient, admin: AsyncClient
) -> None:
    someone_elses = await admin.create_task("admin's own question", labels=["@researcher"])
    cursor = (await coder.list_tasks(page_size=1)).cursor
    events = coder.watch(labels=["@researcher"], after_seq=cursor)

    handle = await coder.create_task("current RPM for Tier 1?", labels=["@researcher"])
    assert (await anext(events)).task.id == handle.id

    researcher_sees = [t.id for t in (await researcher.list_tasks(labels=["@researcher"])).tasks]
    assert researcher_sees == [someone_elses.id, handle.id]
    coder_sees = [t.id for t in (await coder.list_tasks(labels=["@researcher"])).tasks]
    assert coder_sees == [handle.id]

    job = await researcher.claim(task_id=handle.id)
    assert job is not None
    assert job.task.claimed_by == "researcher"
    await job.complete({"rpm": 500, "source": "https://docs.example/limits"})

    claimed, completed = await anext(events), await anext(events)
    assert [claimed.type, completed.type] == [EventType.CLAIMED, EventType.COMPLETED]
    assert completed.task.result == {"rpm": 500, "source": "https://docs.example/limits"}
    assert all(e.task.id == handle.id for e in (claimed, completed))
    await events.aclose()


async def test_history_records_who_did_what(coder: AsyncClient, researcher: AsyncClient) -> None:
    handle = await coder.create_task("find the changelog", labels=["@researcher"])
    job = await researcher.claim()
    assert job is not None
    await job.complete({"url": "https://example.org/changes"})
    history = await coder.task_history(handle.id)
    assert [(e.type, e.actor) for e in history] == [
        (EventType.CREATED, "coder"),
        (EventType.CLAIMED, "researcher"),
        (EventType.COMPLETED, "researcher"),
    ]
    assert [e.seq for e in history] == sorted(e.seq for e in history)


async def test_revoking_an_agent_ends_its_open_watch_and_its_key(
    admin: AsyncClient, researcher: AsyncClient
) -> None:
    cursor = (await researcher.list_tasks(page_size=1)).cursor
    events = researcher.watch(labels=["@researcher"], after_seq=cursor)
    await admin.create_task("one", labels=["@researcher"])
    await anext(events)  # the stream is live
    nxt = asyncio.ensure_future(anext(events))
    await admin.revoke_agent("researcher")
    with pytest.raises(UnauthenticatedError):
        await asyncio.wait_for(nxt, 5)
    with pytest.raises(UnauthenticatedError):
        await researcher.list_tasks()


async def test_rotating_a_key_stops_the_old_one_at_once(
    admin: AsyncClient, daemon: Daemon, agent_key: object
) -> None:
    _, old = await admin.create_agent("worker", labels=["@work"])
    _, new = await admin.rotate_key("worker")
    assert new != old
    async with (
        AsyncClient(daemon.config.address, api_key=old) as stale,
        AsyncClient(daemon.config.address, api_key=new) as fresh,
    ):
        with pytest.raises(UnauthenticatedError):
            await stale.whoami()
        assert (await fresh.whoami()).name == "worker"
        # An agent may rotate its own key, and then only the newest works.
        _, newest = await fresh.rotate_key()
        with pytest.raises(UnauthenticatedError):
            await fresh.whoami()
    async with AsyncClient(daemon.config.address, api_key=newest) as newest_client:
        assert (await newest_client.whoami()).labels == ("@work",)


async def test_label_changes_take_effect_for_claims_and_views(
    admin: AsyncClient, connect: Connect
) -> None:
    helper = await connect("helper", [])
    task = await admin.create_task("review this diff", labels=["@reviewer"])
    with pytest.raises(PermissionDeniedError, match="holds no labels"):
        await helper.claim()
    assert (await helper.list_tasks()).tasks == []

    await admin.update_agent("helper", labels=["@reviewer"])
    assert [t.id for t in (await helper.list_tasks()).tasks] == [task.id]
    job = await helper.claim()
    assert job is not None
    assert job.id == task.id

    await admin.update_agent("helper", role=Role.ADMIN)
    assert (await helper.whoami()).role is Role.ADMIN


async def test_agent_cannot_claim_labels_it_does_not_hold(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    await researcher.create_task("write the tests", labels=["@coder"])
    with pytest.raises(PermissionDeniedError, match="does not hold @coder"):
        await researcher.claim(["@coder"])
    job = await coder.claim(["@coder"])
    assert job is not None


async def test_task_for_a_label_nobody_holds_warns_the_creator(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    typo = await coder.create_task("limits?", labels=["@reseacher"])
    assert typo.task is not None
    assert len(typo.task.warnings) == 1
    assert "@reseacher" in typo.task.warnings[0]
    right = await coder.create_task("limits?", labels=["@researcher"])
    assert right.task is not None
    assert right.task.warnings == ()


async def test_runaway_agent_hits_its_open_task_cap(config: Config) -> None:
    config = replace(config, max_open_tasks=3)
    async with Daemon(config) as daemon:
        admin_key = daemon.admin_key_path.read_text().strip()
        async with AsyncClient(config.address, api_key=admin_key) as admin:
            _, key = await admin.create_agent("loop", labels=["@loop"])
            async with AsyncClient(config.address, api_key=key) as loop:
                handles = [await loop.create_task(f"t{i}", labels=["@loop"]) for i in range(3)]
                with pytest.raises(ResourceExhaustedError, match="3 open"):
                    await loop.create_task("one too many", labels=["@loop"])
                before = (await admin.list_tasks()).cursor
                assert len((await admin.list_tasks()).tasks) == 3
                await handles[0].cancel()
                await loop.create_task("room again", labels=["@loop"])
                assert (await admin.list_tasks()).cursor == before + 2


@pytest.mark.sqlite_only(
    "on a shared database the admin key is never reissued (other daemons' users hold it); "
    "test_multi_daemon shows a joining daemon leaves it alone"
)
async def test_admin_key_is_bootstrapped_private_and_reissued_if_deleted(
    config: Config,
) -> None:
    async with Daemon(config) as daemon:
        path = daemon.admin_key_path
        first = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert first.startswith("lgt_")
    async with Daemon(config) as daemon:
        assert path.read_text().strip() == first  # the same key across restarts
        async with AsyncClient(config.address, api_key=first) as admin:
            assert (await admin.whoami()).role is Role.ADMIN
    path.unlink()
    async with Daemon(config) as daemon:
        second = daemon.admin_key_path.read_text().strip()
        assert second != first
        async with AsyncClient(config.address, api_key=first) as old:
            with pytest.raises(UnauthenticatedError):
                await old.whoami()
        async with AsyncClient(config.address, api_key=second) as admin:
            assert (await admin.whoami()).name == "admin"


def test_no_key_material_in_logs_or_database(short_tmp: Path) -> None:
    """Drive the CLI against a debug-logging daemon, then grep every file for the keys."""
    data, sock = short_tmp / "data", f"unix:{short_tmp}/s.sock"
    log = short_tmp / "daemon.log"
    env = {**os.environ, "LEGATO_ADDRESS": sock, "LEGATO_DATA_DIR": str(data)}
    env.pop("LEGATO_AGENT_KEY", None)
    cli = [sys.executable, "-m", "legato.client.cli"]
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [*cli, "serve", "--listen", sock, "--data-dir", str(data), "--log-level", "debug"],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            assert "legato serving on" in server.stdout.readline()

            def run(*args: str, key: str | None = None) -> str:
                run_env = env if key is None else {**env, "LEGATO_AGENT_KEY": key}
                done = subprocess.run(
                    [*cli, *args], env=run_env, capture_output=True, text=True, timeout=30
                )
                assert done.returncode == 0, done.stderr
                return done.stdout

            def key_of(output: str) -> str:
                return output.split("LEGATO_AGENT_KEY=")[1].split()[0]

            keys = [key_of(run("agent", "add", "coder", "-l", "@coder"))]
            keys.append(key_of(run("agent", "add", "researcher", "-l", "@researcher")))
            keys.append(key_of(run("agent", "rotate", "coder")))
            run("task", "create", "a question", "-l", "@researcher", key=keys[2])
            run("task", "claim", key=keys[1])
        finally:
            server.terminate()
            server.wait(timeout=10)
    admin_key = (data / "admin.key").read_text().strip()
    secrets = [*keys, admin_key]
    # admin.key and keys/NAME.key hold keys on purpose (0600, for the CLI and the
    # MCP bridge); the daemon's log and database never do.
    files = [log, *(p for p in data.iterdir() if p.is_file() and p.name != "admin.key")]
    kept = {p.name: p.read_text().strip() for p in (data / "keys").iterdir()}
    assert kept == {"coder.key": keys[2], "researcher.key": keys[1]}
    assert any(p.name == "legato.db" for p in files)
    for path in files:
        content = path.read_bytes()
        for key in secrets:
            secret_part = key.split("_", 2)[2]  # lgt_<key id>_<secret>; the secret may hold "_"
            assert len(secret_part) == 43
            assert secret_part.encode() not in content, f"key material in {path.name}"


async def test_an_admin_cannot_lock_everyone_out(admin: AsyncClient) -> None:
    with pytest.raises(InvalidArgumentError, match="own admin role"):
        await admin.update_agent("admin", role=Role.AGENT)
    with pytest.raises(InvalidArgumentError, match="cannot revoke itself"):
        await admin.revoke_agent("admin")
    assert (await admin.whoami()).role is Role.ADMIN
