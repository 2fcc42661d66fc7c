"""`AsyncWorker` / `Worker`: handlers run apart from the client, several at once,
and a graceful stop hands back what is unfinished.

Every scenario runs against a real daemon; the tests wait for the handlers'
own signals and the daemon's events, never on a clock of their own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from legato.client import (
    AsyncClient,
    AsyncJob,
    AsyncWorker,
    Client,
    EventType,
    Job,
    TaskStatus,
    Worker,
)
from legato.server.daemon import Daemon

GUARD = 10.0
AgentKey = Callable[..., Awaitable[str]]


async def released(client: AsyncClient, task_id: str) -> None:
    """Waits until the task was handed back (a RELEASED event), failing after GUARD."""

    async def wait() -> None:
        async for event in client.watch(task_ids=[task_id], after_seq=0):
            if event.type is EventType.RELEASED:
                return

    await asyncio.wait_for(wait(), GUARD)


async def test_a_worker_runs_up_to_max_concurrent_handlers_at_once(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    running: set[str] = set()
    all_three = asyncio.Event()

    async def handle(job: AsyncJob) -> dict[str, Any]:
        running.add(job.id)
        if len(running) == 3:
            all_three.set()
        await asyncio.wait_for(all_three.wait(), GUARD)  # none finishes before all run
        return {"answered": job.task.content}

    worker = AsyncWorker(researcher, handler=handle, labels=["@researcher"], max_concurrent=3)
    run = asyncio.create_task(worker.run())
    handles = [await coder.delegate("@researcher", f"question {n}") for n in range(3)]
    results = [await handle.result(timeout=GUARD) for handle in handles]
    assert [task.result for task in results] == [{"answered": f"question {n}"} for n in range(3)]
    await worker.shutdown()
    await asyncio.wait_for(run, GUARD)


async def test_shutdown_interrupts_running_handlers_and_hands_their_tasks_back(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    started: list[str] = []
    both_started = asyncio.Event()
    cancelled: list[str] = []

    async def hold(job: AsyncJob) -> dict[str, Any]:
        started.append(job.id)
        if len(started) == 2:
            both_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(job.id)
            raise
        return {}

    worker = AsyncWorker(researcher, handler=hold, labels=["@researcher"], max_concurrent=2)
    run = asyncio.create_task(worker.run())
    handles = [await coder.delegate("@researcher", f"long job {n}") for n in range(2)]
    await asyncio.wait_for(both_started.wait(), GUARD)

    await asyncio.wait_for(worker.shutdown(), GUARD)
    assert run.done() and run.exception() is None, "run() did not return after the stop"
    assert sorted(cancelled) == sorted(h.id for h in handles)
    for handle in handles:
        task = await handle.get()
        assert task.status is TaskStatus.PENDING
        assert task.released == 1, "the stop did not hand the task back"
        await released(coder, handle.id)


async def test_a_grace_lets_running_handlers_finish_before_the_stop(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    started, may_finish = asyncio.Event(), asyncio.Event()

    async def slow(job: AsyncJob) -> dict[str, Any]:
        started.set()
        await may_finish.wait()
        return {"finished": True}

    worker = AsyncWorker(researcher, handler=slow, labels=["@researcher"])
    run = asyncio.create_task(worker.run())
    handle = await coder.delegate("@researcher", "almost done")
    await asyncio.wait_for(started.wait(), GUARD)
    worker.stop(grace=GUARD)
    may_finish.set()
    await asyncio.wait_for(run, GUARD)
    assert (await handle.result(timeout=GUARD)).result == {"finished": True}


async def test_stopping_an_idle_worker_ends_its_long_poll_at_once(researcher: AsyncClient) -> None:
    async def never(job: AsyncJob) -> dict[str, Any]:
        raise AssertionError("there was nothing to claim")

    # A 30 s long-poll: the stop must not wait for it to come back empty.
    worker = AsyncWorker(researcher, handler=never, labels=["@researcher"], wait=30)
    run = asyncio.create_task(worker.run())

    async def claim_sent() -> None:
        while worker._claim_call is None:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(claim_sent(), GUARD)
    worker.stop()
    await asyncio.wait_for(run, 3.0)


async def test_a_blocking_worker_stopped_from_another_thread_hands_back_its_jobs(
    daemon: Daemon, agent_key: AgentKey, coder: AsyncClient
) -> None:
    key = await agent_key("researcher")
    started = threading.Barrier(3)
    interrupted: list[str] = []

    def hold(job: Job) -> dict[str, Any]:
        started.wait(GUARD)
        assert job.wait_interrupted(GUARD), "the job was not interrupted by the stop"
        interrupted.append(job.interruption or "")
        return {}

    with Client(daemon.config.address, api_key=key, timeout=10) as researcher:
        worker = Worker(researcher, handler=hold, labels=["@researcher"], max_concurrent=2)
        run = asyncio.create_task(asyncio.to_thread(worker.run))
        handles = [await coder.delegate("@researcher", f"long job {n}") for n in range(2)]
        await asyncio.to_thread(started.wait, GUARD)
        await asyncio.wait_for(asyncio.to_thread(worker.shutdown), GUARD)
        await asyncio.wait_for(run, GUARD)
    assert interrupted == ["the worker is stopping"] * 2
    for handle in handles:
        assert (await handle.get()).status is TaskStatus.PENDING
        await released(coder, handle.id)


async def test_a_handler_delegates_a_child_task_of_its_job(
    coder: AsyncClient, connect: Callable[..., Awaitable[AsyncClient]]
) -> None:
    researcher = await connect("researcher")
    specialist = await connect("specialist")

    async def research(job: AsyncJob) -> dict[str, Any]:
        child = await job.delegate("@specialist", f"look up: {job.task.content}")
        return {"found": (await child.result(timeout=GUARD)).result}

    async def look_up(job: AsyncJob) -> dict[str, Any]:
        return {"parent": job.task.parent_id}

    workers = [
        AsyncWorker(researcher, handler=research, labels=["@researcher"]),
        AsyncWorker(specialist, handler=look_up, labels=["@specialist"]),
    ]
    runs = [asyncio.create_task(worker.run()) for worker in workers]
    handle = await coder.delegate("@researcher", "RPM")
    task = await handle.result(timeout=GUARD)
    assert task.result == {"found": {"parent": handle.id}}
    tree = await researcher.get_task_tree(handle.id)
    assert [t.parent_id for t in tree] == ["", handle.id]
    for worker in workers:
        await worker.shutdown()
    await asyncio.gather(*runs)


async def test_max_concurrent_must_be_positive(researcher: AsyncClient) -> None:
    async def handle(job: AsyncJob) -> None:
        return None

    with pytest.raises(ValueError, match="max_concurrent"):
        AsyncWorker(researcher, handler=handle, max_concurrent=0)


# -- run_worker under SIGTERM -------------------------------------------------------------

ASYNC_PROGRAM = """
import asyncio
from legato.client import AsyncClient

async def hold(job):
    print("holding", job.id, flush=True)
    await asyncio.Event().wait()

async def main():
    async with AsyncClient() as client:
        # Two workers in one program: the signal stops both.
        await asyncio.gather(
            client.run_worker(hold, ["@researcher"]), client.run_worker(hold, ["@researcher"])
        )
    print("stopped", flush=True)

asyncio.run(main())
"""

SYNC_PROGRAM = """
from legato.client import Client

def hold(job):
    print("holding", job.id, flush=True)
    job.wait_interrupted()
    return {}

with Client() as client:
    client.run_worker(hold, ["@researcher"])
print("stopped", flush=True)
"""


@pytest.mark.parametrize("program", [ASYNC_PROGRAM, SYNC_PROGRAM], ids=["asyncio", "blocking"])
async def test_sigterm_stops_run_worker_gracefully_and_hands_the_job_back(
    daemon: Daemon, agent_key: AgentKey, coder: AsyncClient, short_tmp: Path, program: str
) -> None:
    key = await agent_key("researcher")
    script = short_tmp / "worker.py"
    script.write_text(textwrap.dedent(program))
    env = {**os.environ, "LEGATO_ADDRESS": daemon.config.address, "LEGATO_AGENT_KEY": key}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        handle = await coder.delegate("@researcher", "long job")
        line = await asyncio.wait_for(process.stdout.readline(), GUARD)
        assert line.decode().split() == ["holding", handle.id]
        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), GUARD)
        rest = (await process.stdout.read()).decode()
        stderr = (await process.stderr.read()).decode()
        assert (status, rest, stderr) == (0, "stopped\n", "")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert (await handle.get()).status is TaskStatus.PENDING
    await released(coder, handle.id)


FIRST_ENDS_PROGRAM = """
import asyncio, sys
from legato.client import AsyncClient

async def hold(job):
    print("holding", job.id, flush=True)
    await asyncio.Event().wait()

async def main():
    async with AsyncClient() as client:
        first = asyncio.create_task(client.run_worker(hold, ["@first"]))
        second = asyncio.create_task(client.run_worker(hold, ["@researcher"]))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        print("first ended", flush=True)
        await second
    print("stopped", flush=True)

asyncio.run(main())
"""


async def test_sigterm_still_stops_the_workers_left_after_the_first_one_ended(
    daemon: Daemon, agent_key: AgentKey, coder: AsyncClient, short_tmp: Path
) -> None:
    key = await agent_key("researcher", ["@researcher", "@first"])
    script = short_tmp / "worker.py"
    script.write_text(textwrap.dedent(FIRST_ENDS_PROGRAM))
    env = {**os.environ, "LEGATO_ADDRESS": daemon.config.address, "LEGATO_AGENT_KEY": key}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdin and process.stdout and process.stderr
    try:
        # Each worker holds a job, so both are running (and registered) by now.
        held = []
        for label in ("@first", "@researcher"):
            handle = await coder.delegate(label, "long job")
            line = await asyncio.wait_for(process.stdout.readline(), GUARD)
            assert line.decode().split() == ["holding", handle.id]
            held.append(handle)
        process.stdin.write(b"end the first\n")
        await process.stdin.drain()
        line = await asyncio.wait_for(process.stdout.readline(), GUARD)
        assert line.decode() == "first ended\n"

        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), GUARD)
        rest = (await process.stdout.read()).decode()
        stderr = (await process.stderr.read()).decode()
        assert (status, rest, stderr) == (0, "stopped\n", "")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    for handle in held:
        await released(coder, handle.id)
