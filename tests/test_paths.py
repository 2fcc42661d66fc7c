"""Where the daemon lives by default, and refusing folders another user owns."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
from legato.common import paths
from legato.server.daemon import Config, Daemon


def someone_elses_dir(tmp: Path) -> Path:
    """A directory owned by another user: made and given away as root, else '/'."""
    if os.getuid() == 0:
        path = tmp / "theirs"
        path.mkdir()
        os.chown(path, 65534, 65534)
        return path
    return Path("/")


def test_socket_goes_to_the_xdg_runtime_dir_when_there_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("LEGATO_ADDRESS", raising=False)
    assert paths.default_runtime_dir() == tmp_path / "legato"
    assert paths.default_address() == f"unix:{tmp_path / 'legato' / 'legato.sock'}"


def test_without_a_runtime_dir_the_socket_goes_to_a_per_user_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert paths.default_runtime_dir() == tmp_path / f"legato-{os.getuid()}"


def test_client_refuses_a_default_socket_folder_another_user_owns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = someone_elses_dir(tmp_path)
    monkeypatch.delenv("LEGATO_ADDRESS", raising=False)
    monkeypatch.setattr(paths, "default_runtime_dir", lambda: theirs)
    with pytest.raises(paths.NotOwned, match="belongs to user id"):
        paths.default_address()


async def test_daemon_refuses_a_data_dir_another_user_owns(tmp_path: Path) -> None:
    theirs = someone_elses_dir(tmp_path)
    with pytest.raises(paths.NotOwned):
        Daemon(Config(data_dir=theirs, listen=f"unix:{tmp_path}/s.sock"))
