"""SIGTERM with a long-poll claim waiting: the daemon must not wait out its grace for it.

`server.stop(grace)` holds shutdown while any call is open, and an idle claim
may wait up to 60 s for work. The daemon ends such waits itself when it starts
stopping, like it ends watch streams.
"""

from __future__ import annotations

import asyncio

from google.protobuf import duration_pb2
from legato.v1 import agents_pb2, tasks_pb2

from reliability.conftest import MakeDaemon
from reliability.harness import Raw, create_agent

GRACE = 10.0
# Far below the grace: a stop that waited for the claim would take GRACE seconds.
PROMPT_EXIT = 3.0


async def test_sigterm_ends_an_idle_long_poll_claim_at_once(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(grace=GRACE)
    await daemon.start()
    key = await create_agent(daemon, "worker", ["@idle"])
    async with Raw(daemon.address, key) as worker:
        wait = duration_pb2.Duration(seconds=60)
        claim = asyncio.ensure_future(
            worker.tasks.ClaimTask(
                tasks_pb2.ClaimTaskRequest(labels=["@idle"], wait=wait),
                metadata=worker.metadata,
                timeout=GRACE + 30,
            )
        )
        # Calls on one channel reach the daemon's handlers in order: once this one is
        # answered, the claim is inside the daemon, waiting for work.
        await worker.agents.WhoAmI(agents_pb2.WhoAmIRequest(), metadata=worker.metadata, timeout=10)
        assert not claim.done()

        code, took, lines = await daemon.terminate(timeout=GRACE + 5)

        assert code == 0, daemon.log_tail()
        assert lines[-1:] == ["legato stopped"]
        assert took < PROMPT_EXIT, f"SIGTERM took {took:.2f} s with an idle claim open"
        # Answered, not cut off: an idle claim ends the way a claim that found nothing does.
        response = await asyncio.wait_for(claim, 1)
        assert not response.HasField("task")
