"""The task state machine end to end: claims, leases, retries and cancels.

Where time is the subject (lease expiry) the leases are a fraction of a second
and the tests wait on the watch stream for the daemon's own REQUEUED or FAILED
event, never on a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import aclosing

import pytest
from conftest import Connect, next_event, watch_task
from legato.client import AsyncClient, AsyncJob, EventType, TaskCanceledError, TaskStatus
from legato.client.errors import FailedPreconditionError, NotFoundError
from legato.server.daemon import Daemon
from legato.server.model import EventType as ServerEventType

# The labels these scenarios route work through; every agent here holds them all,
# so the tests speak about the state machine, not about views (see test_agents).
WORK_LABELS = ["@api", "@leases", "@pool", "@relay", "@research", "@review", "@reviewer", "@tester"]


@pytest.fixture
def connect(connect: Connect) -> Connect:
    async def worker(name: str, labels: list[str] | None = None) -> AsyncClient:
        return await connect(name, WORK_LABELS if labels is None else labels)

    return worker


# Long enough that a claim a test means to keep never runs out while it runs.
LONG_LEASE = 120.0
# Short enough that a test about expiry waits a fraction of a second for it.
SHORT_LEASE = 0.2
# The most any single wait may take before the test is failed instead of hanging.
GUARD = 10.0
# How long after it should have ended a lease may still be held before the test fails.
LEASE_END_GUARD = 2.0


async def claim(client: AsyncClient, label: str, *, lease: float = LONG_LEASE) -> AsyncJob:
    """Claims the oldest pending task on `label`, which the test knows is there."""
    job = await client.claim([label], lease=lease)
    assert job is not None, f"nothing pending on {label}"
    return job


# -- many claimers ------------------------------------------------------------------


async def test_32_concurrent_claimers_take_each_of_300_tasks_exactly_once(
    coder: AsyncClient, connect: Connect
) -> None:
    created = await asyncio.gather(
        *(coder.create_task(f"job {n}", labels=["@pool"]) for n in range(300))
    )
    names = [f"worker-{n}" for n in range(32)]
    workers = [await connect(name) for name in names]

    async def work_until_the_pool_is_empty(name: str, worker: AsyncClient) -> list[str]:
        claimed: list[str] = []
        while (job := await worker.claim(["@pool"], lease=LONG_LEASE)) is not None:
            claimed.append(job.id)
            await job.complete({"by": name})
        return claimed

    claimed_by_worker = await asyncio.gather(*map(work_until_the_pool_is_empty, names, workers))

    for claimed in claimed_by_worker:
        assert len(claimed) == len(set(claimed)), "a worker was handed the same task twice"
    every_claim = [task_id for claimed in claimed_by_worker for task_id in claimed]
    assert len(every_claim) == len(set(every_claim)) == 300
    assert set(every_claim) == {handle.id for handle in created}

    page = await coder.list_tasks(labels=["@pool"], page_size=1000)
    assert len(page.tasks) == 300
    owner = {
        task_id: name
        for name, claimed in zip(names, claimed_by_worker, strict=True)
        for task_id in claimed
    }
    for task in page.tasks:
        assert task.status is TaskStatus.DONE and task.attempt == 1
        assert task.claimed_by == owner[task.id] and task.result == {"by": owner[task.id]}


# -- leases -------------------------------------------------------------------------


async def test_expired_lease_requeues_the_task_by_itself_and_fences_out_the_old_claimant(
    coder: AsyncClient, connect: Connect
) -> None:
    slow, fresh = await connect("slow-worker"), await connect("fresh-worker")
    handle = await coder.create_task("flaky job", labels=["@leases"], max_attempts=2)

    async with aclosing(watch_task(coder, handle.id)) as events:
        stale = await claim(slow, "@leases", lease=SHORT_LEASE)
        assert stale.task.attempt == 1 and stale.task.lease_expires_at is not None
        # Nobody calls anything here: the daemon ends the lease on its own timer.
        requeued = await next_event(events, EventType.REQUEUED)

    assert requeued.actor == "legato"
    assert requeued.task.status is TaskStatus.PENDING
    assert requeued.task.attempt == 2 and requeued.task.lease_expires_at is None
    assert "expired" in requeued.task.error
    with pytest.raises(FailedPreconditionError, match="PENDING"):
        await stale.heartbeat()

    job = await claim(fresh, "@leases")
    assert job.id == handle.id and job.lease_token != stale.lease_token
    assert job.task.attempt == 2 and job.task.claimed_by == "fresh-worker"

    refused: list[Callable[[], Awaitable[object]]] = [
        stale.heartbeat,
        lambda: stale.complete({"late": True}),
        lambda: stale.fail("gave up", retryable=True),
    ]
    for call in refused:
        with pytest.raises(FailedPreconditionError, match="not the current lease token of task"):
            await call()
    still_held = await coder.get_task(handle.id)
    assert still_held.status is TaskStatus.CLAIMED and still_held.claimed_by == "fresh-worker"
    assert still_held.version == job.task.version

    done = await job.complete({"answer": 42})
    assert done.status is TaskStatus.DONE and done.result == {"answer": 42}
    assert (await handle.result(timeout=GUARD)).result == {"answer": 42}


async def test_task_fails_after_max_attempts_leases_expire(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    handle = await coder.create_task("never finishes", labels=["@leases"], max_attempts=2)

    async with aclosing(watch_task(coder, handle.id)) as events:
        first = await claim(researcher, "@leases", lease=SHORT_LEASE)
        requeued = await next_event(events, EventType.REQUEUED)
        assert requeued.task.attempt == 2 and requeued.task.status is TaskStatus.PENDING

        second = await claim(researcher, "@leases", lease=SHORT_LEASE)
        assert second.id == first.id and second.task.attempt == 2
        failed = await next_event(events, EventType.FAILED)

    assert failed.actor == "legato"
    assert failed.task.status is TaskStatus.FAILED and failed.task.attempt == 2
    assert "lease" in failed.task.error and "expired" in failed.task.error
    task = await coder.get_task(handle.id)
    assert task.status is TaskStatus.FAILED and task.error == failed.task.error
    assert await researcher.claim(["@leases"]) is None
    with pytest.raises(FailedPreconditionError):
        await second.complete({"too": "late"})


async def test_a_lease_taken_the_moment_the_daemon_ends_another_still_ends(
    daemon: Daemon, coder: AsyncClient
) -> None:
    """A claim that lands while the daemon is ending a lease is not lost by its lease timer.

    The claims go through the daemon's own task operations (what the ClaimTask
    handler calls), in process: only so does a claim land, round after round, in
    the instant between the daemon ending one lease and looking up the next to
    end; over the socket that happens in well under 1% of rounds.
    """
    tasks = daemon.tasks
    assert tasks is not None
    rounds, lease_us = 100, 5_000
    await asyncio.gather(
        *(coder.create_task(f"relay {n}", labels=["@relay"], max_attempts=1) for n in range(rounds))
    )

    ended = tasks.bus.subscribe(["@relay"], [])
    relay = tasks.agents.get("admin")

    async def lease_ends(task_id: str) -> None:
        # With one attempt only, the daemon ending the lease fails the task.
        while True:
            event = await ended.get()
            if event.task.id == task_id and event.type is ServerEventType.FAILED:
                assert event.actor == "legato"
                return

    try:
        for n in range(rounds):
            # Claimed the moment the previous lease was ended: the daemon's lease timer
            # is still between ending that one and looking up the next when this commits.
            claimed = await tasks.claim(
                labels=["@relay"], task_id="", lease_us=lease_us, caller=relay
            )
            assert claimed is not None
            try:
                await asyncio.wait_for(lease_ends(claimed.id), LEASE_END_GUARD)
            except TimeoutError:
                stuck = await coder.get_task(claimed.id)
                pytest.fail(
                    f"round {n}: the {lease_us / 1000:g} ms lease on {claimed.id} had not ended "
                    f"{LEASE_END_GUARD:g} s later (task is {stuck.status.name}, "
                    f"lease_expires_at {stuck.lease_expires_at})"
                )
    finally:
        tasks.bus.unsubscribe(ended)


async def test_heartbeat_extends_the_lease(coder: AsyncClient, researcher: AsyncClient) -> None:
    await coder.create_task("long research", labels=["@research"])
    job = await claim(researcher, "@research", lease=30)
    claimed_until = job.task.lease_expires_at
    assert claimed_until is not None

    assert await job.heartbeat(lease=LONG_LEASE) is False
    extended_until = job.task.lease_expires_at
    assert extended_until is not None and extended_until > claimed_until

    # Without a length the heartbeat renews the claim's own lease, counted from now.
    assert await job.heartbeat() is False
    renewed_until = job.task.lease_expires_at
    assert renewed_until is not None and renewed_until > extended_until

    stored = await coder.get_task(job.id)
    assert stored.lease_expires_at == renewed_until
    assert stored.status is TaskStatus.CLAIMED and stored.version == job.task.version


async def test_heartbeat_with_a_wrong_token_is_refused_and_changes_nothing(
    coder: AsyncClient, researcher: AsyncClient, connect: Connect
) -> None:
    await coder.create_task("research", labels=["@research"])
    job = await claim(researcher, "@research")
    before = await coder.get_task(job.id)
    impostor = await connect("impostor")

    with pytest.raises(FailedPreconditionError, match="not the current lease token of task"):
        await impostor.heartbeat(job.id, "l_not-the-lease-token", lease=LONG_LEASE)
    with pytest.raises(FailedPreconditionError):
        await impostor.complete_task(job.id, "l_not-the-lease-token", {"stolen": True})
    with pytest.raises(FailedPreconditionError):
        await impostor.fail_task(job.id, "l_not-the-lease-token", "sabotage")

    after = await coder.get_task(job.id)
    assert after == before
    assert after.version == before.version and after.claimed_by == "researcher"
    # The rightful claimant is unaffected.
    assert (await job.complete({"ok": True})).status is TaskStatus.DONE


# -- failures -----------------------------------------------------------------------


async def test_retryable_failure_requeues_until_max_attempts_then_fails(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    handle = await coder.create_task("call a flaky API", labels=["@api"], max_attempts=3)

    for attempt in (1, 2):
        job = await claim(researcher, "@api")
        assert job.id == handle.id and job.task.attempt == attempt
        task = await job.fail(f"HTTP 503 on attempt {attempt}", retryable=True)
        assert task.status is TaskStatus.PENDING
        assert task.attempt == attempt + 1 and task.error == f"HTTP 503 on attempt {attempt}"
        with pytest.raises(FailedPreconditionError):
            await job.complete({"late": True})

    last = await claim(researcher, "@api")
    assert last.task.attempt == 3
    task = await last.fail("HTTP 503 on attempt 3", retryable=True)
    assert task.status is TaskStatus.FAILED
    assert task.attempt == 3 and task.error == "HTTP 503 on attempt 3"
    assert await researcher.claim(["@api"]) is None


async def test_non_retryable_failure_fails_at_once(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    handle = await coder.create_task("parse this", labels=["@api"], max_attempts=3)
    job = await claim(researcher, "@api")

    task = await job.fail("the input is not JSON", retryable=False)

    assert task.status is TaskStatus.FAILED
    assert task.attempt == 1 and task.error == "the input is not JSON"
    assert (await coder.get_task(handle.id)).status is TaskStatus.FAILED
    assert await researcher.claim(["@api"]) is None


# -- cancel -------------------------------------------------------------------------


async def test_pending_task_cancels(coder: AsyncClient, researcher: AsyncClient) -> None:
    handle = await coder.create_task("maybe later", labels=["@research"])

    task = await handle.cancel("no longer needed")

    assert task.status is TaskStatus.CANCELED and task.error == "no longer needed"
    assert await researcher.claim(["@research"]) is None
    with pytest.raises(TaskCanceledError, match="no longer needed"):
        await handle.result(timeout=GUARD)


async def test_claimed_task_cancels_and_its_claimant_learns_it_on_heartbeat(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    handle = await coder.create_task("long research", labels=["@research"])
    job = await claim(researcher, "@research")

    await handle.cancel("requirements changed")

    assert await job.heartbeat() is True
    assert job.task.status is TaskStatus.CANCELED
    with pytest.raises(FailedPreconditionError, match="CANCELED"):
        await job.complete({"answer": "too late"})
    with pytest.raises(FailedPreconditionError, match="CANCELED"):
        await job.fail("stopping", retryable=True)
    task = await coder.get_task(handle.id)
    assert task.status is TaskStatus.CANCELED and task.error == "requirements changed"
    assert task.result is None


async def test_cancel_of_a_done_task_is_refused_naming_its_state(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    handle = await coder.create_task("quick one", labels=["@research"])
    job = await claim(researcher, "@research")
    await job.complete({"answer": "yes"})

    with pytest.raises(FailedPreconditionError, match="DONE"):
        await handle.cancel("changed my mind")

    task = await coder.get_task(handle.id)
    assert task.status is TaskStatus.DONE and task.result == {"answer": "yes"}


async def _complete(job: AsyncJob, owner: AsyncClient) -> None:
    await job.complete({"answer": "yes"})


async def _fail(job: AsyncJob, owner: AsyncClient) -> None:
    await job.fail("cannot be done")


async def _cancel(job: AsyncJob, owner: AsyncClient) -> None:
    await owner.cancel_task(job.id, "not needed")


@pytest.mark.parametrize(
    ("finish", "terminal"),
    [
        (_complete, TaskStatus.DONE),
        (_fail, TaskStatus.FAILED),
        (_cancel, TaskStatus.CANCELED),
    ],
    ids=["done", "failed", "canceled"],
)
async def test_terminal_states_never_change(
    coder: AsyncClient,
    researcher: AsyncClient,
    finish: Callable[[AsyncJob, AsyncClient], Awaitable[None]],
    terminal: TaskStatus,
) -> None:
    handle = await coder.create_task("one shot", labels=["@research"])
    job = await claim(researcher, "@research")
    await finish(job, coder)
    before = await coder.get_task(handle.id)
    assert before.status is terminal

    with pytest.raises(FailedPreconditionError, match=terminal.name):
        await coder.cancel_task(handle.id, "again")
    with pytest.raises(FailedPreconditionError, match=terminal.name):
        await researcher.claim(task_id=handle.id)
    with pytest.raises(FailedPreconditionError, match=terminal.name):
        await job.complete({"second": "result"})
    with pytest.raises(FailedPreconditionError, match=terminal.name):
        await job.fail("second failure", retryable=True)
    if terminal is TaskStatus.CANCELED:
        # The canceled claimant is told to stop, and that changes nothing either.
        assert await job.heartbeat() is True
    else:
        with pytest.raises(FailedPreconditionError, match=terminal.name):
            await job.heartbeat()
    assert await researcher.claim(["@research"]) is None

    assert await coder.get_task(handle.id) == before


# -- claiming -----------------------------------------------------------------------


async def test_claim_by_id_takes_that_task_even_when_older_ones_wait(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    oldest = await coder.create_task("first", labels=["@research"])
    wanted = await coder.create_task("second", labels=["@research"])

    job = await researcher.claim(task_id=wanted.id)

    assert job is not None and job.id == wanted.id
    assert job.task.status is TaskStatus.CLAIMED and job.task.claimed_by == "researcher"
    assert (await coder.get_task(oldest.id)).status is TaskStatus.PENDING
    assert (await claim(researcher, "@research")).id == oldest.id


async def test_claim_by_id_of_a_task_that_is_not_pending_is_refused(
    coder: AsyncClient, researcher: AsyncClient, connect: Connect
) -> None:
    handle = await coder.create_task("contested", labels=["@research"])
    job = await researcher.claim(task_id=handle.id)
    assert job is not None

    with pytest.raises(FailedPreconditionError, match="CLAIMED"):
        await (await connect("latecomer")).claim(task_id=handle.id)
    with pytest.raises(NotFoundError):
        await researcher.claim(task_id="t_no-such-task")

    task = await coder.get_task(handle.id)
    assert task.claimed_by == "researcher" and task.version == job.task.version


async def test_claim_with_labels_that_have_no_pending_task_returns_none(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    assert await researcher.claim(["@research"]) is None
    await coder.create_task("for someone else", labels=["@reviewer"])
    held = await coder.create_task("already taken", labels=["@research"])
    assert (await claim(researcher, "@research")).id == held.id

    assert await researcher.claim(["@research", "@tester"]) is None


async def test_claims_on_a_label_come_back_oldest_first(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    created = [await coder.create_task(f"step {n}", labels=["@research"]) for n in range(5)]

    claimed = [await claim(researcher, "@research") for _ in range(5)]

    assert [job.id for job in claimed] == [handle.id for handle in created]
    assert await researcher.claim(["@research"]) is None


async def test_claims_over_several_labels_come_back_oldest_first_across_them(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    created = [
        await coder.create_task(f"step {n}", labels=["@research" if n % 2 else "@review"])
        for n in range(8)
    ]

    claimed = [await researcher.claim(["@research", "@review"]) for _ in range(8)]

    assert [job.id if job else None for job in claimed] == [handle.id for handle in created]
    assert await researcher.claim(["@research", "@review"]) is None
