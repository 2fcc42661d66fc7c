"""Who may use the web UI: the start token, sessions, CSRF, and Host/Origin checks.

- `legato ui` prints a link with a random token in its fragment (never sent
  to the server by the browser, never in logs). The page posts it once to
  `/api/session` and gets a session cookie: HttpOnly (scripts cannot read it),
  SameSite=Strict (no other site's page can make the browser send it).
- Sessions are signed, not stored: the signing key is derived from the API key
  the UI acts with, so a session outlives a restart of `legato ui` (an open
  page reconnects and resumes) and ends when the key is rotated. Sessions
  expire after `SESSION_SECONDS`.
- Every request must name this server in `Host` (a DNS-rebinding page names its
  own host) and, if it has an `Origin`, have this server's origin; a browser
  that says `Sec-Fetch-Site: cross-site` or `same-site` is refused too.
- Requests that change something (POST) also need the session's CSRF token in
  the `X-Legato-CSRF` header; a page can read it only from this origin.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_HEADER = "x-legato-csrf"
SESSION_SECONDS = 24 * 3600
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# Fetches a browser marks as coming from this origin, or typed into the address bar.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, brackets allowed) stays on this machine."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostNames:
    """The `Host` values that name this server.

    Its own address and, on loopback, the loopback names. Listening on every
    interface (0.0.0.0, ::) it also answers to any IP address with its port:
    an address cannot be rebound to another site the way a DNS name can.
    """

    def __init__(self, host: str, port: int):
        self.port = port
        name = host.strip("[]")
        self.wildcard = name in ("0.0.0.0", "::")  # noqa: S104 (a comparison, not a bind)
        shown = f"[{name}]" if ":" in name else name
        names = {shown, *_LOOPBACK_NAMES} if is_loopback(host) or self.wildcard else {shown}
        self.exact = frozenset(f"{n}:{port}" for n in names)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        value = value.lower()
        if value in self.exact:
            return True
        if not self.wildcard:
            return False
        name, _, port = value.rpartition(":")
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return port == str(self.port)


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser."""

    id: str
    csrf: str


class Guard:
    """Issues and checks the start token, session cookies and CSRF tokens."""

    def __init__(self, api_key: str, *, port: int, token: str | None = None):
        # Per start: the link printed this time, and only it, opens a session.
        self.token = token or secrets.token_urlsafe(32)
        # Browsers keep cookies per host, not per port: two UIs on one host
        # (an admin's, an agent's) must not overwrite each other's session.
        self.cookie = f"legato_ui_{port}"
        # The key never leaves the process; only MACs made with a key derived
        # from it reach the browser.
        self._secret = hashlib.sha256(b"legato-ui-session\0" + api_key.encode()).digest()

    def _mac(self, *parts: str) -> str:
        message = "\0".join(parts).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def token_matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def new_cookie(self, now: float | None = None) -> tuple[str, Session]:
        """A fresh session: the cookie value and the session it opens."""
        session_id = secrets.token_urlsafe(18)
        expires = str(int((now or time.time()) + SESSION_SECONDS))
        value = f"{session_id}.{expires}.{self._mac('session', session_id, expires)}"
        return value, self._session(session_id)

    def session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie proves, or None (missing, forged or expired)."""
        if not cookie or cookie.count(".") != 2:
            return None
        session_id, expires, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session", session_id, expires)):
            return None
        if not expires.isdigit() or int(expires) < (now or time.time()):
            return None
        return self._session(session_id)

    def _session(self, session_id: str) -> Session:
        return Session(session_id, self._mac("csrf", session_id))


def _refuse(status: int, message: str) -> PlainTextResponse:
    return PlainTextResponse(message + "\n", status_code=status)


# Everything is served from this origin: no inline script, no other site, no framing.
_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class RequestGuard:
    """ASGI middleware: 403 for a foreign Host, Origin or fetch site, on every request;
    and the browser policy headers on every response."""

    def __init__(self, app: ASGIApp, hosts: HostNames):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        headers = Headers(scope=scope)
        refusal = self.refusal(headers, scope["method"])
        if refusal is not None:
            await _refuse(403, refusal)(scope, receive, with_policy)
            return
        await self.app(scope, receive, with_policy)

    def refusal(self, headers: Headers, method: str) -> str | None:
        """Why a request is refused, or None."""
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return "forbidden: this server answers only to its own address (Host)"
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host}":
            return "forbidden: requests from other sites are refused (Origin)"
        if origin is None and method in _MUTATING:
            return "forbidden: a request that changes something must say its Origin"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in _OWN_FETCH_SITES:
            return "forbidden: requests from other sites are refused (Sec-Fetch-Site)"
        return None


def unauthorized() -> JSONResponse:
    return JSONResponse(
        {"error": "not signed in: open the link `legato ui` printed (it carries the token)"},
        status_code=401,
    )


def csrf_failed() -> JSONResponse:
    return JSONResponse(
        {"error": f"forbidden: the {CSRF_HEADER} header is missing or wrong"}, status_code=403
    )
