"""`python -m bench.mcp_start` (`make bench-mcp`): how soon `legato mcp` answers `initialize`.

An MCP client spawns the bridge and waits for its answer to `initialize`
before it shows any tool, so that time is the bridge's start-up as a user
feels it. Each round spawns, in turn, a set of processes that all answer the
same `initialize` (the same bytes on stdin) and times spawn → answer:

- `python -c pass`            the interpreter starting and exiting: the floor;
- `bare JSON-RPC echo`        a stdio server in plain Python that reads the
                              request and writes a valid answer: the ceiling for
                              any Python MCP server;
- `SDK server, no tools`      the MCP SDK's own `MCPServer` with nothing in it:
                              what the bridge cost when it was built on it;
- `import legato.client.cli`  spawn to exit of a process that only imports the
                              `legato` command (grpc, the client): the part of
                              the start that comes before the bridge's code;
- `legato mcp`                the bridge, as MCP clients start it;
- `legato mcp → tools/list`   the same, until it has also listed its tools (an
                              answer to `initialize` sent before the tools exist
                              would show here).

The kinds run interleaved, round after round, so that load from anything else
on the machine falls on all of them alike. A daemon serves the bridge's
address so that the bridge starts as it does in use. Prints the median (and
the quickest and the 90th percentile) of each over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from legato.client import AsyncClient

from bench.procs import LEGATO, Processes, start_daemon

# The target of the performance issue: `legato mcp` answers `initialize` within this.
TARGET_SECONDS = 0.5
# The protocol version the bench asks for; every server here accepts it.
PROTOCOL_VERSION = "2025-11-25"

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "legato-bench", "version": "1"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
TOOLS_LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}

# The smallest honest stdio JSON-RPC server: parse the request, answer it.
ECHO_SERVER = """\
import json, sys
request = json.loads(sys.stdin.readline())
answer = {"jsonrpc": "2.0", "id": request["id"], "result": {
    "protocolVersion": request["params"]["protocolVersion"],
    "capabilities": {"tools": {}}, "serverInfo": {"name": "echo", "version": "1"}}}
sys.stdout.write(json.dumps(answer) + "\\n")
sys.stdout.flush()
sys.stdin.read()
"""

SDK_SERVER = """\
from mcp.server.mcpserver import MCPServer
MCPServer("empty").run()
"""


@dataclass
class Kind:
    """One process to time: its argv and the request id whose answer ends the clock."""

    name: str
    argv: list[str]
    until_id: int | None = 1  # None: the process exiting ends the clock
    then_list_tools: bool = False
    seconds: list[float] = field(default_factory=list)


async def spawn_to_answer(kind: Kind, env: dict[str, str]) -> float:
    """Seconds from spawning `kind` to its answer (or its exit)."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *kind.argv,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        if kind.until_id is None:
            process.stdin.close()
            await asyncio.wait_for(process.wait(), 60)
            return time.perf_counter() - started
        # Written at once, as a client does: the pipe holds it until the server reads.
        process.stdin.write(json.dumps(INITIALIZE).encode() + b"\n")
        await process.stdin.drain()
        await _answer(process.stdout, 1, kind.name)
        if kind.then_list_tools:
            for message in (INITIALIZED, TOOLS_LIST):
                process.stdin.write(json.dumps(message).encode() + b"\n")
            await process.stdin.drain()
            tools = await _answer(process.stdout, 2, kind.name)
            if not tools.get("tools"):
                raise RuntimeError(f"{kind.name} listed no tools: {tools}")
        return time.perf_counter() - started
    finally:
        if not process.stdin.is_closing():
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _answer(stdout: asyncio.StreamReader, request_id: int, name: str) -> dict[str, object]:
    """The result of the answer to `request_id`; anything else on stdout is skipped."""
    while True:
        line = await asyncio.wait_for(stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"{name} closed stdout before answering request {request_id}")
        message = json.loads(line)
        if message.get("id") == request_id:
            if "result" not in message:
                raise RuntimeError(f"{name} refused request {request_id}: {message}")
            result: dict[str, object] = message["result"]
            return result


def _line(kind: Kind, floor: float) -> str:
    ordered = sorted(kind.seconds)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return (
        f"{kind.name:<26} {median * 1000:8.0f} {ordered[0] * 1000:8.0f} {p90 * 1000:8.0f}"
        f" {(median - floor) * 1000:+10.0f}"
    )


async def run(rounds: int) -> int:
    """Times every kind `rounds` times, interleaved; 0 if `legato mcp` meets the target."""
    python = sys.executable
    kinds = [
        Kind("python -c pass", [python, "-c", "pass"], until_id=None),
        Kind("bare JSON-RPC echo", [python, "-c", ECHO_SERVER]),
        Kind("SDK server, no tools", [python, "-c", SDK_SERVER]),
        Kind("import legato.client.cli", [python, "-c", "import legato.client.cli"], None),
        Kind("legato mcp", [str(LEGATO), "mcp"]),
        Kind("legato mcp → tools/list", [str(LEGATO), "mcp"], until_id=2, then_list_tools=True),
    ]
    scratch = Path(tempfile.mkdtemp(prefix="legato-bench-mcp-"))
    procs = Processes(scratch / "logs")
    try:
        daemon = await start_daemon(procs, "daemon", scratch / "data", scratch / "legato.sock")
        async with AsyncClient(daemon.address, api_key=daemon.admin_key()) as admin:
            _, key = await admin.create_agent("bench-mcp", labels=["@bench-mcp"])
        env = {
            "PATH": str(Path(python).parent) + ":/usr/bin:/bin",
            "HOME": str(scratch),
            "LEGATO_AGENT_KEY": key,
            "LEGATO_ADDRESS": daemon.address,
            "LEGATO_DATA_DIR": str(daemon.data_dir),
        }
        for kind in kinds:  # one unmeasured start each: warm the page cache and .pyc files
            await spawn_to_answer(kind, env)
        for _ in range(rounds):
            for kind in kinds:
                kind.seconds.append(await spawn_to_answer(kind, env))
    finally:
        await procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)

    median = {kind.name: statistics.median(kind.seconds) for kind in kinds}
    echo = median["bare JSON-RPC echo"]
    print(f"spawn → answer to initialize, {rounds} rounds (ms)")
    print(f"{'':<26} {'median':>8} {'min':>8} {'p90':>8} {'vs echo':>10}")
    for kind in kinds:
        print(_line(kind, echo))
    bridge = median["legato mcp"]
    verdict = "meets" if bridge < TARGET_SECONDS else "misses"
    print(
        f"legato mcp: median {bridge * 1000:.0f} ms, {verdict} the target of "
        f"{TARGET_SECONDS * 1000:.0f} ms; {bridge / echo:.1f} times the bare echo server"
    )
    return 0 if bridge < TARGET_SECONDS else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mcp_start", description=__doc__)
    parser.add_argument("-n", "--rounds", type=int, default=15, help="spawns of each kind")
    args = parser.parse_args()
    return asyncio.run(run(args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())
