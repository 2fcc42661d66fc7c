"""legato's web UI: every agent's tasks live in a browser, and a hand to step in.

`legato ui` serves it on loopback. It is a client of the daemon like any
other (the admin key by default), so it works whatever the daemon's backend:

    server     start, the link with its token, shutdown
    app        the page, the JSON endpoints, the event stream
    security   the token, sessions, CSRF, Host and Origin checks
    feed       one page's events: one daemon watch, from the page's last seq
    wire       tasks, events and agents as the page's JSON
    static/    the page: plain ES modules and CSS, no build step
"""

from legato.ui.server import DEFAULT_LISTEN, UIConfig, run, serve

__all__ = ["DEFAULT_LISTEN", "UIConfig", "run", "serve"]
