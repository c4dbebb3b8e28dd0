"""The dashboard's routes on a real ``MetricsServer``, fed synthetic frames.

No pipeline here: the frames come from a counter that grows on every read,
so a test can tell a fresh update from a cached one, and the DLQ tail is read
from files written in the queue's own format. What needs a browser and a
running pipeline is in tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from mpipeline.auth import BearerAuth
from mpipeline.dlq import DLQ_FILE, ClaimMarker, DeadLetter
from mpipeline.metrics import server as server_module
from mpipeline.metrics.dashboard import Dashboard, Feed
from mpipeline.metrics.server import MetricsServer
from mpipeline.metrics.snapshot import EdgeStatus, ReplicaStatus, RingCounters, Status
from mpipeline.metrics.view import Frame
from mpipeline.supervisor._dashboard import dlq_tail
from tests.integration.conftest import wait_until

TOKEN = "dash-s3cret"
WAIT_S = 10.0
HTTP_TIMEOUT_S = 10.0


def _replica(name: str, processed: int) -> ReplicaStatus:
    stage, _, index = name.rpartition("-")
    return ReplicaStatus(
        name=name,
        stage=stage,
        index=int(index),
        slot=0,
        pid=100 + int(index),
        cpus=[0],
        state="READY",
        processed=processed,
        in_flight=0,
        heartbeat_age_s=0.0,
        restarts=0,
        generation=1,
        last_exit=None,
    )


class Frames:
    """A run whose every stage did ``reads`` more messages at each read."""

    def __init__(self) -> None:
        self.reads = 0
        self.problem: str | None = None

    def __call__(self) -> Frame:
        self.reads += 1
        n = self.reads
        at = time.monotonic()
        if self.problem is not None:
            return Frame(at, time.time(), None, problem=self.problem)
        ring = RingCounters(256, n, n, 512, 0, 0, False, 1, 2)
        status = Status(
            run_dir="/run",
            run_id="r1",
            config="p.toml",
            state="RUNNING",
            supervisor_pid=1,
            uptime_s=float(n),
            replicas=[_replica("rag-0", 10 * n), _replica("inference-0", 10 * n)],
            edges=[EdgeStatus("mpl-r1-rag0-inference0", "rag0", "inference0", 1024, ring, None)],
        )
        done = CounterMetricFamily("mpipeline_requests_completed", "h", labels=["client"])
        done.add_metric(["gateway-0"], 10.0 * n)
        families: list[Metric] = [done]
        return Frame(at, time.time(), status, families)


class _NoMetrics(Collector):
    def collect(self) -> Iterator[Metric]:
        return iter(())


@pytest.fixture
def frames() -> Frames:
    return Frames()


@pytest.fixture
def feed(frames: Frames, tmp_path: Path) -> Feed:
    return Feed(frames, lambda: dlq_tail(tmp_path / DLQ_FILE), max_streams=2)


@pytest.fixture
def server(feed: Feed) -> Iterator[MetricsServer]:
    auth = BearerAuth(TOKEN)
    srv = MetricsServer("127.0.0.1", 0, _NoMetrics(), auth, Dashboard(feed, auth))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def base(server: MetricsServer) -> str:
    return server.url.removesuffix("/metrics")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _events(reply: httpx.Response, n: int) -> Iterator[dict[str, object]]:
    """The first ``n`` update documents of an event stream."""
    seen = 0
    for line in reply.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))
            seen += 1
            if seen == n:
                return


def test_every_route_but_the_static_files_wants_the_token(base: str) -> None:
    with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as c:
        for path in ("/dashboard", "/dashboard/snapshot.json", "/dashboard/events", "/metrics"):
            reply = c.get(path)
            assert reply.status_code == 401, path
            assert reply.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in reply.text
        assert c.get("/dashboard/snapshot.json", params={"token": "wrong"}).status_code == 401
        assert c.get("/dashboard/snapshot.json", params={"token": TOKEN}).status_code == 200
        assert c.get("/dashboard/snapshot.json", headers=_auth()).status_code == 200
        assert c.get("/metrics", headers=_auth()).status_code == 200
        # The page's own code holds no data: served openly, so plain relative URLs load it.
        js = c.get("/dashboard/static/dashboard.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert "EventSource" in js.text
        assert c.get("/dashboard/static/dashboard.css").status_code == 200
        assert c.get("/dashboard/static/nope.js").status_code == 404


def test_the_page_is_self_contained_and_framing_is_refused(base: str) -> None:
    with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as c:
        page = c.get("/dashboard", params={"token": TOKEN})
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "http://" not in page.text and "https://" not in page.text  # no CDN
        home = c.get("/", params={"token": TOKEN})
        assert home.status_code == 302
        assert home.headers["location"] == f"/dashboard?token={TOKEN}"
        assert c.post("/dashboard", headers=_auth()).status_code == 405


def test_snapshot_json_has_totals_now_and_rates_from_the_second_read(base: str) -> None:
    with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S, headers=_auth()) as c:
        first = c.get("/dashboard/snapshot.json").json()
        assert first["run"]["run_id"] == "r1"
        assert first["requests"]["completed"] == 10
        assert [s["stage"] for s in first["stages"]] == ["rag", "inference"]
        assert first["stages"][0]["per_s"] is None  # one frame: no rate yet
        assert first["rings"][0]["name"] == "rag0 → inference0"
        assert first["rings"][0]["fill"] == 0.25
        assert first["shards"] == [
            {"name": "inference-0", "per_s": None, "in_flight": 0, "processed": 10, "share": 1.0}
        ]

        def second() -> dict[str, object] | None:
            doc: dict[str, object] = c.get("/dashboard/snapshot.json").json()
            return doc if doc["interval_s"] else None

        doc = wait_until(second, WAIT_S, "a second read")
        stages = doc["stages"]
        assert isinstance(stages, list) and stages[0]["per_s"] > 0


def test_events_stream_fresh_updates(base: str, frames: Frames) -> None:
    with (
        httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as c,
        c.stream("GET", "/dashboard/events", params={"token": TOKEN, "interval": "0.2"}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        docs = list(_events(r, 3))
    done = [d["requests"]["completed"] for d in docs]  # type: ignore[index]
    assert done == sorted(done) and done[0] < done[-1], done


@pytest.mark.parametrize(
    "interval",
    [
        "0.01",
        "nan",
        "abc",
        "61",
        # Hostile: never-ending, negative, zero, overflowing, huge, repeated, not decimal.
        "inf",
        "-inf",
        "-1",
        "0",
        "1e309",
        "9" * 4000,
        "0x1p0",
        "",
        ["1", "2"],
    ],
)
def test_a_bad_interval_is_refused_with_the_range(
    base: str, feed: Feed, interval: str | list[str]
) -> None:
    reply = httpx.get(
        base + "/dashboard/events",
        params={"interval": interval},
        headers=_auth(),
        timeout=HTTP_TIMEOUT_S,
    )
    assert reply.status_code == 400
    assert "0.2 to 60" in reply.text
    assert feed.streams == 0  # a refused stream holds no slot


def test_a_repeated_or_huge_token_in_the_query_is_refused(base: str) -> None:
    url = base + "/dashboard/snapshot.json"
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as c:
        for tokens in ([TOKEN, TOKEN], ["wrong", TOKEN], ["x" * 60_000], [""]):
            reply = c.get(url, params={"token": tokens})
            assert reply.status_code == 401, tokens[0][:10]
            assert TOKEN not in reply.text


def test_streams_beyond_the_limit_get_503_and_a_closed_one_frees_its_slot(
    base: str, feed: Feed
) -> None:
    url = base + "/dashboard/events"
    with httpx.Client(timeout=HTTP_TIMEOUT_S, headers=_auth()) as c:
        with c.stream("GET", url) as one, c.stream("GET", url) as two:
            assert one.status_code == two.status_code == 200
            wait_until(lambda: feed.streams == 2, WAIT_S, "two open streams")
            third = c.get(url)
            assert third.status_code == 503
            assert "at most 2" in third.text and third.headers["retry-after"] == "5"
        # The server notices a gone client at its next write, within an interval.
        wait_until(lambda: feed.streams == 0, WAIT_S, "the slots given back")
        with c.stream("GET", url) as again:
            assert again.status_code == 200


def test_a_client_that_stops_reading_is_dropped_without_blocking_others(
    base: str, feed: Feed, frames: Frames, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module._Quiet, "timeout", 0.5)
    frames.problem = "x" * 1_000_000  # each update fills the socket buffers quickly
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        request = f"GET /dashboard/events?interval=0.2&token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(request.encode())
        wait_until(lambda: feed.streams == 1, WAIT_S, "the stream to open")
        # Never read: the server's writes block, then time out, and the slot comes back.
        reply = httpx.get(base + "/dashboard/snapshot.json", headers=_auth(), timeout=WAIT_S)
        assert reply.status_code == 200
        wait_until(lambda: feed.streams == 0, WAIT_S * 2, "the stuck stream dropped")


def test_stopping_the_server_ends_open_streams(feed: Feed, server: MetricsServer) -> None:
    url = server.url.removesuffix("/metrics") + "/dashboard/events"
    with (
        httpx.Client(timeout=HTTP_TIMEOUT_S, headers=_auth()) as c,
        c.stream("GET", url, params={"interval": "30"}) as r,
    ):
        lines = r.iter_lines()
        assert any(line.startswith("data: ") for line in lines)
        started = time.monotonic()
        server.stop()
        rest = list(lines)  # ends: the stream returned instead of sleeping 30 s
        assert time.monotonic() - started < WAIT_S, rest
    assert feed.closed and not feed.open_stream()


# The DLQ tail


def _letter(n: int) -> DeadLetter:
    return DeadLetter(
        id=f"req-{n}", ts=1000.0 + n, reason="shed", stage="rag", message=f"ring full {n}"
    )


def _write(path: Path, *entries: DeadLetter | ClaimMarker, torn: bool = False) -> None:
    with path.open("ab") as f:
        for e in entries:
            f.write(msgspec.json.encode(e) + b"\n")
        if torn:
            f.write(b'{"kind":"dead","id":"to')


def test_dlq_tail_is_the_newest_letters_first_across_a_rotation(tmp_path: Path) -> None:
    live = tmp_path / DLQ_FILE
    assert dlq_tail(live) == []
    _write(tmp_path / "dlq.1.jsonl", *(_letter(n) for n in range(5)))
    claim = ClaimMarker(replay_of="req-4", ts=1.0, claim="c", pid=1, owner="1@1")
    _write(live, _letter(5), claim, _letter(6), torn=True)
    tail = dlq_tail(live, n=4)
    assert [x["id"] for x in tail] == ["req-6", "req-5", "req-4", "req-3"]
    assert tail[0] == {
        "id": "req-6",
        "at": 1006.0,
        "reason": "shed",
        "stage": "rag",
        "message": "ring full 6",
    }
