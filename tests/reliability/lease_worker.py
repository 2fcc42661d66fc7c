"""A misbehaving worker process for the lease chaos test (run as a script, not collected).

    LEGATO_AGENT_KEY=... python lease_worker.py ADDRESS LABEL LEASE_SECONDS LOG_PATH SEED

Claims tasks of LABEL under a short lease, then for each draws what to do:
finish it (complete, or fail it retryably), stall past its lease and only then
try to complete it, or crash (SIGKILL itself) while holding the lease. The
test also kills this process from outside at random moments.

Each step is appended to LOG_PATH as one JSON line, written before the process
can die: what was claimed, and every completion attempted with whether its
lease had already ended when it was sent (`stale`) and the status code it got.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from typing import Any, TextIO

import grpc
from google.protobuf import duration_pb2
from legato.v1 import tasks_pb2, tasks_pb2_grpc

RETRY = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
ACTIONS = ["complete", "fail", "stall", "crash"]
WEIGHTS = [55, 10, 20, 15]
CALL_TIMEOUT = 10.0
CLAIM_WAIT = duration_pb2.Duration(seconds=1)
# A finish whose reply was lost is retried this often before the worker gives up on it.
MAX_FINISH_TRIES = 20
OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


def now_us() -> int:
    return time.time_ns() // 1000


class Log:
    def __init__(self, file: TextIO):
        self._file = file

    def note(self, **fields: Any) -> None:
        # One write per line, flushed at once: a SIGKILL can only cut after a line.
        self._file.write(json.dumps({"pid": os.getpid(), "t": now_us(), **fields}) + "\n")
        self._file.flush()


class Worker:
    def __init__(self, address: str, key: str, label: str, lease: float, log: Log, seed: int):
        self.channel = grpc.aio.insecure_channel(address, options=OPTIONS)
        self.stub = tasks_pb2_grpc.TaskServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.label = label
        self.lease = lease
        self.log = log
        self.rng = random.Random(seed)

    async def run(self) -> None:
        lease = duration_pb2.Duration()
        lease.FromMicroseconds(round(self.lease * 1e6))
        request = tasks_pb2.ClaimTaskRequest(labels=[self.label], lease=lease, wait=CLAIM_WAIT)
        while True:  # until the test kills this process
            try:
                claim = await self.stub.ClaimTask(
                    request, metadata=self.metadata, timeout=CALL_TIMEOUT, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRY:
                    self.log.note(ev="claim_refused", code=exc.code().name, details=exc.details())
                    raise
                continue
            if claim.HasField("task"):
                await self.handle(claim)

    async def handle(self, claim: tasks_pb2.ClaimTaskResponse) -> None:
        task, token = claim.task, claim.lease_token
        expires = task.lease_expires_at.ToMicroseconds()
        action = self.rng.choices(ACTIONS, WEIGHTS)[0]
        self.log.note(
            ev="claimed",
            task=task.id,
            token=token,
            attempt=task.attempt,
            expires=expires,
            action=action,
        )
        if action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lease
        lease_known = True
        if action == "stall":
            await asyncio.sleep(self.lease * 1.3)  # the injected fault: stalls past its lease
        else:
            if self.rng.random() < 0.5:
                try:
                    beat = await self.stub.Heartbeat(
                        tasks_pb2.HeartbeatRequest(id=task.id, lease_token=token),
                        metadata=self.metadata,
                        timeout=CALL_TIMEOUT,
                        wait_for_ready=True,
                    )
                    if not beat.cancel_requested:
                        expires = beat.task.lease_expires_at.ToMicroseconds()
                    self.log.note(ev="heartbeat", task=task.id, token=token, expires=expires)
                except grpc.aio.AioRpcError as exc:
                    # A heartbeat lost to a kill may or may not have extended the lease.
                    lease_known = exc.code() not in RETRY
                    self.log.note(ev="heartbeat", task=task.id, token=token, code=exc.code().name)
            await asyncio.sleep(self.rng.uniform(0, self.lease * 0.3))  # the "work"
        await self.finish(
            task.id, token, "fail" if action == "fail" else "complete", expires, lease_known
        )

    async def finish(
        self, task_id: str, token: str, kind: str, expires: int, lease_known: bool
    ) -> None:
        for tries in range(MAX_FINISH_TRIES):
            sent = now_us()
            try:
                if kind == "complete":
                    await self.stub.CompleteTask(
                        tasks_pb2.CompleteTaskRequest(id=task_id, lease_token=token),
                        metadata=self.metadata,
                        timeout=CALL_TIMEOUT,
                        wait_for_ready=True,
                    )
                else:
                    await self.stub.FailTask(
                        tasks_pb2.FailTaskRequest(
                            id=task_id, lease_token=token, error="chaos", retryable=True
                        ),
                        metadata=self.metadata,
                        timeout=CALL_TIMEOUT,
                        wait_for_ready=True,
                    )
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            self.log.note(
                ev="finish",
                kind=kind,
                task=task_id,
                token=token,
                sent=sent,
                expires=expires,
                stale=lease_known and sent >= expires,
                lease_known=lease_known,
                retry=tries > 0,
                code=code.name,
            )
            if code not in RETRY:
                return


async def main() -> None:
    address, label, lease, log_path, seed = sys.argv[1:6]
    with open(log_path, "a") as file:
        worker = Worker(
            address, os.environ["LEGATO_AGENT_KEY"], label, float(lease), Log(file), int(seed)
        )
        await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
