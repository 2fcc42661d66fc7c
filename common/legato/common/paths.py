"""Where the daemon keeps its files and listens by default.

Shared by the daemon and the client, so that a client run by the same user
finds the daemon, its admin key and the agents' key files with no configuration.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import platformdirs

APP = "legato"
SOCKET_NAME = "legato.sock"
DB_NAME = "legato.db"
LOCK_NAME = "legato.lock"
# Beside a unix socket, the lock of the daemon serving it: `legato.sock.lock`.
SOCKET_LOCK_SUFFIX = ".lock"
# In the data dir: the admin's key, written by the first daemon on a database.
ADMIN_KEY_FILE = "admin.key"
# In the data dir: one key file per agent (`keys/NAME.key`), written by
# `legato agent add` and `legato mcp config`, read by `legato mcp --agent NAME`.
KEYS_DIR = "keys"
# In the data dir: what a daemon started in the background (`legato serve
# --detach`, or by a client that found none) writes to stdout and stderr.
LOG_NAME = "legato.log"


# What a client may hold in its environment that the daemon it starts must not
# inherit: a key is a client's, and `/proc/PID/environ` shows the daemon's.
CLIENT_SECRETS = ("LEGATO_AGENT_KEY",)


def daemon_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) without what only a client should hold."""
    return {
        name: value
        for name, value in (os.environ if environ is None else environ).items()
        if name not in CLIENT_SECRETS
    }


def default_data_dir() -> Path:
    """The per-user data directory (`LEGATO_DATA_DIR` overrides it)."""
    override = os.environ.get("LEGATO_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir(APP))


def default_runtime_dir() -> Path:
    """A per-user directory for the socket.

    On Linux `$XDG_RUNTIME_DIR/legato` when that is set (e.g. /run/user/UID),
    else a per-user folder in the temp dir; elsewhere the platform's runtime
    dir. Either way the daemon makes it 0700, and both sides refuse it if
    another user owns it.
    """
    if sys.platform.startswith("linux"):
        xdg = os.environ.get("XDG_RUNTIME_DIR", "")
        if xdg and Path(xdg).is_dir() and os.access(xdg, os.W_OK):
            return Path(xdg) / APP
        return Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    return Path(platformdirs.user_runtime_dir(APP))


def default_address() -> str:
    """`LEGATO_ADDRESS`, or the unix socket of the default daemon."""
    explicit = os.environ.get("LEGATO_ADDRESS")
    if explicit:
        return explicit
    runtime = default_runtime_dir()
    if runtime.exists():
        # In a shared temp dir another user could have made the folder first and
        # be listening there: never send a key to their socket.
        check_owned(runtime)
    return f"unix:{runtime / SOCKET_NAME}"


class NotOwned(PermissionError):
    """A directory legato would use belongs to another user."""


def check_owned(path: Path) -> None:
    owner = path.stat().st_uid
    if owner != os.getuid():
        raise NotOwned(
            f"{path} belongs to user id {owner}, not to you ({os.getuid()}); legato will not "
            "use it. Remove it, or set LEGATO_ADDRESS / --listen to a socket in your own directory"
        )


def private_dir(path: Path) -> Path:
    """Creates `path` if needed, checks it is the caller's own, and makes it owner-only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_owned(path)
    path.chmod(0o700)
    return path


class UnsafeAddress(ValueError):
    """An address the daemon will not listen on."""


def unix_socket_path(address: str) -> Path | None:
    """The socket file of a `unix:PATH` (or `unix://PATH`) address; None for `HOST:PORT`."""
    if address.startswith("unix-abstract:"):
        raise UnsafeAddress(
            f"{address}: abstract unix sockets have no permissions (any local process can "
            "connect); use a unix:PATH socket"
        )
    if not address.startswith("unix:"):
        return None
    return Path(address.removeprefix("unix:").removeprefix("//"))


def socket_lock_path(socket: Path) -> Path:
    """The lock file of the daemon serving `socket`, beside it in the same 0700 dir."""
    return socket.with_name(socket.name + SOCKET_LOCK_SUFFIX)


# An agent's name as the daemon allows it (`legato.server.agents.NAME_RE`): no
# separator, no leading dot, so a name never leads a key file out of keys/.
AGENT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def agent_key_file(data_dir: Path, agent: str) -> Path:
    """Where the key of `agent` is kept for the MCP bridge: `<data_dir>/keys/<agent>.key`.

    Raises `ValueError` for a name no agent can have (`../admin`).
    """
    if not AGENT_NAME_RE.fullmatch(agent):
        raise ValueError(
            f"{agent!r} is not an agent name: 1 to 63 of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return data_dir / KEYS_DIR / f"{agent}.key"


def lock_holder(address: str) -> dict[str, Any] | None:
    """What the daemon holding the lock of a unix `address` wrote there (pid, data
    dir, listen, backend), or None when no daemon holds it."""
    import fcntl  # not on Windows, where there are no unix sockets to lock

    socket = unix_socket_path(address)
    if socket is None:
        return None
    try:
        fd = os.open(socket_lock_path(socket), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder: dict[str, Any] = json.loads(os.pread(fd, 65536, 0) or b"{}")
            return holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # we got the lock: nobody holds it
    except (ValueError, OSError):
        return {}
    finally:
        os.close(fd)
