"""Every method of legato's services is wrapped when the daemon registers it.

The wrapping is done once per method at registration, not by a server
interceptor that sees every call: a method missing from it would be served
without a key. These tests take the methods from the proto descriptors, so a
method added to the contract is checked without being listed here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from legato.server.daemon import Daemon
from legato.v1 import agents_pb2, tasks_pb2

METHODS = [
    method
    for descriptor in (
        tasks_pb2.DESCRIPTOR.services_by_name["TaskService"],
        agents_pb2.DESCRIPTOR.services_by_name["AgentService"],
    )
    for method in descriptor.methods
]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def undecodable(method: MethodDescriptor) -> bytes | None:
    """The method's request with its first string field holding invalid UTF-8
    (None if the request has no string field)."""
    for field in method.input_type.fields:
        if field.type == field.TYPE_STRING:
            return _varint(field.number << 3 | 2) + b"\x01\xff"
    return None


@pytest.fixture
async def channel(daemon: Daemon) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(daemon.config.address) as opened:
        yield opened


async def _code(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: bytes,
    metadata: tuple[tuple[str, str], ...] = (),
) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        # Raw bytes both ways: no serializer given, so the calls are untyped.
        if method.server_streaming:
            streaming: Any = channel.unary_stream(path)
            stream = streaming(request, metadata=metadata, timeout=5)
            await stream.read()
            stream.cancel()
        else:
            unary: Any = channel.unary_unary(path)
            await unary(request, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_every_method_refuses_a_call_without_a_key(channel: grpc.aio.Channel) -> None:
    codes = {method.full_name: await _code(channel, method, b"") for method in METHODS}
    assert codes == {name: grpc.StatusCode.UNAUTHENTICATED for name in codes}


async def test_every_method_answers_an_undecodable_request_with_invalid_argument(
    channel: grpc.aio.Channel, admin_key: str
) -> None:
    metadata = (("authorization", f"Bearer {admin_key}"),)
    codes = {}
    for method in METHODS:
        request = undecodable(method)
        if request is not None:
            codes[method.full_name] = await _code(channel, method, request, metadata)
    assert len(codes) > len(METHODS) // 2  # most requests have a string field
    assert codes == {name: grpc.StatusCode.INVALID_ARGUMENT for name in codes}
