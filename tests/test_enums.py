"""The enums and limits both sides state are the contract's: checked against the proto.

The server's and the client's enums are written out by hand (one is an
IntEnum stored in the database, the other a StrEnum people read), so each is
held here to `proto/legato/v1`, member by member: a status or event type added
to the contract and forgotten on either side fails this test, not a user.
"""

from __future__ import annotations

from enum import Enum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from legato.client import models
from legato.client._core import CHANNEL_OPTIONS
from legato.server import limits, model
from legato.v1 import agents_pb2, tasks_pb2

# The proto's numbers no side may use: UNSPECIFIED (0), and 3, the old HEARTBEAT event.
RETIRED = {"TASK_EVENT_TYPE_HEARTBEAT"}

CASES = [
    (tasks_pb2.TaskStatus, "TASK_STATUS_", model.Status, models.TaskStatus),
    (tasks_pb2.TaskEventType, "TASK_EVENT_TYPE_", model.EventType, models.EventType),
    (agents_pb2.Role, "ROLE_", model.Role, models.Role),
]


def _names(proto: EnumTypeWrapper, prefix: str) -> dict[str, int]:
    return {
        name.removeprefix(prefix): number
        for name, number in proto.items()
        if number != 0 and name not in RETIRED
    }


@pytest.mark.parametrize(("proto", "prefix", "server", "client"), CASES)
def test_both_sides_name_every_value_of_the_contract(
    proto: EnumTypeWrapper, prefix: str, server: type[Enum], client: type[Enum]
) -> None:
    expected = _names(proto, prefix)
    assert {member.name: member.value for member in server} == expected
    assert {member.name for member in client} == set(expected)


def test_both_sides_agree_on_which_statuses_are_terminal() -> None:
    server = {status.name for status in model.Status if status.terminal}
    client = {status.name for status in models.TaskStatus if status.terminal}
    assert server == client == {"DONE", "FAILED", "CANCELED"}


def test_the_client_takes_the_largest_message_the_daemon_sends() -> None:
    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.max_receive_message_length"] == limits.MAX_MESSAGE_BYTES
    assert options["grpc.max_send_message_length"] == limits.MAX_MESSAGE_BYTES
