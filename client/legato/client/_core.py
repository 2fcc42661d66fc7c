"""What the sync and async clients share: everything but the I/O.

Request building, response conversion, outcome rules and the watch resume
policy live here once; `Client` and `AsyncClient` only make the calls.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, field_mask_pb2
from legato.client.errors import (
    DeadlineExceededError,
    RPCError,
    TaskCanceledError,
    TaskFailedError,
    from_rpc_error,
)
from legato.client.models import EventType, Role, Task, TaskEvent, TaskStatus, dict_to_struct
from legato.common.paths import default_address
from legato.common.tls import TLSError, read_certificates, read_key_pair
from legato.v1 import agents_pb2, tasks_pb2

log = logging.getLogger("legato.client")

# Message limits match the daemon's.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Reconnect soon after the daemon restarts: grpc's default backoff grows to
    # 2 min, long enough for a worker's leases to run out after it is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

# A watch resumes by itself after these; anything else is the caller's to see.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A call a worker makes again after these (the daemon restarts, or is slow to
# answer), as long as its lease lasts; anything else is an answer.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
RESUME_FIRST_DELAY = 0.05
RESUME_MAX_DELAY = 2.0
# Seconds a long-poll claim's call may run past its wait.
CLAIM_WAIT_MARGIN = 10.0
# Workers heartbeat this many times per lease.
HEARTBEATS_PER_LEASE = 3
DEFAULT_WORK_LEASE = 60.0
DEFAULT_WORK_WAIT = 30.0
# Calls whose repeat cannot do their work twice (CreateTask with an idempotency
# key, CompleteTask with its claim token) are made this many times at most while
# the daemon is UNAVAILABLE, within the call's timeout.
RETRY_ATTEMPTS = 8
# When a stopping worker has handed its jobs back, how long it waits for their
# handlers to return before it leaves them behind (a blocking one may never look).
HANDLER_STOP_WAIT = 5.0
WORKER_STOPPING = "the worker is stopping"


def method_name(method: object) -> str:
    """The RPC's name (`CreateTask`) of a grpc stub method, for messages."""
    path = getattr(method, "_method", b"")
    if isinstance(path, bytes):
        path = path.decode()
    return str(path).rsplit("/", 1)[-1] or "the call"


# What a call on a closed client raises (a RuntimeError), on either face.
CLOSED = "this legato client is closed; create a new one"


def new_idempotency_key() -> str:
    """A key for a create that the caller gave none: unique, so that only a
    repeat of this very call (a retry after a lost reply) finds the same task.

    The time (in microseconds) comes first and 64 random bits after it, so keys
    made later sort after: the daemon's index of keys then grows at its end
    instead of taking a random page of it on every create."""
    return f"auto-{time.time_ns() // 1000:016x}{secrets.token_hex(8)}"


def duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    message = duration_pb2.Duration()
    message.FromMicroseconds(round(seconds * 1_000_000))
    return message


def answer_after(event: TaskEvent, asked_version: int) -> str | None:
    """The answer to the question asked at `asked_version`, once `event` carries it.

    Raises if the task ended instead of being answered.
    """
    if event.task.version <= asked_version:
        return None
    if event.type is EventType.INPUT_PROVIDED:
        return event.task.answer
    if event.task.status.terminal:
        outcome(event.task)
        raise TaskFailedError(event.task)  # DONE without an answer: the asker was not it
    return None


def outcome(task: Task) -> Task:
    """The task if it is DONE; raises for FAILED or CANCELED."""
    if task.status is TaskStatus.FAILED:
        raise TaskFailedError(task)
    if task.status is TaskStatus.CANCELED:
        raise TaskCanceledError(task)
    return task


class Deadline:
    """An optional point in time after which waiting stops.

    `timeout` is in seconds from now; None never ends, 0 has already passed.
    """

    def __init__(self, timeout: float | None, what: str = "the call"):
        self._at = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.what = what

    @property
    def bounded(self) -> bool:
        return self._at is not None

    def left(self) -> float | None:
        """Seconds left, 0 or less once passed (None: no deadline)."""
        return None if self._at is None else self._at - time.monotonic()

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); raises DeadlineExceededError (a
        TimeoutError) once passed."""
        left = self.left()
        if left is not None and left <= 0:
            raise self.exceeded()
        return left

    def exceeded(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"{self.what} did not finish within its timeout of {self.timeout:g} s"
        )


class Backoff:
    """Delays between tries of a call: doubling from 50 ms up to 2 s."""

    def __init__(self) -> None:
        self._delay = RESUME_FIRST_DELAY

    def reset(self) -> None:
        self._delay = RESUME_FIRST_DELAY

    def next(self) -> float:
        """The delay before the next try; the one after it is longer."""
        delay = self._delay
        self._delay = min(self._delay * 2, RESUME_MAX_DELAY)
        return delay


class ClaimRetry:
    """How a work loop rides out claims that fail for a while (the daemon
    restarting, slow to answer): backoff between tries, a warning for the first
    failure and a line when claims go through again."""

    def __init__(self) -> None:
        self._backoff = Backoff()
        self._failures = 0

    def failed(self, error: RPCError) -> float:
        """Seconds to wait before the next claim; re-raises what is no passing failure."""
        if error.code not in TRANSIENT:
            raise error
        delay = self._backoff.next()
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "claiming failed with %s; trying again in %.2f s", error, delay)
        return delay

    def succeeded(self) -> None:
        if self._failures:
            log.info("claims go through again after %d failed", self._failures)
            self._failures = 0
        self._backoff.reset()


class Resume(Backoff):
    """When a dropped watch stream reconnects: resumable codes only, with backoff."""

    def progressed(self) -> None:
        self.reset()

    def delay_after(self, error: RPCError, deadline: Deadline) -> float:
        """Seconds to wait before reconnecting; re-raises what cannot be resumed."""
        if error.code is grpc.StatusCode.DEADLINE_EXCEEDED and deadline.bounded:
            raise deadline.exceeded() from error
        if error.code not in RESUMABLE:
            raise error
        delay = self.next()
        left = deadline.remaining()
        return delay if left is None else min(delay, left)


class LeaseClock:
    """When a job's lease ends, as far as the worker can tell without the daemon.

    Counted from when each heartbeat was sent, so it ends no later than the
    daemon's own (which counts from when the call arrived); after the claim,
    from when the claim returned.
    """

    def __init__(self, lease: float):
        self.lease = lease
        self._ends_at = time.monotonic() + lease

    def renewed(self, sent_at: float, lease: float | None = None) -> None:
        """A heartbeat sent at `sent_at` (time.monotonic) extended the lease."""
        if lease is not None:
            self.lease = lease
        self._ends_at = sent_at + self.lease

    def remaining(self) -> float:
        """Seconds until the lease ends; 0 or less once it has."""
        return self._ends_at - time.monotonic()

    def every(self) -> float:
        """Seconds between heartbeats."""
        return self.lease / HEARTBEATS_PER_LEASE


def claim_may_have_ended(event: TaskEvent) -> bool:
    """Whether a watched event of a claimed task may mean the claim ended under
    the worker (canceled, failed at its deadline, requeued after its lease).

    The watch only says when to look: a heartbeat then tells for sure.
    """
    return event.task.status not in (TaskStatus.CLAIMED, TaskStatus.INPUT_REQUIRED)


def ended_under(task: Task) -> str:
    """Why a heartbeat said to stop (`cancel_requested`): the task's ending, in a sentence."""
    verb = "was canceled" if task.status is TaskStatus.CANCELED else task.status.value
    return f"task {task.id} {verb}: {task.error or 'no reason given'}"


def lost_claim(task_id: str, why: str) -> str:
    """Why a claim ended under its worker, in a sentence."""
    return f"lost the claim on task {task_id}: {why}"


PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ClientTLS:
    """How a client checks the daemon's certificate, and for mutual TLS proves itself.

    Attributes:
        ca: the CA certificate (PEM) that signed the daemon's certificate; None
            trusts the system's CAs instead.
        cert: this client's certificate (PEM), for a daemon that requires one.
        key: its private key (PEM, unencrypted, mode 0600).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def resolve(
        cls, ca: PathLike | None, cert: PathLike | None, key: PathLike | None
    ) -> ClientTLS | None:
        """From the arguments, each defaulting to `LEGATO_TLS_CA`, `LEGATO_TLS_CERT` and
        `LEGATO_TLS_KEY`; None (plaintext) when none of them is set."""
        paths = [
            Path(value) if value else None
            for value in (
                ca if ca is not None else os.environ.get("LEGATO_TLS_CA"),
                cert if cert is not None else os.environ.get("LEGATO_TLS_CERT"),
                key if key is not None else os.environ.get("LEGATO_TLS_KEY"),
            )
        ]
        if paths == [None, None, None]:
            return None
        tls = cls(*paths)
        if (tls.cert is None) != (tls.key is None):
            raise TLSError(
                "a client certificate needs its key and a key its certificate: give both "
                "tls_cert= and tls_key= (--tls-cert and --tls-key, or LEGATO_TLS_CERT and "
                "LEGATO_TLS_KEY)"
            )
        return tls

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads and checks the files; raises `TLSError` with what to fix."""
        roots = None if self.ca is None else read_certificates(self.ca, "CA certificate")
        key = chain = None
        if self.cert is not None and self.key is not None:
            key, chain = read_key_pair(self.cert, self.key)
        return grpc.ssl_channel_credentials(roots, key, chain)

    def environment(self) -> dict[str, str]:
        """The variables that give another legato client (an MCP bridge, a command)
        the same TLS settings, with absolute paths."""
        named = {"LEGATO_TLS_CA": self.ca, "LEGATO_TLS_CERT": self.cert, "LEGATO_TLS_KEY": self.key}
        return {name: str(path.absolute()) for name, path in named.items() if path is not None}


# gRPC's words for a connection that failed (not for an UNAVAILABLE the daemon
# answered with), for nobody listening, and for a certificate the client refused.
_CONNECT_FAILED = ("failed to connect", "Socket closed")
_REFUSED = "Connection refused"
_CERTIFICATE_WORDS = ("CERTIFICATE_VERIFY_FAILED", "handshake", "Hostname Verification")


def _is_unix(address: str) -> bool:
    return address.startswith(("unix:", "unix-abstract:"))


def unreachable_hint(address: str, tls: ClientTLS | None, details: str) -> str:
    """What the user can change when a HOST:PORT daemon does not answer, given the TLS
    setup; "" when TLS cannot be the reason."""
    if _is_unix(address) or _REFUSED in details:
        return ""
    if not any(words in details for words in _CONNECT_FAILED):
        return ""
    if tls is None:
        return (
            "This client speaks plaintext: if the daemon serves TLS, trust its CA with "
            "--tls-ca FILE or LEGATO_TLS_CA"
        )
    if any(word in details for word in _CERTIFICATE_WORDS):
        return (
            "The daemon's TLS certificate was not accepted: LEGATO_TLS_CA (--tls-ca) must be "
            "the CA that signed it, and it must name the host of the address"
        )
    if tls.cert is None:
        return (
            "If the daemon requires client certificates (mutual TLS), give this client one: "
            "--tls-cert FILE --tls-key FILE, or LEGATO_TLS_CERT and LEGATO_TLS_KEY"
        )
    return (
        f"If the daemon requires client certificates, it refused {tls.cert}: it must be "
        "signed by the CA the daemon was given as --tls-client-ca"
    )


class ClientCore:
    """Configuration and request building shared by `Client` and `AsyncClient`."""

    def __init__(
        self,
        address: str | None,
        api_key: str | None,
        timeout: float | None,
        *,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
    ):
        self.address = address or default_address()
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = ()
        self.use_key(api_key if api_key is not None else os.environ.get("LEGATO_AGENT_KEY", ""))
        self.tls = ClientTLS.resolve(tls_ca, tls_cert, tls_key)
        self._credentials: grpc.ChannelCredentials | None = None
        if self.tls is not None:
            if _is_unix(self.address):
                raise TLSError(
                    f"TLS is for HOST:PORT addresses, and {self.address} is a unix socket (the "
                    "daemon serves it in plaintext, to your user only); connect to the daemon's "
                    "HOST:PORT, or unset LEGATO_TLS_CA, LEGATO_TLS_CERT and LEGATO_TLS_KEY"
                )
            self._credentials = self.tls.credentials()
        self._closed = False

    def use_key(self, api_key: str) -> None:
        """Makes every call from now on carry `api_key` (after a rotation, say).

        Calls in flight, watch streams and the heartbeats of held jobs go on; each
        later call, heartbeats included, authenticates with the new key.
        """
        if not api_key:
            raise ValueError(
                "no API key: pass api_key= or set LEGATO_AGENT_KEY "
                "(`legato agent add NAME --label @LABEL` prints one)"
            )
        if any(c.isspace() for c in api_key):
            raise ValueError("the API key has white space in it; paste it as printed (lgt_...)")
        # Sent with every call; the daemon keeps only the key's hash.
        self._metadata = (("authorization", f"Bearer {api_key}"),)

    def _rpc_error(self, exc: grpc.RpcError) -> RPCError:
        """The `RPCError` for a failed call; an unreachable daemon's says what TLS
        setting may be wrong."""
        error = from_rpc_error(exc, address=self.address)
        if error.code is grpc.StatusCode.UNAVAILABLE:
            hint = unreachable_hint(self.address, self.tls, error.message)
            if hint:
                return type(error)(f"{error.message}. {hint}", code=error.code)
        return error

    def _timeout_for(self, timeout: float | None) -> float | None:
        """A call's timeout: its own, or the client's when None."""
        return self.timeout if timeout is None else timeout

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(CLOSED)

    @staticmethod
    def _create_request(
        content: str,
        labels: Sequence[str],
        context: Mapping[str, Any] | None,
        parent_id: str,
        idempotency_key: str,
        max_attempts: int,
        deadline: datetime | timedelta | None,
    ) -> tasks_pb2.CreateTaskRequest:
        if isinstance(labels, str):
            labels = [labels]
        request = tasks_pb2.CreateTaskRequest(
            content=content,
            labels=labels,
            context=dict_to_struct(context, "context"),
            parent_id=parent_id,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
        )
        if deadline is not None:
            if isinstance(deadline, timedelta):
                deadline = datetime.now(UTC) + deadline
            if deadline.tzinfo is None:
                raise ValueError("deadline must be timezone-aware (e.g. datetime.now(UTC) + ...)")
            request.deadline.FromDatetime(deadline)
        return request

    @staticmethod
    def _list_request(
        labels: Sequence[str],
        statuses: Sequence[TaskStatus | str],
        parent_id: str,
        page_size: int,
        page_token: str,
    ) -> tasks_pb2.ListTasksRequest:
        return tasks_pb2.ListTasksRequest(
            labels=[labels] if isinstance(labels, str) else labels,
            statuses=[TaskStatus(s).proto for s in statuses],
            parent_id=parent_id,
            page_size=page_size,
            page_token=page_token,
        )

    @staticmethod
    def _claim_request(
        labels: Sequence[str], task_id: str, lease: float | None, wait: float | None
    ) -> tasks_pb2.ClaimTaskRequest:
        return tasks_pb2.ClaimTaskRequest(
            labels=[labels] if isinstance(labels, str) else labels,
            id=task_id,
            lease=duration(lease),
            wait=duration(wait),
        )

    def _claim_timeout(self, wait: float | None, timeout: float | None) -> float | None:
        # A long-poll claim must outlive its wait, whatever the client's timeout
        # is; a timeout given to the call itself is the caller's to choose.
        if timeout is not None:
            return timeout
        if not wait or self.timeout is None:
            return self.timeout
        return max(self.timeout, wait + CLAIM_WAIT_MARGIN)

    @staticmethod
    def _watch_request(
        labels: Sequence[str], task_ids: Sequence[str], after_seq: int
    ) -> tasks_pb2.WatchTasksRequest:
        return tasks_pb2.WatchTasksRequest(
            labels=[labels] if isinstance(labels, str) else labels,
            task_ids=[task_ids] if isinstance(task_ids, str) else task_ids,
            after_seq=after_seq,
        )

    @staticmethod
    def _update_agent_request(
        name: str, labels: Sequence[str] | None, role: Role | str | None
    ) -> agents_pb2.UpdateAgentRequest:
        paths = [p for p, v in (("labels", labels), ("role", role)) if v is not None]
        if not paths:
            raise ValueError("give labels or role to change")
        request = agents_pb2.UpdateAgentRequest(
            name=name,
            labels=[labels] if isinstance(labels, str) else (labels or ()),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        if role is not None:
            request.role = Role(role).proto
        return request

    @staticmethod
    def _heartbeat_request(
        task_id: str, lease_token: str, lease: float | None
    ) -> tasks_pb2.HeartbeatRequest:
        return tasks_pb2.HeartbeatRequest(
            id=task_id, lease_token=lease_token, lease=duration(lease)
        )

    def _heartbeat_timeout(self, lease_left: float) -> float:
        # A heartbeat that cannot answer before the lease ends is no use.
        return lease_left if self.timeout is None else min(self.timeout, lease_left)

    @staticmethod
    def _complete_request(
        task_id: str, lease_token: str, result: Mapping[str, Any] | None
    ) -> tasks_pb2.CompleteTaskRequest:
        return tasks_pb2.CompleteTaskRequest(
            id=task_id, lease_token=lease_token, result=dict_to_struct(result or {}, "result")
        )
