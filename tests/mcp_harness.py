"""The MCP SDK's client, in memory, against the bridge's own server.

The bridge speaks MCP with a small server of its own
(`legato.client.mcp_server`); the SDK's client is the reference it is held
to. `mcp_client(server)` gives that client over the same JSON lines stdio
carries, through memory streams, so a test can drive several bridges in one
process and one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anyio
from legato.client.mcp_server import Server
from mcp import Client
from mcp.client._transport import TransportStreams
from mcp.shared.message import SessionMessage
from mcp_types.jsonrpc import jsonrpc_message_adapter


@contextlib.asynccontextmanager
async def in_memory(server: Server) -> AsyncIterator[TransportStreams]:
    """An SDK client transport to `server` in this process. Closing it is the client
    closing stdin: the server cancels its running calls and closes the bridge."""
    to_server, from_client = anyio.create_memory_object_stream[SessionMessage](100)
    to_client, from_server = anyio.create_memory_object_stream[SessionMessage | Exception](100)

    async def receive() -> bytes | None:
        try:
            message = await from_client.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return None
        return message.message.model_dump_json(by_alias=True, exclude_unset=True).encode()

    async def send(line: bytes) -> None:
        try:
            await to_client.send(SessionMessage(jsonrpc_message_adapter.validate_json(line)))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise EOFError from None  # the client went away, as a closed pipe would say

    serving = asyncio.create_task(server.serve(receive, send))
    try:
        yield from_server, to_server
    finally:
        to_server.close()
        await serving
        to_client.close()


def mcp_client(server: Server) -> Client:
    """The SDK's client of `server`, in memory."""
    return Client(in_memory(server))
