"""The ceilings: a bare grpc.aio echo server and a bare fan-out server.

They do what gRPC must do for legato's calls and nothing else, with the same
server options and the same message sizes: the echo server answers each unary
call with a response of the size of legato's (the very bytes legato answered
when probed); the fan-out server, on each Publish, sends one TaskEvent of the
size of legato's to every open Subscribe stream. The load generator drives
them through the same code path as the daemon.

Run as `python -m bench.ceilings echo|fanout --listen unix:PATH --payloads FILE`;
prints `ready` on stdout once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from legato.server.daemon import GRPC_OPTIONS
from legato.v1 import tasks_pb2

from bench.procs import run_loop

ECHO_SERVICE = "bench.Echo"
FANOUT_SERVICE = "bench.FanOut"
Context = grpc.aio.ServicerContext[Any, Any]


def echo_method(name: str) -> str:
    """The echo method answering like legato's TaskService method `name`."""
    return f"/{ECHO_SERVICE}/{name}"


PUBLISH = f"/{FANOUT_SERVICE}/Publish"
SUBSCRIBE = f"/{FANOUT_SERVICE}/Subscribe"


def write_payloads(path: Path, payloads: dict[str, bytes]) -> None:
    path.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in payloads.items()}))


def read_payloads(path: Path) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in json.loads(path.read_text()).items()}


def echo_handler(payloads: dict[str, bytes]) -> grpc.GenericRpcHandler:
    """Unary methods named like legato's, each answering with legato's response bytes."""

    def answer(response: bytes) -> Any:
        async def handle(request: bytes, context: Context) -> bytes:
            return response

        return grpc.unary_unary_rpc_method_handler(handle)  # raw bytes both ways

    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {name: answer(payloads[name]) for name in ("CreateTask", "GetTask", "ClaimTask")},
    )


class FanOut:
    """Publish sends one event to every Subscribe stream; nothing is stored."""

    def __init__(self, payloads: dict[str, bytes]):
        self._event = tasks_pb2.TaskEvent.FromString(payloads["TaskEvent"])
        self._response = payloads["CreateTask"]
        self._streams: set[asyncio.Queue[bytes]] = set()

    async def subscribe(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._streams.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:  # CancelledError (the client left) propagates
            self._streams.discard(queue)

    async def publish(self, request: bytes, context: Context) -> bytes:
        # The event carries the request's content, as legato's CREATED event does,
        # so each watcher can tell which publish it is receiving.
        self._event.task.content = tasks_pb2.CreateTaskRequest.FromString(request).content
        event = self._event.SerializeToString()
        for queue in self._streams:
            queue.put_nowait(event)
        return self._response

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            FANOUT_SERVICE,
            {
                "Publish": grpc.unary_unary_rpc_method_handler(self.publish),
                "Subscribe": grpc.unary_stream_rpc_method_handler(self.subscribe),
            },
        )


async def serve(kind: str, listen: str, payloads: dict[str, bytes]) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    handler = echo_handler(payloads) if kind == "echo" else FanOut(payloads).handler()
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceilings")
    parser.add_argument("kind", choices=["echo", "fanout"])
    parser.add_argument("--listen", required=True, help="unix:PATH")
    parser.add_argument("--payloads", required=True, type=Path, help="JSON of probed responses")
    args = parser.parse_args()
    run_loop(serve(args.kind, args.listen, read_payloads(args.payloads)))


if __name__ == "__main__":
    main()
