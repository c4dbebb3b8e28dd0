"""The dashboard's routes, as a WSGI app in front of ``/metrics`` on the same server.

Why WSGI on the metrics thread server rather than an asyncio app: the
supervisor's main thread watches replicas and must never wait on a viewer,
and prometheus_client's ``ThreadingWSGIServer`` already gives each request a
daemon thread of its own. A stream is therefore a thread that wakes once per
interval; ``Feed`` caps how many there are, and the server's socket timeout
(``metrics.server``) bounds every write, so a viewer that stops reading is
dropped after that timeout instead of holding anything the pipeline needs.

Routes (GET only): ``/dashboard`` the page; ``/dashboard/events`` the live
updates as server-sent events; ``/dashboard/snapshot.json`` one update;
``/dashboard/static/*`` the page's script and style; ``/`` and
``/dashboard/`` redirect to the page. With a token set every route but the
static files wants it, as ``Authorization: Bearer`` or, because a browser's
address bar and ``EventSource`` cannot send headers, as ``?token=``. The
static files hold no data (they are the package's own code, the same for
every install), so they are served openly: the page can load them with
plain relative URLs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from mpipeline.auth import BearerAuth
from mpipeline.metrics.dashboard._feed import Feed

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

PAGE = "/dashboard"
EVENTS = PAGE + "/events"
SNAPSHOT = PAGE + "/snapshot.json"
STATIC = PAGE + "/static/"
DEFAULT_INTERVAL_S = 1.0
# Faster than this would cost the supervisor more than a person can see; slower, and
# the page would look dead.
MIN_INTERVAL_S = 0.2
MAX_INTERVAL_S = 60.0
# How long a browser waits before it reconnects a dropped stream.
RETRY_MS = 2000
_TYPES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Everything the page needs comes from this server; nothing may frame it.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_COMMON = [
    ("X-Content-Type-Options", "nosniff"),
    # The token may be in the page's URL: never send it on to another site.
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


def _load(name: str) -> bytes:
    return (resources.files("mpipeline.metrics.dashboard") / "static" / name).read_bytes()


class Dashboard:
    """The dashboard's WSGI routes; anything else goes to the app it wraps (``/metrics``).

    The static files are read once here, so an install that lacks them fails
    when the supervisor starts, not when someone first opens the page.
    """

    def __init__(self, feed: Feed, auth: BearerAuth) -> None:
        self.feed = feed
        self._auth = auth
        self._page = _load("index.html")
        self._static = {name: _load(name) for name in _TYPES}

    def wrap(self, fallback: WsgiApp) -> WsgiApp:
        """A WSGI app serving the dashboard's paths and ``fallback`` for every other."""

        def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/" or path == PAGE or path.startswith(PAGE + "/"):
                return self(environ, start)
            return fallback(environ, start)

        return app

    def close(self) -> None:
        """End the open streams (the server is stopping)."""
        self.feed.close()

    def __call__(self, environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "GET":
            return _plain(
                start,
                "405 Method Not Allowed",
                "the dashboard is read-only: GET\n",
                [("Allow", "GET")],
            )
        if path.startswith(STATIC):
            return self._file(start, path.removeprefix(STATIC))
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if not self._allowed(environ, query):
            return _plain(
                start,
                "401 Unauthorized",
                "missing or wrong bearer token (send Authorization: Bearer, "
                "or open the page with ?token=)\n",
                [("WWW-Authenticate", "Bearer")],
            )
        if path in ("/", PAGE + "/"):
            qs = environ.get("QUERY_STRING", "")
            start("302 Found", [("Location", PAGE + (f"?{qs}" if qs else "")), *_COMMON])
            return [b""]
        if path == PAGE:
            headers = [("Content-Security-Policy", _CSP), ("X-Frame-Options", "DENY")]
            return _send(start, "200 OK", "text/html; charset=utf-8", self._page, headers)
        if path == SNAPSHOT:
            _, doc = self.feed.latest(MIN_INTERVAL_S)
            return _send(start, "200 OK", "application/json", doc)
        if path == EVENTS:
            return self._events(start, query)
        return _plain(start, "404 Not Found", f"no dashboard route {path}\n")

    def _allowed(self, environ: dict[str, Any], query: dict[str, list[str]]) -> bool:
        if self._auth.allows(environ.get("HTTP_AUTHORIZATION")):
            return True
        # Compared in constant time by BearerAuth; never logged (the server logs no requests).
        tokens = query.get("token", [])
        return len(tokens) == 1 and self._auth.allows_key(tokens[0])

    def _file(self, start: Callable[..., Any], name: str) -> Iterable[bytes]:
        body = self._static.get(name)
        if body is None:
            return _plain(start, "404 Not Found", f"no dashboard file {name}\n")
        return _send(start, "200 OK", _TYPES[name], body)

    def _events(self, start: Callable[..., Any], query: dict[str, list[str]]) -> Iterable[bytes]:
        interval = _interval(query.get("interval", []))
        if interval is None:
            return _plain(
                start,
                "400 Bad Request",
                f"interval must be one number of seconds from {MIN_INTERVAL_S} to "
                f"{MAX_INTERVAL_S}\n",
            )
        if not self.feed.open_stream():
            return _plain(
                start,
                "503 Service Unavailable",
                f"too many dashboard streams open (at most {self.feed.max_streams}); "
                "close one or use /dashboard/snapshot.json\n",
                [("Retry-After", "5")],
            )
        stream = _Stream(self.feed, interval)
        headers = [("Content-Type", "text/event-stream; charset=utf-8"), *_COMMON]
        # Proxies such as nginx would otherwise hold the events back in a buffer.
        start("200 OK", [*headers, ("X-Accel-Buffering", "no")])
        return stream


class _Stream:
    """One viewer's events; ``close`` (called by the server however the stream ends,
    the client gone or a write timed out included) gives its slot back."""

    def __init__(self, feed: Feed, interval: float) -> None:
        self._feed = feed
        self._interval = interval
        self._open = True
        self._events = self._run()

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def _run(self) -> Generator[bytes, None, None]:
        yield b"retry: %d\n\n" % RETRY_MS
        while not self._feed.closed:
            # Half an interval: an update another viewer read a moment ago is fresh enough.
            seq, doc = self._feed.latest(self._interval / 2)
            yield b"id: %d\ndata: %s\n\n" % (seq, doc)
            if self._feed.wait(self._interval):
                return

    def close(self) -> None:
        if self._open:
            self._open = False
            self._events.close()
            self._feed.close_stream()


def _interval(values: list[str]) -> float | None:
    if not values:
        return DEFAULT_INTERVAL_S
    if len(values) != 1:
        return None
    try:
        seconds = float(values[0])
    except ValueError:
        return None
    if not math.isfinite(seconds) or not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
        return None
    return seconds


def _send(
    start: Callable[..., Any],
    status: str,
    content_type: str,
    body: bytes,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *_COMMON]
    start(status, [*headers, *(extra or [])])
    return [body]


def _plain(
    start: Callable[..., Any], status: str, text: str, extra: list[tuple[str, str]] | None = None
) -> list[bytes]:
    return _send(start, status, "text/plain; charset=utf-8", text.encode(), extra)
