"""A real Prometheus server on loopback for tests, scraping one target with our alerts loaded.

The dashboard and the alerts only mean something if a real Prometheus can
scrape the supervisor, store what it serves and evaluate the rules against it;
promtool alone never sees a live exposition. ``PrometheusServer`` runs the
``prometheus`` binary (Debian package ``prometheus``, installed by
scripts/setup.sh) as a child process on a free port, with a temporary config
that scrapes one target every second as job ``mpipeline``, loads
``config/prometheus/alerts.yml`` and evaluates it every second, and a
temporary TSDB directory. ``start()`` returns once ``/-/ready`` answers;
``query`` and ``wait_for`` read back through the HTTP API; ``stop()`` (also on
``with`` exit) terminates it and removes its files, however the test ends.
The first scrape lands about 5 s after start, not 1 s: Prometheus 2.x hands
new targets from service discovery to the scraper in 5 s batches.

The Debian package installs a system service too. Tests never use it: it
would scrape the default 127.0.0.1:9090, so ``scripts/setup.sh`` users should
keep it stopped (``systemctl disable --now prometheus``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from tests.conftest import require_binary
from tests.prometheus import ALERTS

Sample = dict[str, Any]
# Startup replays an empty WAL: about a second, more on a loaded 2-core CI box.
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
WAIT_TIMEOUT_S = 30.0
POLL_S = 0.1
HTTP_TIMEOUT_S = 5.0
SCRAPE_INTERVAL_S = 1.0
JOB = "mpipeline"
# Another process may take the free port between our probe and the server's bind.
PORT_ATTEMPTS = 3
PORT_TAKEN = "address already in use"
# The tests share a small box with benchmarks: one Go scheduler thread is plenty.
GO_ENV = {"GOMAXPROCS": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _timestamp(rfc3339: str) -> float:
    """Unix seconds of a Go RFC 3339 timestamp (3.11's fromisoformat drops nanoseconds)."""
    return datetime.fromisoformat(rfc3339).timestamp()


def _duration(seconds: float) -> str:
    """A Prometheus duration string ("1500ms") for ``seconds``."""
    return f"{max(1, round(seconds * 1000))}ms"


class PrometheusServer:
    """``prometheus`` scraping ``target`` ("host:port") as job ``job``; ``url`` is its base."""

    def __init__(
        self,
        target: str,
        *,
        job: str = JOB,
        metrics_path: str = "/metrics",
        rule_files: Sequence[Path] = (ALERTS,),
        scrape_interval_s: float = SCRAPE_INTERVAL_S,
        ready_timeout_s: float = READY_TIMEOUT_S,
        binary: str = "prometheus",
    ) -> None:
        self.target = target
        self.job = job
        self.metrics_path = metrics_path
        self.rule_files = tuple(rule_files)
        self.scrape_interval_s = scrape_interval_s
        self.ready_timeout_s = ready_timeout_s
        self.binary = binary
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None
        self._log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        """What the server has printed so far (for failure messages)."""
        path = self._log_path
        return path.read_text(errors="replace") if path and path.exists() else ""

    def config(self) -> dict[str, Any]:
        """The Prometheus configuration this server runs with (JSON is valid YAML)."""
        every = _duration(self.scrape_interval_s)
        return {
            "global": {
                "scrape_interval": every,
                "scrape_timeout": every,
                "evaluation_interval": every,
            },
            "rule_files": [str(Path(f).resolve()) for f in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": [self.target]}],
                }
            ],
        }

    def start(self) -> None:
        """Start the server and return once it is ready.

        :raises FileNotFoundError: if the ``prometheus`` binary is missing
        :raises RuntimeError: if it exits or is not ready within ``ready_timeout_s``
        """
        binary = shutil.which(self.binary)
        if binary is None:
            raise FileNotFoundError(f"{self.binary} not found: apt-get install prometheus")
        self._dir = tempfile.TemporaryDirectory(prefix="prometheus-")
        tmp = Path(self._dir.name)
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))
        self._http = httpx.Client(timeout=HTTP_TIMEOUT_S)
        try:
            for attempt in range(1, PORT_ATTEMPTS + 1):
                self.port = _free_port()
                self._log_path = tmp / f"prometheus-{attempt}.log"
                self._spawn(binary, config, tmp / "data")
                if self._wait_ready():
                    return
                self._proc = None  # lost the port race; it has exited
            raise RuntimeError(f"prometheus found no free port:\n{self.log}")
        except BaseException:
            self.stop()
            raise

    def _spawn(self, binary: str, config: Path, data: Path) -> None:
        args = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        assert self._log_path is not None
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **GO_ENV},
            )

    def _wait_ready(self) -> bool:
        """True once ``/-/ready`` answers 200; False if the port was taken.

        :raises RuntimeError: if it exits for another reason or is not ready in time
        """
        assert self._proc is not None and self._http is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if PORT_TAKEN in self.log:
                    return False
                raise RuntimeError(f"prometheus exited {self._proc.returncode}:\n{self.log}")
            try:
                if self._http.get(f"{self.url}/-/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        raise RuntimeError(f"prometheus not ready in {self.ready_timeout_s}s:\n{self.log}")

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful ``/api/v1/<path>`` answer.

        :raises RuntimeError: if the server is not running or the API reports an error
        """
        if self._http is None or self._proc is None:
            raise RuntimeError("prometheus is not running")
        response = self._http.get(f"{self.url}/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"/api/v1/{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluate PromQL ``expr`` now: ``[{"metric": {...}, "value": [ts, "v"]}, ...]``.

        A scalar or string result comes back as one sample with no labels.
        """
        data = self.api("query", query=expr)
        if data["resultType"] in ("vector", "matrix"):
            result: list[Sample] = data["result"]
            return result
        return [{"metric": {}, "value": data["result"]}]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[Sample]], object] = bool,
        timeout: float = WAIT_TIMEOUT_S,
    ) -> list[Sample]:
        """Query ``expr`` until ``predicate`` holds for the result (by default: not empty).

        :raises AssertionError: on timeout, with the last result and the scrape target's state
        :raises RuntimeError: if the server exits meanwhile
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self._proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.1f}s waiting for {expr!r}; last result "
                    f"{result}; targets {self.target_health()}\n--- prometheus log ---\n"
                    f"{self.log[-4000:]}"
                )
            time.sleep(POLL_S)

    def target_health(self) -> list[dict[str, Any]]:
        """Each scrape target's health and last error, to explain an empty query."""
        active = self.api("targets")["activeTargets"]
        keys = ("scrapeUrl", "health", "lastError")
        return [{k: t.get(k) for k in keys} for t in active]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (``name``, ``health``, ``lastError``, ``state``, ...), all groups."""
        groups = self.api("rules")["groups"]
        return [rule | {"group": g["name"]} for g in groups for rule in g["rules"]]

    def server_time(self) -> float:
        """The server's clock (Unix seconds), which stamps its samples and evaluations."""
        return float(self.query("time()")[0]["value"][1])

    def wait_evaluated(self, timeout: float = WAIT_TIMEOUT_S) -> list[dict[str, Any]]:
        """Wait until every rule has been evaluated after this call; return the rules.

        Rules are evaluated on their own clock, so data a query already sees may
        not have reached the ``ALERTS`` series yet; after this returns, it has.

        :raises AssertionError: on timeout, or if a rule failed to evaluate
        """
        since = self.server_time()

        def evaluated(_: list[Sample]) -> bool:
            rules = self.rules()
            return bool(rules) and all(_timestamp(r["lastEvaluation"]) > since for r in rules)

        self.wait_for("vector(1)", evaluated, timeout)
        rules = self.rules()
        broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not broken, f"rules failed to evaluate: {broken}"
        return rules

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and remove its files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture
def start_prometheus() -> Iterator[Callable[[str], PrometheusServer]]:
    """Factory of started Prometheus servers scraping a target; all stopped afterwards.

    Skips the test where the ``prometheus`` binary is missing; fails it under CI.
    """
    require_binary("prometheus", "apt-get install prometheus (scripts/setup.sh)")
    started: list[PrometheusServer] = []

    def start(target: str) -> PrometheusServer:
        server = PrometheusServer(target)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


__all__ = ["JOB", "PrometheusServer", "Sample", "start_prometheus"]
