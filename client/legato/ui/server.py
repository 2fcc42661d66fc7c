"""`legato ui`: start the web UI on loopback, print its link, serve until stopped."""

from __future__ import annotations

import asyncio
import socket
import sys
import webbrowser
from dataclasses import dataclass
from types import FrameType

import uvicorn
from legato.client import AsyncClient, LegatoError
from legato.ui.app import UI
from legato.ui.security import Guard, HostNames, is_loopback

# A fixed port by default: a page left open reconnects to a restarted UI at
# the same address and resumes where it was.
DEFAULT_LISTEN = "127.0.0.1:8731"
# Seconds requests may take to finish on shutdown; event streams end at once.
SHUTDOWN_GRACE = 2


@dataclass(frozen=True, slots=True)
class UIConfig:
    """How to start the UI.

    Args:
        api_key: the key it acts with (an admin's sees everything).
        address: the daemon (None: LEGATO_ADDRESS or the default socket).
        listen: HOST:PORT; port 0 picks a free one.
        open_browser: open the link in the default browser once serving.
    """

    api_key: str
    address: str | None = None
    listen: str = DEFAULT_LISTEN
    open_browser: bool = False


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` → host and port; ValueError says what is wrong."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {listen!r}: give HOST:PORT, e.g. 127.0.0.1:8731")
    return host.strip("[]"), int(port)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)  # connections wait from now on, while uvicorn starts
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ui: UI):
        super().__init__(config)
        self._ui = ui

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Event streams never end by themselves; end them so shutdown is quick.
        self._ui.stop_streams()
        super().handle_exit(sig, frame)
        # A signal is how this server is meant to stop, as `legato serve` is:
        # exit 0 rather than have uvicorn raise the signal again afterwards.
        self._captured_signals.clear()


def _link(host: str, port: int, token: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/#token={token}"


async def serve(config: UIConfig) -> int:
    """Runs the UI until SIGINT/SIGTERM; returns the exit code."""
    try:
        host, port = parse_listen(config.listen)
    except ValueError as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 2
    try:
        client = await AsyncClient.connect(config.address, api_key=config.api_key)
    except (LegatoError, ValueError) as exc:  # the message says how to start the daemon
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    try:
        me = await client.whoami()
        try:
            sock = _bind(host, port)
        except OSError as exc:
            print(f"legato: cannot listen on {config.listen}: {exc.strerror}", file=sys.stderr)
            return 1
        port = sock.getsockname()[1]
        if not is_loopback(host):
            print(
                f"legato: warning: listening on {host}:{port}, not on loopback: anyone who can "
                f"reach it and has the link acts as agent {me.name}; there is no TLS",
                file=sys.stderr,
            )
        guard = Guard(config.api_key, port=port)
        ui = UI(client, guard, me, HostNames(host, port))
        link = _link(host, port, guard.token)
        print(f"legato ui on {link}", flush=True)
        if config.open_browser:
            webbrowser.open(link)
        server = _Server(
            uvicorn.Config(
                ui.app(),
                log_level="warning",
                access_log=False,
                lifespan="off",
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=SHUTDOWN_GRACE,
            ),
            ui,
        )
        await server.serve(sockets=[sock])
        return 0
    except LegatoError as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()


def run(config: UIConfig) -> int:
    """Blocking form of `serve`, for the CLI."""
    return asyncio.run(serve(config))
