"""Real processes for the web UI's tests: `legato serve`, `legato ui`, and Chromium;
and a relay between them that counts the calls the UI makes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

LEGATO = Path(sys.executable).with_name("legato")
CHROMIUM = Path("/usr/bin/chromium")
# Without the three --disable flags Chromium keeps trying to reach the
# network; as root it needs --no-sandbox.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT = 20.0


def require_chromium() -> None:
    """Fails under CI, skips elsewhere, when the browser tests cannot run here."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (make install)")
    if missing:
        message = "the browser tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _read_line(process: subprocess.Popen[str], prefix: str, log: Path) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()  # the process prints it once it serves
    if not line.startswith(prefix):
        process.kill()
        raise AssertionError(f"no {prefix!r} line: {line!r}\n{log.read_text()}")
    return line.strip()


@dataclass
class DaemonProcess:
    """`legato serve` on a data dir and a unix socket; stop and start it again at will."""

    data_dir: Path
    socket: Path
    log: Path
    process: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [
                    *(str(LEGATO), "serve", "--data-dir", str(self.data_dir)),
                    *("--listen", self.address, "--grace", "1"),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        _read_line(self.process, "legato serving on", self.log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)
        self.process = None


@dataclass
class UIProcess:
    """`legato ui` on a loopback port; `link` is the line it printed, token and all.

    It reaches the daemon at `address` (default: the daemon's own).
    """

    daemon: DaemonProcess
    log: Path
    key: str | None = None
    address: str = ""
    port: int = 0
    link: str = ""
    process: subprocess.Popen[str] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return self.link.partition("#token=")[2]

    def start(self) -> None:
        argv = [str(LEGATO), "ui", "--address", self.address or self.daemon.address]
        argv += ["--listen", f"127.0.0.1:{self.port}"]
        if self.key:
            argv += ["--key", self.key]
        # Without --key, legato ui finds admin.key in the data dir, as the CLI does.
        env = {**os.environ, "LEGATO_DATA_DIR": str(self.daemon.data_dir), **self.extra_env}
        env.pop("LEGATO_AGENT_KEY", None)
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env
            )
        self.link = _read_line(self.process, "legato ui on ", self.log).removeprefix(
            "legato ui on "
        )
        self.port = urlsplit(self.link).port or 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)
        self.process = None

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """A plain HTTP request, with exactly the headers given (Host included)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            sent = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
            data = b"" if body is None else json.dumps(body).encode()
            if body is not None:
                sent.setdefault("Content-Type", "application/json")
            sent["Content-Length"] = str(len(data))
            for name, value in sent.items():
                connection.putheader(name, value)
            connection.endheaders(data)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def sign_in(self) -> tuple[str, str]:
        """Trades the token for a session, as the page does; the cookie and CSRF token."""
        status, headers, body = self.request(
            "POST", "/api/session", headers={"Origin": self.origin}, body={"token": self.token}
        )
        assert status == 200, body
        cookie = headers["set-cookie"].split(";")[0]
        return cookie, json.loads(body)["csrf"]


@contextmanager
def legato_processes(tmp: Path) -> Iterator[tuple[DaemonProcess, UIProcess]]:
    """A daemon and a UI over it (admin key), stopped at the end whatever happened."""
    daemon = DaemonProcess(tmp / "data", tmp / "run" / "legato.sock", tmp / "daemon.log")
    ui = UIProcess(daemon, tmp / "ui.log")
    try:
        daemon.start()
        ui.start()
        yield daemon, ui
    finally:
        for process in (ui, daemon):
            try:
                process.stop()
            except subprocess.TimeoutExpired:
                assert process.process is not None
                process.process.kill()


# HTTP/2, as gRPC speaks it: a client's connection opens with this preface, then
# frames, each a 9-byte header (length, type, flags, stream) and its payload.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_FRAME_HEADER = 9
_H2_HEADERS = 0x1


class CallCounter:
    """A relay on a unix socket to the daemon's that counts the calls its clients start.

    Every gRPC call, unary or streaming, starts with one HEADERS frame from the
    client (a client sends no trailers), so counting those counts calls.
    """

    def __init__(self, target: Path, listen: Path):
        self.target = target
        self.listen = listen
        self._calls = 0
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._open: list[socket.socket] = []

    @property
    def address(self) -> str:
        return f"unix:{self.listen}"

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    def __enter__(self) -> CallCounter:
        self._server.bind(str(self.listen))
        self._server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.close()
        for conn in self._open:
            conn.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed: the relay stops
                return
            daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                daemon.connect(str(self.target))
            except OSError:  # the daemon is down: so is this connection, as it would be
                client.close()
                daemon.close()
                continue
            self._open += [client, daemon]
            threading.Thread(target=self._relay, args=(client, daemon, True), daemon=True).start()
            threading.Thread(target=self._relay, args=(daemon, client, False), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        pending = b""
        skip = len(_H2_PREFACE)  # bytes still to pass before the next frame header
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if not count:
                    continue
                pending += data
                while True:
                    if skip:
                        taken = min(skip, len(pending))
                        pending, skip = pending[taken:], skip - taken
                        if skip:
                            break
                    if len(pending) < _H2_FRAME_HEADER:
                        break
                    length = int.from_bytes(pending[:3], "big")
                    if pending[3] == _H2_HEADERS:
                        with self._lock:
                            self._calls += 1
                    pending, skip = pending[_H2_FRAME_HEADER:], length
        except OSError:  # the other side closed, or the relay stopped
            pass
        finally:
            for conn in (source, sink):
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
