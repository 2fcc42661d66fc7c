"""Fixtures of the reliability suite: restartable daemon processes on short temp paths."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from reliability.harness import DaemonProcess

MakeDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temp dir with a short path: unix socket paths are limited to ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="lgr-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def make_daemon(workdir: Path) -> AsyncIterator[MakeDaemon]:
    """`make_daemon(grace=2.0, args=[...], database="")` → a not yet started
    `DaemonProcess` in `workdir`.

    Every daemon made is killed at teardown if it still runs, whatever the test did.
    """
    made: list[DaemonProcess] = []

    def make(
        *, name: str = "d", grace: float = 2.0, args: Sequence[str] = (), database: str = ""
    ) -> DaemonProcess:
        root = workdir / name
        root.mkdir()
        daemon = DaemonProcess(root, grace=grace, args=args, database=database)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        await daemon.close()
