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

The web dashboard (``metrics.dashboard``) is served by the same server when
one is given: its routes first, every other path to prometheus_client. Its
event streams are long-lived responses, so every connection gets a socket
timeout: a viewer (or a scraper) that stops reading is dropped after
``SOCKET_TIMEOUT_S`` instead of holding its thread for ever, and that drop,
like a client that hangs up, is not logged as a server error.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from mpipeline.auth import BearerAuth, open_bind_warning

if TYPE_CHECKING:
    from mpipeline.metrics.dashboard import Dashboard

# Bounds every read and write of a connection (a dashboard stream included).
SOCKET_TIMEOUT_S = 10.0

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

log = logging.getLogger(__name__)


class _GoneQuietly(ServerHandler):
    """A client that hung up or stopped reading is not a server error: no traceback.

    Only the socket's own errors are meant: anything else the app raises (an
    ``OSError`` reading a segment included) still gets its traceback and a 500.
    """

    def handle_error(self) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # the result was closed already; there is nobody to answer
        super().handle_error()


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape (prometheus_client's server is silent too)."""

    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        """``WSGIRequestHandler.handle`` with ``_GoneQuietly`` as the handler."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _GoneQuietly(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # a socket file, as the stdlib passes it
            self.get_stderr(),
            self.get_environ(),
            multithread=False,
        )
        handler.request_handler = self  # type: ignore[attr-defined]  # as the stdlib does
        handler.run(self.server.get_app())  # type: ignore[attr-defined]


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
        self,
        host: str,
        port: int,
        collector: Collector,
        auth: BearerAuth | None = None,
        dashboard: Dashboard | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._auth = auth if auth is not None else BearerAuth(None)
        self._dashboard = dashboard
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
        if self._dashboard is not None:
            app = self._dashboard.wrap(app)  # checks the token itself (?token= too)
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
        if self._dashboard is not None:
            log.info("web dashboard at %s", self.dashboard_url)
        return self.url

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def dashboard_url(self) -> str | None:
        """The web dashboard's page, when this server has one."""
        if self._dashboard is None:
            return None
        return self.url.removesuffix("/metrics") + "/dashboard"

    def stop(self) -> None:
        if self._server is None:
            return
        if self._dashboard is not None:
            self._dashboard.close()  # its streams end at their next wake-up
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
