"""Hostile input: a property-based fuzzer against every RPC of TaskService and AgentService.

Injected (hypothesis draws it): huge strings and strings at the limits, unicode
edge cases, deep, wide and huge JSON blobs (`Struct`), unknown enum values,
negative and giant durations and timestamps, page tokens and seqs out of range,
ids and lease tokens that are wrong, stale or another agent's, every kind of
caller (admin, agents, an agent with no labels, a revoked key, a garbage key,
a malformed or missing header), and on the wire: random bytes, truncated
messages, invalid UTF-8 (lone surrogates included, which no protobuf string
can hold), nesting past the parser's depth limit.

Checked: every call gets a defined status code (never UNKNOWN or INTERNAL, nor
a hang); callers whose key does not work always get UNAUTHENTICATED; an agent
never learns anything of a task outside its view; the daemon stays up (health
SERVING, process alive); and afterwards the database holds its invariants
(`invariants.py`: legal state-machine paths, no orphan events, pending flags).

Every violation is collected with its smallest request rather than failing on
the first, so one run reports them all.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from legato.v1 import agents_pb2, agents_pb2_grpc, tasks_pb2, tasks_pb2_grpc

from reliability.conftest import MakeDaemon
from reliability.harness import DaemonProcess, create_agent, record, scale
from reliability.invariants import assert_sound

EXAMPLES_PER_RPC = scale(40, 600)
MIN_EXAMPLES_PER_GROUP = scale(200, 3000)
CALL_TIMEOUT = 10.0
# A watch that is accepted stays open: reading it this long without an error means it was.
WATCH_WINDOW = 0.2

OK = grpc.StatusCode.OK
DEFINED = frozenset(
    {
        OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
# What an agent may hear about a task outside its view: nothing that tells it exists.
# (RESOURCE_EXHAUSTED: the request was over the message size limit.)
BLIND = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# What a caller whose key does not work may hear: only that (or that the request was too big).
KEYLESS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED})
# What varies between answers of one kind: ids, tokens, numbers, request type names.
VARYING = re.compile(r"(t_|l_|lgt_)[\w-]+|\d+|legato\.v1\.\w+")

pytestmark = pytest.mark.timeout(scale(150, 1500))

# -- strategies ---------------------------------------------------------------------------

EDGE_STRINGS = [
    "", " ", "\t\n", "\x00", "a\x00b", "\x7f", "\u0085", "\u00a0", "\u200b", "\u200d",
    "\u202e", "\ufeff", "\ufffd", "\uffff", "\U0010ffff", "e\u0301", "\U0001f600" * 3,
    "\u0130", "ß", "İstanbul", "Ω" * 100, "@", "@@", "@a", "@A", "@a b", "@-a", "@a." * 20,
    "@" + "a" * 63, "@" + "a" * 64, "@résumé", "t_", "t_" + "A" * 22, "t_" + "A" * 62,
    "l_" + "A" * 32, "lgt_", "admin", "Admin", "../../etc/passwd", "' OR 1=1 --",
    "%s%s%n", "{}", "null", "NaN", "-1", "9" * 30, "a" * 64, "a" * 65,
]  # fmt: skip
LIMITS = [63, 64, 65, 128, 129, 8 * 1024, 8 * 1024 + 1, 64 * 1024, 64 * 1024 + 1]


# Over the 4 MiB message limit. Sending one takes the transport up to a second, so
# a drawn string is this one only rarely (1 in HUGE_ODDS).
HUGE = "y" * (4 * 1024 * 1024 + 1024)
HUGE_ODDS = 128


def hostile_text(*, huge: bool = True) -> st.SearchStrategy[str]:
    """Any unicode text, edge cases, strings at the documented limits, and rarely 4 MiB."""
    text = st.one_of(
        st.text(max_size=40),
        st.sampled_from(EDGE_STRINGS),
        st.sampled_from(LIMITS).map(lambda n: "x" * n),
        st.sampled_from(LIMITS).map(lambda n: "é" * (n // 2 + 1)),
    )
    if not huge:
        return text
    return st.integers(0, HUGE_ODDS - 1).flatmap(lambda n: st.just(HUGE) if n == 7 else text)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**63).map(float),
    hostile_text(huge=False),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(hostile_text(huge=False), children, max_size=6),
    ),
    max_leaves=40,
)


def pick(pool: list[str]) -> st.SearchStrategy[str]:
    """An element of `pool` as it is when drawn: the pools grow as the fuzzer creates
    things, and hypothesis needs every draw to have the same shape whatever they hold."""
    return st.integers(0, 2**16).map(lambda n: pool[n % len(pool)])


def deep_struct(depth: int) -> struct_pb2.Struct:
    """`{"a": {"a": ... }}` nested `depth` levels: each is three protobuf message levels."""
    root = struct_pb2.Struct()
    node = root
    for _ in range(depth):
        node = node.fields["a"].struct_value
    return root


def sized_struct(size: int) -> struct_pb2.Struct:
    blob = struct_pb2.Struct()
    blob.update({"blob": "z" * size})
    return blob


structs = st.one_of(
    st.dictionaries(hostile_text(huge=False), json_values, max_size=8).map(lambda d: _struct(d)),
    st.integers(1, 300).map(deep_struct),
    st.sampled_from([1024 * 1024 - 64, 1024 * 1024 + 1, 3 * 1024 * 1024]).map(sized_struct),
    st.integers(500, 20_000).map(lambda n: _struct({str(i): None for i in range(n)})),
)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    blob = struct_pb2.Struct()
    blob.update(value)
    return blob


INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def durations(*, valid_up_to: float) -> st.SearchStrategy[duration_pb2.Duration | None]:
    """Unset, short valid ones, and anything else a Duration's fields can hold."""

    def make(seconds: int, nanos: int) -> duration_pb2.Duration:
        return duration_pb2.Duration(seconds=seconds, nanos=nanos)

    return st.one_of(
        st.none(),
        st.floats(0.001, valid_up_to).map(lambda s: make(int(s), int((s - int(s)) * 1e9))),
        st.builds(make, st.integers(*INT64), st.integers(*INT32)),
        st.builds(
            make,
            st.sampled_from([0, -1, 1, 60, 61, 86400, 86401, 315576000001]),
            st.sampled_from([0, -1, 1, 999_999_999, 1_000_000_000]),
        ),
    )


# Fixed once: hypothesis replays draws, and a bound that moved would change their shape.
NOW = int(time.time())


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp | None]:
    now = NOW

    def make(seconds: int, nanos: int) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)

    return st.one_of(
        st.none(),
        st.builds(make, st.integers(now + 3600, now + 10**7), st.integers(0, 999_999_999)),
        st.builds(make, st.integers(*INT64), st.integers(*INT32)),
        st.builds(
            make,
            st.sampled_from([0, -1, now - 1, 253402300799, 253402300800, 2**62]),
            st.sampled_from([0, -1, 999_999_999, 1_000_000_000]),
        ),
    )


# -- the fuzzer ---------------------------------------------------------------------------


@dataclass
class Caller:
    name: str
    metadata: tuple[tuple[str, str], ...]
    valid: bool  # whether its key works


@dataclass
class Violation:
    """One kind of wrong answer: its smallest example and every RPC it came from."""

    rpc: str
    code: str
    details: str
    caller: str
    request: str
    size: int = 0  # of the example request, to keep the smallest
    count: int = 1
    rpcs: set[str] = field(default_factory=set)

    def line(self) -> str:
        where = ", ".join(sorted(self.rpcs)) if len(self.rpcs) <= 4 else f"{len(self.rpcs)} RPCs"
        return (
            f"- {self.rpc} ({where}): {self.code} x{self.count}: {self.details!r}; "
            f"e.g. as {self.caller}: {self.request}"
        )


@dataclass
class Fuzzer:
    """Sends drawn requests through raw sync stubs and judges every answer."""

    channel: grpc.Channel
    callers: list[Caller]
    task_ids: list[str]
    creators: dict[str, str]  # task id -> the agent that created it
    tokens: list[str]
    agent_names: list[str]
    protected_agents: frozenset[str]
    keys: dict[str, Caller] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)
    cases: Counter[str] = field(default_factory=Counter)
    violations: dict[tuple[str, str, str], Violation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = tasks_pb2_grpc.TaskServiceStub(self.channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(self.channel)
        self.keys = {c.name: c for c in self.callers}

    # -- judging ---------------------------------------------------------------------

    def judge(
        self,
        rpc: str,
        caller: Caller,
        request: object,
        send: Callable[[], Any],
        *,
        foreign_task: bool = False,
        blind_too: frozenset[grpc.StatusCode] = frozenset(),
    ) -> tuple[grpc.StatusCode, Any]:
        self.cases[rpc] += 1
        response: Any = None
        details = ""
        try:
            response = send()
            code = OK
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.codes[f"{rpc} {code.name}"] += 1
        if code is grpc.StatusCode.UNAVAILABLE:
            raise AssertionError(f"{rpc}: the daemon went away (UNAVAILABLE: {details})")
        problem = ""
        if code not in DEFINED:
            problem = code.name
        elif not caller.valid and code not in KEYLESS:
            problem = f"{code.name} for a caller whose key does not work"
        elif foreign_task and caller.valid and code not in BLIND | blind_too:
            problem = f"{code.name} about a task outside the caller's view"
        if problem:
            self._note(rpc, problem, details, caller, request)
        return code, response

    def _note(self, rpc: str, problem: str, details: str, caller: Caller, request: object) -> None:
        shown, size = _describe(request), _size(request)
        # One kind of answer, whichever request type or task it names.
        pattern = VARYING.sub("#", details)[:160]
        kind = "wire" if rpc.startswith("wire ") else rpc
        key = (kind, problem, pattern)
        seen = self.violations.get(key)
        if seen is None:
            seen = self.violations[key] = Violation(
                kind, problem, details[:300], caller.name, shown, size
            )
        else:
            seen.count += 1
            if size < seen.size:
                seen.request, seen.size = shown, size
                seen.details, seen.caller = details[:300], caller.name
        seen.rpcs.add(rpc.removeprefix("wire "))

    def unary(
        self,
        rpc: str,
        caller: Caller,
        request: Message,
        *,
        foreign_task: bool = False,
        blind_too: frozenset[grpc.StatusCode] = frozenset(),
    ) -> tuple[grpc.StatusCode, Any]:
        service = self.agents if rpc in AGENT_RPCS else self.tasks
        method = getattr(service, rpc)
        return self.judge(
            rpc,
            caller,
            request,
            lambda: method(request, metadata=caller.metadata, timeout=CALL_TIMEOUT),
            foreign_task=foreign_task,
            blind_too=blind_too,
        )

    def watch(
        self, caller: Caller, request: tasks_pb2.WatchTasksRequest, *, foreign_task: bool
    ) -> tasks_pb2.TaskEvent | None:
        def send() -> tasks_pb2.TaskEvent | None:
            stream = self.tasks.WatchTasks(request, metadata=caller.metadata, timeout=WATCH_WINDOW)
            try:
                first: tasks_pb2.TaskEvent | None = next(iter(stream), None)
                return first
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                # Still open after the window: the watch was accepted and waits for events.
                return None
            finally:
                stream.cancel()

        _, first = self.judge("WatchTasks", caller, request, send, foreign_task=foreign_task)
        return first  # type: ignore[no-any-return]

    # -- what to send ------------------------------------------------------------------

    def caller(self, data: st.DataObject) -> Caller:
        # Three calls in four with a working key: past authentication is where the rules are.
        working = data.draw(st.integers(0, 99), label="working key") < 75
        return data.draw(
            st.sampled_from([c for c in self.callers if c.valid == working]), label="caller"
        )

    def task_id(self, data: st.DataObject) -> str:
        return data.draw(st.one_of(pick(self.task_ids), hostile_text()), label="id")

    def token(self, data: st.DataObject) -> str:
        return data.draw(st.one_of(pick(self.tokens), hostile_text()), label="token")

    def labels(self, data: st.DataObject) -> list[str]:
        known = st.sampled_from(["@a", "@b", "@shared", "@nobody"])
        return data.draw(
            st.one_of(
                st.lists(known, min_size=1, max_size=4),
                st.lists(st.one_of(known, hostile_text(huge=False)), max_size=20),
            ),
            label="labels",
        )

    def foreign(self, caller: Caller, task_id: str) -> bool:
        """Whether `task_id` is a task `caller` must not see: an agent with no labels
        sees only what it created."""
        creator = self.creators.get(task_id)
        return caller.name == "nolabels" and creator is not None and creator != "nolabels"

    def remember(self, task: tasks_pb2.Task, token: str = "") -> None:
        if task.id and task.id not in self.creators and len(self.task_ids) < 500:
            self.task_ids.append(task.id)
            self.creators[task.id] = task.created_by
        if token and len(self.tokens) < 500:
            self.tokens.append(token)

    # -- TaskService -------------------------------------------------------------------

    def CreateTask(self, data: st.DataObject) -> None:
        caller = self.caller(data)
        request = tasks_pb2.CreateTaskRequest(
            content=data.draw(st.one_of(st.just("look this up"), hostile_text()), label="content"),
            labels=self.labels(data),
            parent_id=data.draw(
                st.one_of(st.just(""), pick(self.task_ids), hostile_text()),
                label="parent",
            ),
            idempotency_key=data.draw(st.one_of(st.just(""), hostile_text()), label="key"),
            max_attempts=data.draw(st.one_of(st.integers(-1, 101), st.integers(*INT32))),
        )
        if data.draw(st.booleans(), label="has context"):
            request.context.CopyFrom(data.draw(structs, label="context"))
        deadline = data.draw(timestamps(), label="deadline")
        if deadline is not None:
            request.deadline.CopyFrom(deadline)
        code, task = self.unary(
            "CreateTask",
            caller,
            request,
            foreign_task=self.foreign(caller, request.parent_id),
            # The caller's own idempotency key reused: says nothing about the parent.
            blind_too=frozenset({grpc.StatusCode.ALREADY_EXISTS}),
        )
        if code is OK:
            self.remember(task)

    def GetTask(self, data: st.DataObject) -> None:
        caller, task_id = self.caller(data), self.task_id(data)
        self.unary(
            "GetTask",
            caller,
            tasks_pb2.GetTaskRequest(id=task_id),
            foreign_task=self.foreign(caller, task_id),
        )

    def GetTaskTree(self, data: st.DataObject) -> None:
        caller, task_id = self.caller(data), self.task_id(data)
        request = tasks_pb2.GetTaskTreeRequest(id=task_id)
        code, tree = self.unary(
            "GetTaskTree", caller, request, foreign_task=self.foreign(caller, task_id)
        )
        if code is OK and caller.name == "nolabels":
            leaked = [t.id for t in tree.tasks if t.created_by != "nolabels"]
            if leaked:
                self._note(
                    "GetTaskTree",
                    "shows tasks outside the caller's view",
                    str(leaked[:3]),
                    caller,
                    request,
                )

    def ListTasks(self, data: st.DataObject) -> None:
        # Unknown enum numbers are the point: proto3 enums carry any int32.
        statuses: Any = data.draw(
            st.lists(st.one_of(st.integers(0, 7), st.integers(*INT32)), max_size=5)
        )
        request = tasks_pb2.ListTasksRequest(
            labels=self.labels(data),
            statuses=statuses,
            parent_id=data.draw(st.one_of(st.just(""), pick(self.task_ids), hostile_text())),
            page_size=data.draw(st.one_of(st.integers(-2, 1001), st.integers(*INT32))),
            page_token=data.draw(
                st.one_of(st.just(""), st.sampled_from(["cDE", "cC05", "p1"]), hostile_text())
            ),
        )
        caller = self.caller(data)
        code, response = self.unary("ListTasks", caller, request)
        if code is OK and caller.name == "nolabels":
            leaked = [t.id for t in response.tasks if t.created_by != "nolabels"]
            if leaked:
                self._note(
                    "ListTasks",
                    "lists tasks outside the caller's view",
                    str(leaked[:3]),
                    caller,
                    request,
                )

    def ListTaskEvents(self, data: st.DataObject) -> None:
        caller, task_id = self.caller(data), self.task_id(data)
        request = tasks_pb2.ListTaskEventsRequest(
            id=task_id,
            after_seq=data.draw(st.one_of(st.integers(-1, 100), st.integers(*INT64))),
            page_size=data.draw(st.one_of(st.integers(-1, 1001), st.integers(*INT32))),
        )
        self.unary("ListTaskEvents", caller, request, foreign_task=self.foreign(caller, task_id))

    def WatchTasks(self, data: st.DataObject) -> None:
        caller = self.caller(data)
        ids = data.draw(
            st.one_of(
                st.lists(pick(self.task_ids), max_size=3),
                st.lists(hostile_text(huge=False), max_size=5),
                st.integers(1000, 1002).map(lambda n: ["t_x"] * n),
            )
        )
        request = tasks_pb2.WatchTasksRequest(labels=self.labels(data), task_ids=ids)
        after = data.draw(st.one_of(st.none(), st.integers(-2, 50), st.integers(*INT64)))
        if after is not None:
            request.after_seq = after
        foreign = any(self.foreign(caller, task_id) for task_id in ids)
        first = self.watch(caller, request, foreign_task=foreign)
        if first is not None and caller.name == "nolabels" and first.task.created_by != "nolabels":
            self._note(
                "WatchTasks",
                "streams a task outside the caller's view",
                first.task.id,
                caller,
                request,
            )

    def ClaimTask(self, data: st.DataObject) -> None:
        caller = self.caller(data)
        request = tasks_pb2.ClaimTaskRequest(
            labels=self.labels(data),
            id=data.draw(st.one_of(st.just(""), pick(self.task_ids), hostile_text())),
        )
        lease = data.draw(durations(valid_up_to=600), label="lease")
        if lease is not None:
            request.lease.CopyFrom(lease)
        # A valid wait holds the call that long: keep valid waits short.
        wait = data.draw(durations(valid_up_to=0.2), label="wait")
        if wait is not None and 0.2 < wait.seconds + wait.nanos / 1e9 <= 60:
            wait = None
        if wait is not None:
            request.wait.CopyFrom(wait)
        code, response = self.unary(
            "ClaimTask", caller, request, foreign_task=self.foreign(caller, request.id)
        )
        if code is OK and response.HasField("task"):
            self.remember(response.task, response.lease_token)

    def _held(self, data: st.DataObject) -> tuple[Caller, str, str]:
        caller, task_id = self.caller(data), self.task_id(data)
        return caller, task_id, self.token(data)

    def Heartbeat(self, data: st.DataObject) -> None:
        caller, task_id, token = self._held(data)
        request = tasks_pb2.HeartbeatRequest(id=task_id, lease_token=token)
        lease = data.draw(durations(valid_up_to=600), label="lease")
        if lease is not None:
            request.lease.CopyFrom(lease)
        self.unary("Heartbeat", caller, request, foreign_task=self.foreign(caller, task_id))

    def CompleteTask(self, data: st.DataObject) -> None:
        caller, task_id, token = self._held(data)
        request = tasks_pb2.CompleteTaskRequest(id=task_id, lease_token=token)
        if data.draw(st.booleans(), label="has result"):
            request.result.CopyFrom(data.draw(structs, label="result"))
        self.unary("CompleteTask", caller, request, foreign_task=self.foreign(caller, task_id))

    def FailTask(self, data: st.DataObject) -> None:
        caller, task_id, token = self._held(data)
        request = tasks_pb2.FailTaskRequest(
            id=task_id,
            lease_token=token,
            error=data.draw(hostile_text()),
            retryable=data.draw(st.booleans()),
        )
        self.unary("FailTask", caller, request, foreign_task=self.foreign(caller, task_id))

    def AppendOutput(self, data: st.DataObject) -> None:
        caller, task_id, token = self._held(data)
        request = tasks_pb2.AppendOutputRequest(
            id=task_id, lease_token=token, text=data.draw(hostile_text())
        )
        self.unary("AppendOutput", caller, request, foreign_task=self.foreign(caller, task_id))

    def RequestInput(self, data: st.DataObject) -> None:
        caller, task_id, token = self._held(data)
        request = tasks_pb2.RequestInputRequest(
            id=task_id, lease_token=token, question=data.draw(hostile_text())
        )
        self.unary("RequestInput", caller, request, foreign_task=self.foreign(caller, task_id))

    def ProvideInput(self, data: st.DataObject) -> None:
        caller, task_id = self.caller(data), self.task_id(data)
        request = tasks_pb2.ProvideInputRequest(id=task_id, answer=data.draw(hostile_text()))
        self.unary("ProvideInput", caller, request, foreign_task=self.foreign(caller, task_id))

    def CancelTask(self, data: st.DataObject) -> None:
        caller, task_id = self.caller(data), self.task_id(data)
        request = tasks_pb2.CancelTaskRequest(
            id=task_id, reason=data.draw(hostile_text()), keep_children=data.draw(st.booleans())
        )
        self.unary("CancelTask", caller, request, foreign_task=self.foreign(caller, task_id))

    # -- AgentService ------------------------------------------------------------------

    def agent_name(self, data: st.DataObject, *, mutable: bool = False) -> str:
        names = [n for n in self.agent_names if not (mutable and n in self.protected_agents)]
        return data.draw(st.one_of(pick(names), hostile_text()), label="name")

    def roles(self, data: st.DataObject) -> int:
        return data.draw(st.one_of(st.integers(0, 3), st.integers(*INT32)), label="role")

    def CreateAgent(self, data: st.DataObject) -> None:
        request = agents_pb2.CreateAgentRequest(
            name=data.draw(
                st.one_of(st.from_regex(r"[a-z][a-z0-9._-]{0,20}", fullmatch=True), hostile_text())
            ),
            labels=self.labels(data),
            role=self.roles(data),  # type: ignore[arg-type]
        )
        code, response = self.unary("CreateAgent", self.caller(data), request)
        if code is OK and len(self.agent_names) < 200:
            self.agent_names.append(response.agent.name)

    def ListAgents(self, data: st.DataObject) -> None:
        request = agents_pb2.ListAgentsRequest(include_revoked=data.draw(st.booleans()))
        self.unary("ListAgents", self.caller(data), request)

    def GetAgent(self, data: st.DataObject) -> None:
        request = agents_pb2.GetAgentRequest(name=self.agent_name(data))
        self.unary("GetAgent", self.caller(data), request)

    def UpdateAgent(self, data: st.DataObject) -> None:
        request = agents_pb2.UpdateAgentRequest(
            name=self.agent_name(data, mutable=True),
            labels=self.labels(data),
            role=self.roles(data),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(
                paths=data.draw(
                    st.lists(
                        st.one_of(st.sampled_from(["labels", "role"]), hostile_text(huge=False)),
                        max_size=3,
                    )
                )
            ),
        )
        self.unary("UpdateAgent", self.caller(data), request)

    def RevokeAgent(self, data: st.DataObject) -> None:
        request = agents_pb2.RevokeAgentRequest(name=self.agent_name(data, mutable=True))
        self.unary("RevokeAgent", self.caller(data), request)

    def RotateKey(self, data: st.DataObject) -> None:
        caller = self.caller(data)
        name = data.draw(
            st.one_of(st.just(""), st.just(caller.name), hostile_text(), pick(self.agent_names))
        )
        code, response = self.unary("RotateKey", caller, agents_pb2.RotateKeyRequest(name=name))
        if code is OK:
            self.rotated(response)

    def rotated(self, response: agents_pb2.RotateKeyResponse) -> None:
        """Keeps calling as a rotated agent with its new key: the old one stopped working."""
        if response.agent.name in self.keys:
            self.keys[response.agent.name].metadata = (
                ("authorization", f"Bearer {response.api_key}"),
            )

    def WhoAmI(self, data: st.DataObject) -> None:
        caller = self.caller(data)
        code, agent = self.unary("WhoAmI", caller, agents_pb2.WhoAmIRequest())
        if code is OK and agent.name != caller.name:
            self._note("WhoAmI", f"answered {agent.name}", "", caller, "WhoAmIRequest()")

    # -- on the wire -------------------------------------------------------------------

    def Wire(self, data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(ALL_METHODS), label="method")
        payload = data.draw(wire_payloads, label="payload")
        caller = data.draw(st.sampled_from([c for c in self.callers if c.valid]))
        rpc = method.rsplit("/", 1)[1]
        if rpc == "WatchTasks":
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(method)

            def send() -> bytes:
                call = stream(payload, metadata=caller.metadata, timeout=WATCH_WINDOW)
                try:
                    return next(iter(call), b"")
                except grpc.RpcError as exc:
                    if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
                    return b""  # still open after the window: accepted
                finally:
                    call.cancel()

        else:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(method)

            def send() -> bytes:
                return unary(payload, metadata=caller.metadata, timeout=CALL_TIMEOUT)

        code, response = self.judge(f"wire {rpc}", caller, payload, send)
        if rpc == "RotateKey" and code is OK:
            self.rotated(agents_pb2.RotateKeyResponse.FromString(response))


TASK_RPCS = [
    "CreateTask", "GetTask", "ListTasks", "ClaimTask", "Heartbeat", "CompleteTask", "FailTask",
    "CancelTask", "AppendOutput", "RequestInput", "ProvideInput", "GetTaskTree", "WatchTasks",
    "ListTaskEvents",
]  # fmt: skip
AGENT_RPCS = [
    "CreateAgent",
    "ListAgents",
    "GetAgent",
    "UpdateAgent",
    "RevokeAgent",
    "RotateKey",
    "WhoAmI",
]
ALL_METHODS = [f"/legato.v1.TaskService/{rpc}" for rpc in TASK_RPCS] + [
    f"/legato.v1.AgentService/{rpc}" for rpc in AGENT_RPCS
]
# Groups of RPCs fuzzed together, each for max(MIN_EXAMPLES_PER_GROUP,
# EXAMPLES_PER_RPC x the RPCs (or methods, on the wire) it covers) examples.
GROUPS: dict[str, tuple[list[str], int]] = {
    "TaskService create": (["CreateTask"], 1),
    "TaskService read": (
        ["GetTask", "ListTasks", "GetTaskTree", "ListTaskEvents", "WatchTasks"],
        5,
    ),
    "TaskService work": (
        [
            "ClaimTask",
            "Heartbeat",
            "CompleteTask",
            "FailTask",
            "AppendOutput",
            "RequestInput",
            "ProvideInput",
            "CancelTask",
        ],
        8,
    ),
    "AgentService": (AGENT_RPCS, len(AGENT_RPCS)),
    "every method, malformed on the wire": (["Wire"], len(ALL_METHODS)),
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string_field(number: int, raw: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


BAD_UTF8 = [
    b"\xed\xa0\x80",  # a lone high surrogate (U+D800) as WTF-8
    b"\xed\xbf\xbf",  # a lone low surrogate (U+DFFF)
    b"\xff", b"\xc0\x80", b"\xe0\x80\x80", b"\xf4\x90\x80\x80", b"abc\x80", b"\xe2\x82",
]  # fmt: skip

wire_payloads = st.one_of(
    st.binary(max_size=64),
    # A string field (numbers 1-3 are strings in most requests) holding invalid UTF-8.
    st.builds(
        lambda n, bad, pre: _string_field(n, pre + bad),
        st.integers(1, 3),
        st.sampled_from(BAD_UTF8),
        st.binary(max_size=8),
    ),
    # A valid CreateTaskRequest cut short.
    st.integers(1, 60).map(
        lambda n: tasks_pb2.CreateTaskRequest(content="x" * 40, labels=["@a"]).SerializeToString()[
            :n
        ]
    ),
    # Struct nesting past what the parser accepts (each level is three message levels).
    st.integers(20, 400).map(lambda depth: _deep_request(depth).SerializeToString()),
    # An unknown field, and a known field with the wrong wire type.
    st.builds(
        lambda n, v: _varint(n << 3) + _varint(v), st.integers(1, 2**20), st.integers(0, 2**40)
    ),
    st.just(b""),
)


def _deep_request(depth: int) -> tasks_pb2.CreateTaskRequest:
    request = tasks_pb2.CreateTaskRequest(content="deep", labels=["@a"])
    request.context.CopyFrom(deep_struct(depth))  # the constructor would parse it, and refuse
    return request


def _size(request: object) -> int:
    if isinstance(request, bytes):
        return len(request)
    if isinstance(request, Message):
        return request.ByteSize()
    return len(str(request))


def daemon_exceptions(log: str) -> dict[str, int]:
    """The exceptions the daemon logged (last line of each traceback), by kind."""
    found = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$", log, re.MULTILINE)
    return dict(Counter(f"{kind}: {VARYING.sub('#', text)[:120]}" for kind, text in found))


def _describe(request: object) -> str:
    if isinstance(request, bytes):
        return f"bytes {request[:80]!r}{'...' if len(request) > 80 else ''} ({len(request)} B)"
    text = f"{type(request).__name__}({request})".replace("\n", " ")
    return text if len(text) <= 300 else text[:300] + f"... ({len(text)} chars)"


# -- the test -----------------------------------------------------------------------------


async def seed(daemon: DaemonProcess) -> tuple[list[Caller], list[str], dict[str, str], list[str]]:
    """Agents of every kind, and tasks in every state for them to aim at."""
    keys = {
        "admin": daemon.admin_key,
        "alice": await create_agent(daemon, "alice", ["@a", "@shared"]),
        "bob": await create_agent(daemon, "bob", ["@b", "@shared"]),
        "nolabels": await create_agent(daemon, "nolabels", []),
        "revoked": await create_agent(daemon, "revoked", ["@a"]),
    }
    task_ids: list[str] = []
    creators: dict[str, str] = {}
    tokens: list[str] = []
    with grpc.insecure_channel(daemon.address) as channel:
        tasks = tasks_pb2_grpc.TaskServiceStub(channel)

        def call(name: str, rpc: str, request: Message) -> Any:
            return getattr(tasks, rpc)(
                request, metadata=(("authorization", f"Bearer {keys[name]}"),), timeout=10
            )

        for name, label in [
            ("alice", "@a"),
            ("alice", "@shared"),
            ("bob", "@b"),
            ("admin", "@shared"),
            ("nolabels", "@b"),
        ]:
            for n in range(3):
                task = call(
                    name,
                    "CreateTask",
                    tasks_pb2.CreateTaskRequest(content=f"{name} {n}", labels=[label]),
                )
                task_ids.append(task.id)
                creators[task.id] = name
        child = call(
            "alice",
            "CreateTask",
            tasks_pb2.CreateTaskRequest(content="child", labels=["@b"], parent_id=task_ids[0]),
        )
        task_ids.append(child.id)
        creators[child.id] = "alice"
        for name, label in [("alice", "@shared"), ("bob", "@b"), ("bob", "@shared")]:
            claim = call(name, "ClaimTask", tasks_pb2.ClaimTaskRequest(labels=[label]))
            tokens.append(claim.lease_token)
        asking = call("bob", "ClaimTask", tasks_pb2.ClaimTaskRequest(labels=["@b"]))
        call(
            "bob",
            "RequestInput",
            tasks_pb2.RequestInputRequest(
                id=asking.task.id, lease_token=asking.lease_token, question="which one?"
            ),
        )
        tokens.append(asking.lease_token)
        agents = agents_pb2_grpc.AgentServiceStub(channel)
        agents.RevokeAgent(
            agents_pb2.RevokeAgentRequest(name="revoked"),
            metadata=(("authorization", f"Bearer {keys['admin']}"),),
        )

    def bearer(key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)

    callers = [
        *(Caller(name, bearer(key), name != "revoked") for name, key in keys.items()),
        Caller("garbage key", bearer("lgt_0123456789ab_" + "A" * 43), False),
        Caller("malformed key", bearer("not-a-key"), False),
        Caller("basic auth", (("authorization", "Basic YWRtaW46YWRtaW4="),), False),
        Caller("no key", (), False),
    ]
    return callers, task_ids, creators, tokens


def run_group(fuzzer: Fuzzer, rpcs: Sequence[str], examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        getattr(fuzzer, data.draw(st.sampled_from(list(rpcs)), label="rpc"))(data)

    fuzz()


async def test_every_hostile_request_gets_a_defined_status_and_the_daemon_holds(
    make_daemon: MakeDaemon,
) -> None:
    began = time.monotonic()
    daemon = make_daemon()
    await daemon.start()
    callers, task_ids, creators, tokens = await seed(daemon)
    per_group: dict[str, int] = {}
    with grpc.insecure_channel(
        daemon.address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        fuzzer = Fuzzer(
            channel,
            callers,
            task_ids,
            creators,
            tokens,
            agent_names=["admin", "alice", "bob", "nolabels", "revoked"],
            protected_agents=frozenset({"admin", "alice", "bob", "nolabels"}),
        )
        for group, (rpcs, covered) in GROUPS.items():
            examples = max(MIN_EXAMPLES_PER_GROUP, EXAMPLES_PER_RPC * covered)
            before = sum(fuzzer.cases.values())
            # Off the event loop: the sync stubs block, the test's loop must not.
            await asyncio.to_thread(run_group, fuzzer, rpcs, examples)
            per_group[group] = sum(fuzzer.cases.values()) - before
            assert daemon.running, f"the daemon died during {group}:\n{daemon.log_tail()}"
            health = await asyncio.to_thread(
                health_pb2_grpc.HealthStub(channel).Check,
                health_pb2.HealthCheckRequest(service=""),
                timeout=5,
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING, group
    code, _, _ = await daemon.terminate(daemon.grace + 5)
    assert code == 0, daemon.log_tail()
    report = assert_sound(daemon.db_path)

    violations = sorted(fuzzer.violations.values(), key=lambda v: (v.rpc, v.code))
    record(
        "hostile_input",
        {
            "fuzz_cases": sum(fuzzer.cases.values()),
            "cases_per_group": per_group,
            "cases_per_rpc": dict(sorted(fuzzer.cases.items())),
            "codes": dict(sorted(fuzzer.codes.items())),
            "distinct_violations": len(violations),
            "violating_cases": sum(v.count for v in violations),
            "violations": [{**v.__dict__, "rpcs": sorted(v.rpcs)} for v in violations],
            "daemon_logged_exceptions": daemon_exceptions(daemon.log_path.read_text()),
            **report.figures(),
            "seconds": round(time.monotonic() - began, 1),
        },
    )
    if violations:
        pytest.fail(
            f"{len(violations)} kinds of wrong answers (see tests/reliability/results/"
            "hostile_input.json):\n" + "\n".join(v.line() for v in violations),
            pytrace=False,
        )
