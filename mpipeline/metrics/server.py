"""The supervisor's ``/metrics`` endpoint: prometheus_client's own server, our collector.

The server runs in one daemon thread of the supervisor. That is safe here:
children are started with ``spawn`` (never ``fork``, RELIABILITY §2.3), and
always from the main thread, so PDEATHSIG stays tied to the thread that
lives as long as the run. The registry holds only our collector: the
supervisor's own process metrics would be noise next to per-replica ones.

With a gateway token set (``gateway.auth_token_env``), ``/metrics`` wants it
too: the counters name routes, stages and error codes, and the request rate
is itself information. Prometheus sends it with ``authorization:
{credentials_file: ...}`` (the shipped prometheus.yml shows how). Without a
token, a metrics address beyond loopback is warned about once at start.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from mpipeline.auth import BearerAuth, open_bind_warning

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

log = logging.getLogger(__name__)


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape (prometheus_client's server is silent too)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _with_token(app: WsgiApp, auth: BearerAuth) -> WsgiApp:
    """``app`` behind the bearer token: 401 with ``WWW-Authenticate`` without it."""

    def guarded(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        if auth.allows(environ.get("HTTP_AUTHORIZATION")):
            return app(environ, start)
        body = b"missing or wrong bearer token\n"
        start(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("WWW-Authenticate", "Bearer"),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]

    return guarded


class MetricsServer:
    def __init__(
        self, host: str, port: int, collector: Collector, auth: BearerAuth | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._auth = auth if auth is not None else BearerAuth(None)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Listen and serve; returns the URL (with the real port when ``port`` is 0).

        :raises OSError: when the address is taken or cannot be bound.
        """
        warning = open_bind_warning(self.host, self._auth, "/metrics")
        if warning:
            log.warning("%s", warning)
        app: WsgiApp = make_wsgi_app(self.registry)
        if self._auth.enabled:
            app = _with_token(app, self._auth)
        family = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]

        class Server(ThreadingWSGIServer):
            address_family = family

        self._server = make_server(self.host, self.port, app, Server, handler_class=_Quiet)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        self.port = self._server.server_address[1]
        return self.url

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
