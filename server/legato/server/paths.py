"""Where the daemon keeps its files and listens by default.

Shared by the daemon and the client, so that a client run by the same user
finds the daemon with no configuration.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import platformdirs

APP = "legato"
SOCKET_NAME = "legato.sock"
DB_NAME = "legato.db"
LOCK_NAME = "legato.lock"


def default_data_dir() -> Path:
    """The per-user data directory (`LEGATO_DATA_DIR` overrides it)."""
    override = os.environ.get("LEGATO_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir(APP))


def default_runtime_dir() -> Path:
    """A per-user directory for the socket.

    The platform's runtime dir when it exists (e.g. /run/user/UID), else a
    per-user folder in the temp dir. Either way the daemon makes it 0700.
    """
    runtime = Path(platformdirs.user_runtime_dir(APP))
    if runtime.parent.is_dir() and os.access(runtime.parent, os.W_OK):
        return runtime
    return Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"


def default_address() -> str:
    """`LEGATO_ADDRESS`, or the unix socket of the default daemon."""
    return os.environ.get("LEGATO_ADDRESS") or f"unix:{default_runtime_dir() / SOCKET_NAME}"


def private_dir(path: Path) -> Path:
    """Creates `path` if needed and makes it accessible to its owner only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path
