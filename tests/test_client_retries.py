"""Timeouts, retries and idempotency as an SDK user expects them.

A reply lost on the way back is made real here: the clients talk to the daemon
through a loopback TCP proxy that, once armed, forwards a request, holds back
the daemon's reply and cuts the connection, so the client sees UNAVAILABLE for
a call the daemon did carry out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from legato.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InexactValueError,
    TaskStatus,
    UnavailableError,
)
from legato.server.daemon import Daemon

AgentKey = Callable[..., Awaitable[str]]


class LossyProxy:
    """Forwards TCP connections on loopback to the daemon's unix socket, and can
    lose one reply: the first daemon-to-client bytes holding `marker` after
    `lose_reply_with(marker)` are dropped, and both connections closed."""

    def __init__(self, socket_path: str):
        self._socket_path = socket_path
        self._marker: bytes | None = None
        self.lost = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def lose_reply_with(self, marker: bytes) -> None:
        self._marker = marker

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        daemon_in, daemon_out = await asyncio.open_unix_connection(self._socket_path)

        def close() -> None:
            client_out.close()
            daemon_out.close()

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, replies: bool
        ) -> None:
            try:
                while data := await source.read(65536):
                    if replies and self._marker is not None and self._marker in data:
                        self._marker = None
                        self.lost += 1
                        close()  # the daemon did the work; its answer never arrives
                        return
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                close()

        tasks = [
            asyncio.create_task(pipe(client_in, daemon_out, replies=False)),
            asyncio.create_task(pipe(daemon_in, client_out, replies=True)),
        ]
        self._pipes.update(tasks)
        for task in tasks:
            task.add_done_callback(self._pipes.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)


@pytest.fixture
async def proxy(daemon: Daemon) -> AsyncIterator[LossyProxy]:
    running = LossyProxy(daemon.config.address.removeprefix("unix:"))
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def coder_key(agent_key: AgentKey) -> str:
    return await agent_key("coder")


@pytest.fixture
async def researcher_key(agent_key: AgentKey) -> str:
    return await agent_key("researcher")


# -- a lost reply never makes a duplicate -----------------------------------------------


async def test_a_create_whose_reply_is_lost_is_retried_into_the_one_task_it_made(
    proxy: LossyProxy, coder_key: str, researcher_key: str, daemon: Daemon
) -> None:
    async with AsyncClient(proxy.address, api_key=coder_key, timeout=10) as coder:
        proxy.lose_reply_with(b"current RPM for Tier 1?")
        handle = await coder.create_task("current RPM for Tier 1?", labels=["@researcher"])
        assert proxy.lost == 1, "the proxy lost no reply: the test proved nothing"
        page = await coder.list_tasks(labels=["@researcher"])
    assert [task.id for task in page.tasks] == [handle.id]


async def test_a_blocking_create_whose_reply_is_lost_is_retried_into_the_one_task_it_made(
    proxy: LossyProxy, coder_key: str, researcher_key: str
) -> None:
    def create() -> tuple[str, list[str]]:
        with Client(proxy.address, api_key=coder_key, timeout=10) as coder:
            proxy.lose_reply_with(b"a blocking question")
            handle = coder.create_task("a blocking question", labels=["@researcher"])
            return handle.id, [task.id for task in coder.list_tasks().tasks]

    task_id, listed = await asyncio.to_thread(create)
    assert proxy.lost == 1
    assert listed == [task_id]


async def test_a_complete_whose_reply_is_lost_answers_the_done_task_on_its_retry(
    proxy: LossyProxy, coder_key: str, researcher_key: str, daemon: Daemon
) -> None:
    async with (
        AsyncClient(daemon.config.address, api_key=coder_key, timeout=10) as coder,
        AsyncClient(proxy.address, api_key=researcher_key, timeout=10) as researcher,
    ):
        handle = await coder.create_task("current RPM for Tier 1?", labels=["@researcher"])
        job = await researcher.claim(["@researcher"])
        assert job is not None
        proxy.lose_reply_with(b"docs.example/limits")
        done = await job.complete({"rpm": 500, "source": "https://docs.example/limits"})
        assert proxy.lost == 1, "the proxy lost no reply: the test proved nothing"
        assert done.status is TaskStatus.DONE
        assert (await handle.result(timeout=5)).result == {
            "rpm": 500,
            "source": "https://docs.example/limits",
        }


async def test_completing_twice_with_the_same_token_and_result_answers_the_same_done_task(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    await coder.create_task("q", labels=["@researcher"])
    job = await researcher.claim(["@researcher"])
    assert job is not None
    first = await researcher.complete_task(job.id, job.lease_token, {"rpm": 500})
    again = await researcher.complete_task(job.id, job.lease_token, {"rpm": 500})
    assert again.status is TaskStatus.DONE
    assert again.version == first.version, "the repeat changed the task"
    history = await coder.task_history(job.id)
    assert [e.type.value for e in history].count("completed") == 1


async def test_completing_a_done_task_with_another_result_is_refused(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    await coder.create_task("q", labels=["@researcher"])
    job = await researcher.claim(["@researcher"])
    assert job is not None
    await researcher.complete_task(job.id, job.lease_token, {"rpm": 500})
    with pytest.raises(FailedPreconditionError, match=r"DONE already.*another result"):
        await researcher.complete_task(job.id, job.lease_token, {"rpm": 501})
    with pytest.raises(FailedPreconditionError, match="only CLAIMED"):
        await researcher.complete_task(job.id, "not-the-token", {"rpm": 500})


async def test_a_create_retries_a_bounded_number_of_times_while_nobody_answers(
    coder_key: str,
) -> None:
    # Nothing listens on port 9 of loopback: every try is UNAVAILABLE.
    async with AsyncClient("127.0.0.1:9", api_key=coder_key, timeout=10) as nobody:
        with pytest.raises(UnavailableError):
            await nobody.create_task("q", labels=["@researcher"])


# -- timeouts ---------------------------------------------------------------------------


async def test_a_timeout_of_zero_has_run_out_before_the_call(coder: AsyncClient) -> None:
    with pytest.raises(DeadlineExceededError) as raised:
        await coder.get_cursor(timeout=0)
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(TimeoutError):
        await coder.create_task("q", labels=["@researcher"], timeout=0)
    assert (await coder.list_tasks()).tasks == [], "a call with no time left was sent"


async def test_every_timeout_raises_one_family(coder: AsyncClient, researcher: AsyncClient) -> None:
    handle = await coder.create_task("q", labels=["@researcher"])
    # A wait that runs out ...
    with pytest.raises(DeadlineExceededError):
        await handle.result(timeout=0.05)
    # ... and a call the daemon does not answer in time (a long-poll claim
    # whose own timeout is shorter than its wait).
    await coder.cancel_task(handle.id)
    with pytest.raises(DeadlineExceededError):
        await researcher.claim(["@researcher"], wait=5, timeout=0.1)


async def test_none_is_the_clients_timeout(coder: AsyncClient) -> None:
    assert coder._timeout_for(None) == 10
    assert coder._timeout_for(0) == 0
    assert coder._timeout_for(2.5) == 2.5


# -- results round-trip exactly ----------------------------------------------------------


async def test_results_come_back_exactly_as_the_worker_gave_them(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    result = {"rpm": 500, "big": 2**53 - 1, "neg": -(2**53 - 1), "ratio": 0.1, "nested": [1, 2.5]}
    handle = await coder.create_task("q", labels=["@researcher"], context={"n": 2**40})
    job = await researcher.claim(["@researcher"])
    assert job is not None
    assert job.task.context == {"n": 2**40}
    assert isinstance(job.task.context["n"], int)
    await job.complete(result)
    done = await handle.result(timeout=5)
    assert done.result == result
    assert isinstance(done.result["rpm"], int)
    assert isinstance(done.result["big"], int)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (2**53, "beyond"),
        (-(2**64), "beyond"),
        (float("nan"), "NaN"),
        (float("inf"), "infinity"),
    ],
)
async def test_a_number_json_cannot_carry_exactly_is_refused_not_rounded(
    coder: AsyncClient, researcher: AsyncClient, value: float, words: str
) -> None:
    await coder.create_task("q", labels=["@researcher"])
    job = await researcher.claim(["@researcher"])
    assert job is not None
    with pytest.raises(InexactValueError, match=words) as raised:
        await job.complete({"answer": {"values": [value]}})
    assert isinstance(raised.value, ValueError)
    assert "result['answer']['values'][0]" in str(raised.value)
    with pytest.raises(InexactValueError):
        await coder.create_task("q", labels=["@researcher"], context={"id": value})
    assert (await job.heartbeat()) is False, "the refused result still finished the task"


async def test_the_blocking_client_has_the_same_timeouts(daemon: Daemon, coder_key: str) -> None:
    def calls() -> None:
        with Client(daemon.config.address, api_key=coder_key, timeout=10) as coder:
            with pytest.raises(DeadlineExceededError):
                coder.get_cursor(timeout=0)
            handle = coder.create_task("q", labels=["@researcher"])
            with pytest.raises(TimeoutError):
                handle.result(timeout=0.05)

    await asyncio.to_thread(calls)


async def test_a_short_wait_for_an_answer_still_asks_the_question(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    """The timeout of `ask` bounds the wait for the answer, not the asking."""
    handle = await coder.create_task("q", labels=["@researcher"])
    job = await researcher.claim(["@researcher"])
    assert job is not None
    with pytest.raises(DeadlineExceededError):
        await job.ask("Tier 1 or Tier 2?", timeout=0.001)
    task = await handle.get()
    assert (task.status, task.question) == (TaskStatus.INPUT_REQUIRED, "Tier 1 or Tier 2?")
