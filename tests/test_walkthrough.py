"""What a new user walking through the README ran into: the CLI, onboarding and the bridge.

Each test runs the real `legato` command as a user with a private runtime dir
and data dir of their own (the `user` fixture of `test_self_start`), and stops
whatever daemon it started, by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from test_self_start import GUARD, User, user  # noqa: F401  (`user` is a fixture)


def _processes_with(marker: str) -> list[int]:
    """The pids of processes whose environment holds `marker` (this test's own dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


async def test_an_abbreviated_detach_starts_one_daemon(user: User) -> None:
    """Before, the child saw `--deta` (argparse takes abbreviations), detached again,
    and so on without end; the first `legato serve` never heard SERVING."""
    served = await asyncio.wait_for(user.legato("serve", "--deta"), 20)
    assert served.code == 0, served.stderr
    pid = user.daemon_pid()
    assert pid is not None and f"pid {pid}" in served.stdout
    assert _processes_with(f"LEGATO_DATA_DIR={user.data_dir}\0") == [pid]
