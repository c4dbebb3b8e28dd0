"""Live reconfiguration against a real supervisor: ``mpipeline reload`` and SIGHUP (issue 18.3).

A reload re-reads the file the run started from. These tests rewrite that
file and ask: live fields (the gateway's timeouts and rate limits, the log
level) are applied with the listening socket open and the requests in
flight answered; a stage's table is applied by a rolling restart of that
stage's replicas only; an invalid file, or one that needs a full restart,
changes nothing and says why, with a non-zero exit; and the config version
shows in ``status``, ``/v1/status`` and ``/metrics``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from mpipeline.config import dump_toml
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _reload(sp: SupervisorProcess, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mpipeline", "reload", "--run-dir", str(sp.run_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _start_reload(sp: SupervisorProcess) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mpipeline", "reload", "--run-dir", str(sp.run_dir)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _outcome(sp: SupervisorProcess) -> dict[str, Any]:
    """The latest attempt in ``reload.json`` (attempt 0 before any reload)."""
    try:
        outcomes: list[dict[str, Any]] = json.loads((sp.run_dir / "reload.json").read_text())[
            "outcomes"
        ]
    except FileNotFoundError:
        return {"attempt": 0}
    return outcomes[-1]


def _status(sp: SupervisorProcess) -> dict[str, object]:
    cmd = [sys.executable, "-m", "mpipeline", "status", "--run-dir", str(sp.run_dir), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    out: dict[str, object] = json.loads(done.stdout)
    return out


def _rewrite(configs: ConfigFactory, path: Path, overrides: dict[str, object]) -> None:
    path.write_text(dump_toml(configs(overrides)), encoding="utf-8")


class _Traffic:
    """Chat completions from four threads, each one request after another, until stopped."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self.answers: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._load, args=(n,)) for n in range(4)]

    def __enter__(self) -> _Traffic:
        for t in self._threads:
            t.start()
        wait_until(lambda: len(self.answers) >= 4, 30, "requests before the reload")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.client.close()

    def more(self, n: int) -> None:
        """Wait for ``n`` more answers (requests sent after the reload)."""
        before = len(self.answers)
        wait_until(lambda: len(self.answers) >= before + n, 30, "requests after the reload")

    def _load(self, n: int) -> None:
        while not self._stop.is_set():
            try:
                reply = self.client.chat.completions.create(
                    model="mpipeline-echo",
                    messages=[{"role": "user", "content": f"hello world {n}"}],
                )
                self.answers.append(reply.choices[0].message.content or "")
            except Exception as exc:  # any failure fails the test
                self.errors.append(exc)


def test_live_and_rolling_changes_keep_the_socket_and_answer_every_request(
    start_supervisor: SupervisorFactory, configs: ConfigFactory
) -> None:
    base: dict[str, object] = {
        "gateway.replicas": 1,
        "gateway.rate_limit.requests_per_s": 1000.0,
        "stages.inference.echo.token_delay_ms": 20.0,
    }
    sp = start_supervisor(base)
    with sp.explain():
        url = f"{sp.url}/v1"
        listeners = _listening_pids(sp)
        post_pid, assemble_pid = sp.replica_pid("post-0"), sp.replica_pid("assemble-0")
        gateway_pid = sp.replica_pid("gateway-0")
        # Live fields and a stage's rolling restart: not one request may fail,
        # so the client does not retry.
        changed = {
            **base,
            "gateway.timeout_s": 12.0,
            "stages.post.max_output_chars": 5,
            "stages.stream.cpus": [1],  # a stage's cores: new processes, one by one
        }
        with _Traffic(openai.OpenAI(base_url=url, api_key="-", max_retries=0)) as traffic:
            _rewrite(configs, sp.config_path, changed)
            done = _reload(sp, "--log-level", "debug")
            assert done.returncode == 0, done.stderr
            assert "config version 1 applied" in done.stdout
            assert "live: gateway.timeout_s" in done.stdout
            assert "drained): post-0, stream-0\n" in done.stdout
            traffic.more(4)
        assert traffic.errors == []
        # post-0 and stream-0 were replaced (drained first); assemble and the gateway
        # were left alone.
        assert sp.replica_pid("post-0") != post_pid
        assert sp.replica_pid("assemble-0") == assemble_pid
        assert psutil.Process(sp.replica_pid("stream-0")).cpu_affinity() == [1]
        assert _listening_pids(sp) == listeners
        assert traffic.answers[-1] == "hello"  # the new post rule: 5 characters at most

        status = _status(sp)
        assert status["config_version"] == 1
        assert isinstance(status["reload"], dict) and status["reload"]["state"] == "applied"
        assert status["reload"]["log_level"] == "debug"
        body = httpx.get(f"{sp.url}/v1/status", timeout=10).json()
        assert body["pipeline"]["config_version"] == 1
        assert {r["config_version"] for r in body["pipeline"]["replicas"]} == {1}
        scrape = httpx.get(f"{sp.state['metrics_url']}", timeout=10).text
        assert "mpipeline_config_version 1.0" in scrape
        with sp.control() as ctl:
            assert ctl.log_level == 10  # logging.DEBUG, which every process follows

        # A gateway setting read at start: the gateway replica is restarted,
        # drained, while the supervisor holds the socket. Its idle keep-alive
        # connections close, which the SDK's own retry of a connection error covers.
        changed["gateway.jobs_ttl_s"] = 60.0
        with _Traffic(openai.OpenAI(base_url=url, api_key="-")) as traffic:
            _rewrite(configs, sp.config_path, changed)
            command = _start_reload(sp)
            # A second SIGHUP while the gateway restarts waits for it to finish.
            wait_until(lambda: _outcome(sp)["attempt"] == 2, 30, "the second reload")
            sp.send(signal.SIGHUP)
            out, err = command.communicate(timeout=60)
            assert command.returncode == 0, err
            assert "config version 2 applied" in out
            assert "restarted (rolling, drained): gateway-0" in out
            traffic.more(4)
        assert traffic.errors == []
        sp.wait_log("reload: deferred until the reload in progress is applied", 10)
        third = wait_until(lambda: _outcome(sp)["attempt"] == 3 and _outcome(sp), 30, "a third")
        assert third["state"] == "applied" and third["changed"] == []
        gateway = sp.replica_pid("gateway-0")
        assert gateway != gateway_pid
        assert _listening_pids(sp) == (listeners - {gateway_pid}) | {gateway}

        # A tighter rate limit is live: the shared buckets take it at once.
        changed |= {"gateway.rate_limit.requests_per_s": 0.5, "gateway.rate_limit.burst": 1}
        _rewrite(configs, sp.config_path, changed)
        done = _reload(sp)
        assert done.returncode == 0, done.stderr
        assert "config version 3 applied" in done.stdout
        assert _outcome(sp)["attempt"] == 4
        codes = [
            httpx.post(f"{sp.url}/v1/prompt", json={"input": "x"}, timeout=10).status_code
            for _ in range(3)
        ]
        assert codes.count(429) >= 2, codes


def test_an_invalid_file_or_a_full_restart_change_is_refused_and_changes_nothing(
    start_supervisor: SupervisorFactory, configs: ConfigFactory
) -> None:
    sp = start_supervisor()
    with sp.explain():
        pids = {name: sp.replica_pid(name) for name in sp.replica_names()}
        good = sp.config_path.read_text()

        sp.config_path.write_text(good + "\n[stages.post]\nmax_output_chars = -3\n")
        done = _reload(sp)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "reload refused" in done.stderr and "invalid configuration" in done.stderr
        assert "nothing was changed" in done.stderr

        _rewrite(configs, sp.config_path, {"stages.inference.replicas": 2})
        done = _reload(sp)
        assert done.returncode == 1
        assert "needs a full restart" in done.stderr
        assert "stages.inference.replicas" in done.stderr

        # SIGHUP straight to the supervisor takes the same path.
        sp.config_path.write_text("[gateway\n")
        sp.send(signal.SIGHUP)
        sp.wait_log("reload refused: invalid configuration", 15)

        def third_attempt() -> dict[str, object] | None:
            reload = _status(sp)["reload"]
            assert isinstance(reload, dict)
            return reload if reload["attempt"] == 3 else None

        reload = wait_until(third_attempt, 15, "the SIGHUP's outcome")
        assert reload["state"] == "refused" and "TOML syntax" in str(reload["reason"])
        status = _status(sp)
        assert status["config_version"] == 0
        assert {name: sp.replica_pid(name) for name in sp.replica_names()} == pids
        assert sp.running()

        # --set: live fields only, over the file until the next reload re-reads it.
        sp.config_path.write_text(good)
        done = _reload(sp, "--set", "stages.post.max_output_chars=3")
        assert done.returncode == 2
        assert "only live settings can be set; not stages.post.max_output_chars" in done.stderr
        done = _reload(sp, "--set", "gateway.timeout_s=-1")
        assert done.returncode == 2 and "command line" in done.stderr
        done = _reload(sp, "--set", "supervisor.drain_timeout_s=7")
        assert done.returncode == 0, done.stderr
        assert "config version 1 applied" in done.stdout
        assert "supervisor.drain_timeout_s=7" in done.stdout
        done = _reload(sp)
        assert done.returncode == 0, done.stderr
        assert "config version 2 applied" in done.stdout
        assert "live: supervisor.drain_timeout_s" in done.stdout
        assert {name: sp.replica_pid(name) for name in sp.replica_names()} == pids


def _listening_pids(sp: SupervisorProcess) -> set[int]:
    """The processes holding the gateway's listening socket."""
    port = int(sp.url.rsplit(":", 1)[1])
    out = set()
    for proc in [psutil.Process(sp.pid), *sp.descendants()]:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                out.add(proc.pid)
    return out
