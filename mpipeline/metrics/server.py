"""The supervisor's ``/metrics`` endpoint: prometheus_client's own server, our collector.

The server runs in one daemon thread of the supervisor. That is safe here:
children are started with ``spawn`` (never ``fork``, RELIABILITY §2.3), and
always from the main thread, so PDEATHSIG stays tied to the thread that
lives as long as the run. The registry holds only our collector: the
supervisor's own process metrics would be noise next to per-replica ones.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class MetricsServer:
    def __init__(self, host: str, port: int, collector: Collector) -> None:
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Listen and serve; returns the URL (with the real port when ``port`` is 0).

        :raises OSError: when the address is taken or cannot be bound.
        """
        self._server, self._thread = start_http_server(self.port, self.host, self.registry)
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
