"""Gateway replicas run by the supervisor on one socket it binds (RELIABILITY #3, #30, #33, #36).

Each test starts ``mpipeline run`` with ``gateway.replicas`` HTTP processes on
port 0; the bound URL is in the run's state file. These are the behaviours
only a supervised gateway has: a shared listening socket that survives a
gateway crash, restarts, readiness over every process, the drain that closes
the listener, and a client hang-up that stops the model's work.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable

import httpx
import psutil
import pytest

from mpipeline.control import R_INFLIGHT, R_RESTARTS, R_STATE, ReplicaState
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    run_segments,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


def _start(start_supervisor: SupervisorFactory, **overrides: object) -> SupervisorProcess:
    return start_supervisor({"gateway.replicas": 2, **overrides})


def _gateway_pids(sp: SupervisorProcess) -> list[int]:
    return [sp.replica_pid(f"gateway-{g}") for g in range(2)]


def test_two_gateways_share_the_supervisors_socket_on_loopback(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = _start(start_supervisor)
    with sp.explain():
        url = sp.url
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        with httpx.Client(base_url=url, timeout=10) as client:
            texts = {
                client.post("/v1/prompt", json={"input": f"n {i}"}).json()["text"]
                for i in range(20)
            }
        assert texts == {f"n {i}" for i in range(20)}
        # One listening socket, inherited: the supervisor and both gateways hold it,
        # all on loopback (RELIABILITY #36), none with SO_REUSEPORT.
        holders = set()
        for proc in [psutil.Process(sp.pid), *sp.descendants()]:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    assert conn.laddr.ip == "127.0.0.1"
                    holders.add(proc.pid)
        assert holders == {sp.pid, *_gateway_pids(sp)}
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError):
                probe.bind(("127.0.0.1", port))


def test_a_killed_gateway_is_restarted_and_the_port_never_closes(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = _start(start_supervisor, **{"stages.inference.echo.token_delay_ms": 2.0})
    with sp.explain():
        url = sp.url
        errors: list[BaseException] = []
        answered = [0]
        stop = threading.Event()

        def load() -> None:
            # New connection per request: after the kill, the survivor must serve.
            while not stop.is_set():
                try:
                    reply = httpx.post(f"{url}/v1/prompt", json={"input": "load"}, timeout=10)
                    if reply.status_code == 200:
                        answered[0] += 1
                except httpx.TransportError:
                    pass  # a connection the killed gateway held: reset, not a hang
                except BaseException as exc:
                    errors.append(exc)

        thread = threading.Thread(target=load)
        thread.start()
        try:
            wait_until(lambda: answered[0] >= 10, 30, "requests before the kill")
            victim = sp.replica_pid("gateway-0")
            psutil.Process(victim).kill()
            killed_at = time.monotonic()
            before = answered[0]
            wait_until(lambda: answered[0] >= before + 10, 30, "requests after the kill")
            new_pid = sp.wait_replaced("gateway-0", victim)
            restarted_in = time.monotonic() - killed_at
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors
        assert new_pid != victim
        assert restarted_in < 10  # 1 s on a quiet box; CI shares 2 cores
        with sp.control() as ctl:
            assert ctl.get(sp.slot("gateway-0"), R_RESTARTS) == 1
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


def test_a_client_hang_up_stops_the_work_in_the_shard(start_supervisor: SupervisorFactory) -> None:
    """RELIABILITY #22: the stream would take 10 s; the shard lets go within a second."""
    sp = start_supervisor(
        {
            "gateway.replicas": 1,
            "stages.inference.echo.token_delay_ms": 50.0,
            "stages.inference.echo.max_tokens": 200,
        }
    )
    with sp.explain():
        shard = sp.slot("inference-0")

        def shard_inflight() -> int:
            with sp.control() as ctl:
                return ctl.get(shard, R_INFLIGHT)

        words = " ".join(f"w{i}" for i in range(200))
        body = {"input": words, "stream": True}
        with httpx.Client(base_url=sp.url, timeout=10) as client:
            with client.stream("POST", "/v1/prompt", json=body) as reply:
                chunks = 0
                for line in reply.iter_lines():
                    if line.startswith("event: chunk"):
                        chunks += 1
                    if chunks == 3:
                        break
            assert shard_inflight() == 1
        left = time.monotonic()
        wait_until(lambda: shard_inflight() == 0, 5, "the shard to drop the request")
        assert time.monotonic() - left < 2.0
        # The gateway still serves.
        reply = httpx.post(f"{sp.url}/v1/prompt", json={"input": "after"}, timeout=30)
        assert reply.json()["text"] == "after"


def test_sigterm_closes_the_listener_then_drains_and_leaves_nothing(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = _start(start_supervisor, **{"stages.inference.echo.token_delay_ms": 100.0})
    # 15 tokens x 100 ms (echo's max_tokens is 16): in the shard for 1.5 s.
    words = " ".join("abcdefghijklmno")
    with sp.explain():
        url = sp.url
        port = int(url.rsplit(":", 1)[1])
        shard = sp.slot("inference-0")
        result: dict[str, httpx.Response] = {}

        def slow() -> None:
            result["reply"] = httpx.post(f"{url}/v1/prompt", json={"input": words}, timeout=30)

        def in_the_shard() -> bool:
            assert thread.is_alive(), "the request ended before the shard was seen holding it"
            with sp.control() as ctl:
                return ctl.get(shard, R_INFLIGHT) == 1

        thread = threading.Thread(target=slow)
        thread.start()
        wait_until(in_the_shard, 10, "the request to reach the shard")
        sp.send(signal.SIGTERM)

        def refused() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return False
            except OSError:
                return True

        wait_until(refused, 10, "the listener to close")
        thread.join(30)
        # The request in flight when the drain began still got its answer.
        assert result["reply"].status_code == 200
        assert result["reply"].json()["text"] == words
        assert sp.wait_exit(30) == 0
        assert run_segments(sp.run_id) == []
        with socket.socket() as again:  # I5: the port is free at once
            again.bind(("127.0.0.1", port))


def test_readyz_follows_every_stage_replica(start_supervisor: SupervisorFactory) -> None:
    sp = start_supervisor(
        {
            "gateway.replicas": 1,
            "supervisor.backoff_initial_s": 1.0,
            "supervisor.backoff_max_s": 2.0,
        }
    )
    with sp.explain():
        url = sp.url
        victim = sp.replica_pid("post-0")
        psutil.Process(victim).kill()

        def status() -> Callable[[], bool]:
            def check() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    reply = httpx.get(f"{url}/readyz", timeout=2)
                    return reply.status_code == 503 and "post-0" in reply.json()["reason"]
                return False

            return check

        wait_until(status(), 10, "/readyz to report post-0 down")
        sp.wait_replaced("post-0", victim)
        wait_until(
            lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 10, "ready again"
        )
        with sp.control() as ctl:
            assert ctl.get(sp.slot("gateway-0"), R_STATE) == ReplicaState.READY


def test_port_in_use_fails_before_anything_starts(configs: ConfigFactory) -> None:
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = configs.write({"gateway.replicas": 2, "gateway.port": port})
        done = subprocess.run(
            [sys.executable, "-m", "mpipeline", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert f"127.0.0.1:{port} already in use" in done.stderr
    assert not (configs.run_dir / "state.json").exists()


def test_the_rate_limit_is_one_budget_across_gateway_replicas(
    start_supervisor: SupervisorFactory,
) -> None:
    rate = 0.05
    sp = _start(
        start_supervisor,
        **{"gateway.rate_limit.requests_per_s": rate, "gateway.rate_limit.burst": 10},
    )
    with sp.explain():
        statuses = []
        started = time.monotonic()
        for i in range(30):
            # A new connection each time: the kernel spreads them over both replicas.
            reply = httpx.post(f"{sp.url}/v1/prompt", json={"input": f"r{i}"}, timeout=10)
            statuses.append(reply.status_code)
            if reply.status_code == 429:
                assert int(reply.headers["retry-after"]) >= 1
                assert reply.json()["error"]["type"] == "rate_limited"
        # 10 from the burst, and what refilled while the loop ran (one token per 20 s, so
        # none unless the box is very slow): never 20, which two budgets would give.
        refilled = int((time.monotonic() - started) * rate) + 1
        assert 10 <= statuses.count(200) <= 10 + refilled < 20, statuses
        assert statuses.count(429) == 30 - statuses.count(200)
        assert run_segments(sp.run_id).count(f"mpl-{sp.run_id}-ratelimit") == 1
