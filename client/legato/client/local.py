"""The daemon of this user on this machine: its keys, and starting it when none serves.

A client run by the same user as the daemon finds it with no configuration:
the default socket, the admin key the daemon wrote to its data dir, and the
per-agent key files `legato agent add` and `legato mcp config` write there
(`<data_dir>/keys/<agent>.key`, 0600 in a 0700 dir), so that an MCP client's
configuration names an agent and never holds its key.

`ensure_daemon` starts `legato serve --detach` when nothing serves the local
default address. It never starts one for an address the user gave
(`--address`, a `LEGATO_ADDRESS` other than the default socket) nor for a
daemon on a database URL (`LEGATO_DATABASE_URL`): those are somebody's
deployment, not this user's private daemon. Two clients starting at once end
with one daemon: the second daemon finds the socket's lock taken and exits,
and both clients wait for the first to be SERVING.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from legato.common.paths import (
    ADMIN_KEY_FILE,
    APP,
    LOG_NAME,
    SOCKET_NAME,
    agent_key_file,
    daemon_environment,
    default_data_dir,
    default_runtime_dir,
    private_dir,
)
from legato.common.paths import lock_holder as lock_holder  # where clients have found it

# How long a client waits for a daemon that another client is starting.
START_TIMEOUT = 30.0
# Retry the socket often while a daemon starts: gRPC's first reconnect waits 1 s.
_PROBE_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]


class DaemonNotStarted(RuntimeError):
    """No daemon serves the local default address and none could be started."""


def default_socket_address() -> str:
    """The unix socket of this user's default daemon, whatever `LEGATO_ADDRESS` says."""
    return f"unix:{default_runtime_dir() / SOCKET_NAME}"


def is_local_default(address: str | None) -> bool:
    """Whether `address` (None: `LEGATO_ADDRESS`, else the default) is this user's
    default daemon, the one a client may start by itself."""
    address = address or os.environ.get("LEGATO_ADDRESS") or ""
    return not address or address == default_socket_address()


def local_default_environment() -> dict[str, str]:
    """What a process started elsewhere (an MCP client's bridge) needs in its environment
    to take the same default socket as this one, and so to start its daemon itself:
    the runtime dir this process uses, pinned. Paths only.

    Not the socket's address: a bridge told an address treats it as somebody's
    deployment and never starts a daemon for it.
    """
    if not sys.platform.startswith("linux"):
        return {}  # the runtime dir comes from the platform, not the environment
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    # Empty when this process fell back to the temp dir: the bridge then does too,
    # even if its own environment has an XDG_RUNTIME_DIR.
    return {"XDG_RUNTIME_DIR": xdg if default_runtime_dir() == Path(xdg) / APP else ""}


def health(address: str, *, timeout: float, wait: bool = False) -> str:
    """The daemon's health status at a local `address` (`SERVING`, `NOT_SERVING`), or
    `UNREACHABLE`; with `wait`, waits up to `timeout` for it to accept connections."""
    with grpc.insecure_channel(address, options=_PROBE_OPTIONS) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=wait
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def ensure_daemon(address: str | None = None) -> bool:
    """Starts this user's daemon in the background if `address` is the local default
    and nothing serves it; True if this call started it.

    Raises `DaemonNotStarted` with the daemon's own words if it could not start.
    """
    if not is_local_default(address) or os.environ.get("LEGATO_DATABASE_URL"):
        return False
    target = default_socket_address()
    if health(target, timeout=2.0) == "SERVING":
        return False
    started = subprocess.run(
        [sys.executable, "-m", "legato.server", "--listen", target, "--detach"],
        stdin=subprocess.DEVNULL,
        env=daemon_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    # Whoever won a race of starters, the daemon is SERVING soon: the loser's
    # child found the socket's lock taken and exited. Nobody holding the lock
    # after a failed start means nobody is coming.
    coming = started.returncode == 0 or lock_holder(target) is not None
    if not coming or health(target, timeout=START_TIMEOUT, wait=True) != "SERVING":
        why = (started.stderr or started.stdout).strip() or "no output"
        raise DaemonNotStarted(
            f"no legato daemon serves {target} and starting one failed: {why}. Start it "
            "yourself with `legato serve` to see why"
        )
    # `legato serve --detach` exits 0 too when a daemon was already serving (one that
    # another client started meanwhile): only its "serving on" line means this one.
    if started.returncode == 0 and started.stdout.startswith("legato serving on"):
        log = default_data_dir() / LOG_NAME
        print(f"legato: started the daemon on {target} (log: {log})", file=sys.stderr)
        return True
    return False


def resolve_key(explicit: str | None) -> str:
    """--key, else LEGATO_AGENT_KEY, else the admin key the daemon wrote for its user."""
    if explicit:
        return explicit
    if os.environ.get("LEGATO_AGENT_KEY"):
        return os.environ["LEGATO_AGENT_KEY"]
    admin_key = admin_key_file()
    try:
        return admin_key.read_text().strip()
    except OSError:
        raise SystemExit(
            "legato: no API key: set LEGATO_AGENT_KEY (`legato agent add` prints one), pass "
            f"--key, or run as the user whose daemon wrote {admin_key}"
        ) from None


def key_file(agent: str) -> Path:
    """The key file of `agent` in the data dir (`LEGATO_DATA_DIR`, else the default)."""
    return agent_key_file(default_data_dir(), agent)


def read_agent_key(agent: str) -> str | None:
    """The key kept for `agent`, or None if there is no key file."""
    try:
        return key_file(agent).read_text().strip() or None
    except FileNotFoundError:
        return None


def write_agent_key(agent: str, key: str) -> Path:
    """Keeps `key` as the key of `agent` (0600, in a 0700 dir); replaces it whole."""
    path = key_file(agent)
    private_dir(path.parent.parent)
    private_dir(path.parent)
    write_key_file(path, key)
    return path


def admin_key_file() -> Path:
    """The admin key the daemon wrote to its data dir, which clients fall back to."""
    return default_data_dir() / ADMIN_KEY_FILE


def write_key_file(path: Path, key: str) -> None:
    """Replaces the key file at `path` whole (0600): a reader sees the old key or the new
    one, and after a power loss the file holds one of them, never nothing."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
        file.flush()
        os.fsync(file.fileno())
    scratch.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)
