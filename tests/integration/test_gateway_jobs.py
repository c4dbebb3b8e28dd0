"""Async requests (``POST /v1/requests``, ``GET``/``DELETE /v1/requests/{id}``) on a live pipeline.

One supervisor serves the module, with an echo worker slow enough per token
that a long prompt is still running when a test cancels it. Three gateways
share one ``Pipeline`` client (``_live.Gateways``): an open one with the
default table, a small one (one job, a one-second TTL) for the bounds, and
one that wants a token. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mpipeline.config import STAGE_ORDER, GatewayConfig
from tests.integration._live import Gateways
from tests.integration.conftest import ConfigFactory, SupervisorFactory, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "jobs-Test-Token-5678"
TOKEN_ENV = "MPIPELINE_TEST_JOBS_TOKEN"
TOKEN_DELAY_MS = 10.0
# Long enough to still be generating when it is cancelled (1500 tokens x 10 ms).
SLOW_WORDS = 1500
SMALL_TTL_S = 1.0
HTTP_TIMEOUT_S = 20.0
BIG_RING = 1024 * 1024
WAIT_S = 20.0


class JobGateways(Gateways):
    def __init__(self, run_dir: Any) -> None:
        super().__init__(
            run_dir,
            [
                (GatewayConfig(), None),
                (GatewayConfig(jobs_max=1, jobs_ttl_s=SMALL_TTL_S), None),
                (GatewayConfig(auth_token_env=TOKEN_ENV), {TOKEN_ENV: TOKEN}),
            ],
        )
        self.open_url, self.small_url, self.auth_url = self.urls


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobGateways]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("jobs")))
    try:
        sp = factory(
            {
                "stages.inference.echo.token_delay_ms": TOKEN_DELAY_MS,
                "stages.inference.echo.max_tokens": SLOW_WORDS,
                # Room for the slow prompt and its reply in one record of each ring.
                "gateway.ring_capacity": BIG_RING,
                **{f"stages.{stage}.ring_capacity": BIG_RING for stage in STAGE_ORDER},
            }
        )
        gateways = JobGateways(sp.run_dir)
        try:
            yield gateways
        finally:
            gateways.close()
    finally:
        factory.stop_all()


@pytest.fixture
def client(live: JobGateways) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.open_url, timeout=HTTP_TIMEOUT_S) as c:
        yield c


def _slow_prompt() -> str:
    return " ".join(f"w{i}" for i in range(SLOW_WORDS))


def _submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/v1/requests/{job['id']}"
    assert job["object"] == "request" and job["status"] in ("queued", "running")
    assert job["result"] is None and job["error"] is None
    return job


def _poll(client: httpx.Client, job_id: str, *states: str) -> dict[str, Any]:
    """The job once its status is one of ``states``."""

    def reached() -> dict[str, Any] | None:
        response = client.get(f"/v1/requests/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job if job["status"] in states else None

    found: dict[str, Any] = wait_until(reached, WAIT_S, f"request {job_id} to be {states}")
    return found


def test_submit_poll_completes_with_the_synchronous_result(client: httpx.Client) -> None:
    # No session: a second request in one session would be served from its cache.
    body = {"input": "async hello world", "max_tokens": 8, "metadata": {"k": "v"}}
    job = _submit(client, body)
    done = _poll(client, job["id"], "completed")
    sync = client.post("/v1/prompt", json=body)
    assert sync.status_code == 200
    expected, result = sync.json(), done["result"]
    for key in ("text", "finish_reason", "citations", "session_id"):
        assert result[key] == expected[key], key
    # The second of two equal prompts finds the first's prefix in the prompt cache.
    assert {**result["usage"], "cached_tokens": 0} == {**expected["usage"], "cached_tokens": 0}
    assert result["text"] == "async hello world"
    assert result["request_id"] != expected["request_id"]
    assert done["error"] is None and done["http_status"] is None
    assert done["finished_at"] >= done["created_at"]
    assert done["expires_at"] > done["finished_at"]
    # HEAD answers like GET, without the body.
    head = client.head(f"/v1/requests/{job['id']}")
    assert head.status_code == 200 and head.content == b""


def test_a_failed_request_keeps_the_synchronous_error(client: httpx.Client) -> None:
    """A 1 ms deadline fails in the pipeline: the job carries /v1/prompt's error and status."""
    body = {"input": _slow_prompt(), "deadline_ms": 1}
    job = _submit(client, body)
    failed = _poll(client, job["id"], "failed")
    sync = client.post("/v1/prompt", json=body)
    assert failed["http_status"] == sync.status_code == 504
    error, expected = failed["error"], sync.json()["error"]
    assert error["type"] == expected["type"] == "deadline_exceeded"
    # Which stage noticed the deadline first, and so the message ("deadline exceeded in
    # rag", "stage inference timed out" on a loaded box), varies; the kind does not.
    assert error["message"] and expected["message"]
    assert error["request_id"] and error["request_id"] != expected["request_id"]
    assert failed["result"] is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"input": ""}',
        b'{"input": "x", "max_tokens": 0}',
        b'{"input": "x", "priority": "urgent"}',
        b'{"input": "x", "bogus": 1}',
        b'{"input": "x", "deadline_ms": 0}',
        b'{"input": "x", "session_id": ""}',
    ],
)
def test_bad_bodies_are_refused_as_the_synchronous_route_refuses_them(
    client: httpx.Client, body: bytes
) -> None:
    headers = {"content-type": "application/json"}
    sync = client.post("/v1/prompt", content=body, headers=headers)
    job = client.post("/v1/requests", content=body, headers=headers)
    assert 400 <= sync.status_code < 500
    assert (job.status_code, job.json()) == (sync.status_code, sync.json())


def test_stream_unknown_ids_and_methods_are_refused_clearly(client: httpx.Client) -> None:
    streamed = client.post("/v1/requests", json={"input": "x", "stream": True})
    assert streamed.status_code == 400
    assert streamed.json()["error"]["field"] == "stream"
    assert "poll GET /v1/requests/{id}" in streamed.json()["error"]["message"]
    for path in ("/v1/requests/req_nope", "/v1/requests/", "/v1/requests/a/b"):
        for method in ("GET", "DELETE"):
            missing = client.request(method, path)
            assert missing.status_code == 404, (method, path)
            assert missing.json()["error"]["type"] == "not_found"
            assert "unknown, or its outcome expired" in missing.json()["error"]["message"]
    wrong = client.put("/v1/requests", json={"input": "x"})
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert client.post("/v1/requests/req_x").headers["allow"] == "GET, DELETE"


def test_delete_cancels_a_running_request_and_leaves_nothing_in_flight(
    live: JobGateways, client: httpx.Client
) -> None:
    before = live.inflight()
    job = _submit(client, {"input": _slow_prompt()})
    _poll(client, job["id"], "running")
    wait_until(lambda: live.inflight() > before, WAIT_S, "the request to be in flight")
    cancelled = client.delete(f"/v1/requests/{job['id']}")
    assert cancelled.status_code == 200, cancelled.text
    out = cancelled.json()
    assert out["status"] == "cancelled" and out["result"] is None
    assert out["error"]["type"] == "client_cancelled" and out["http_status"] == 499
    # Cancelled in the pipeline client before DELETE answered, as a hang-up would be.
    assert live.inflight() == before
    assert client.get(f"/v1/requests/{job['id']}").json()["status"] == "cancelled"
    again = client.delete(f"/v1/requests/{job['id']}")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_delete_after_completion_is_a_conflict_and_changes_nothing(
    client: httpx.Client,
) -> None:
    job = _submit(client, {"input": "quick one"})
    _poll(client, job["id"], "completed")
    late = client.delete(f"/v1/requests/{job['id']}")
    assert late.status_code == 409
    assert late.json()["error"]["type"] == "conflict"
    assert "already completed" in late.json()["error"]["message"]
    after = client.get(f"/v1/requests/{job['id']}").json()
    assert after["status"] == "completed" and after["result"]["text"] == "quick one"


def test_outcomes_expire_after_the_ttl(live: JobGateways) -> None:
    with httpx.Client(base_url=live.small_url, timeout=HTTP_TIMEOUT_S) as small:
        job = _submit(small, {"input": "soon gone"})
        _poll(small, job["id"], "completed")

        def gone() -> bool:
            return small.get(f"/v1/requests/{job['id']}").status_code == 404

        wait_until(gone, SMALL_TTL_S + WAIT_S, "the outcome to expire")
        expired = small.get(f"/v1/requests/{job['id']}").json()["error"]
        assert "gateway.jobs_ttl_s = 1 s" in expired["message"]


def test_a_table_full_of_unfinished_requests_refuses_with_429(live: JobGateways) -> None:
    with httpx.Client(base_url=live.small_url, timeout=HTTP_TIMEOUT_S) as small:
        job = _submit(small, {"input": _slow_prompt()})
        refused = small.post("/v1/requests", json={"input": "no room"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "jobs_full" and "gateway.jobs_max" in error["message"]
        counts = small.get("/v1/status").json()["gateway"]["jobs"]
        assert (counts["running"], counts["refused"]) == (1, 1), counts
        # The synchronous route is not held to the table.
        assert small.post("/v1/prompt", json={"input": "still served"}).status_code == 200
        assert small.delete(f"/v1/requests/{job['id']}").json()["status"] == "cancelled"
        # A finished job's slot is taken by the next one (its outcome goes early,
        # or expires first on a slow box: either way the new one gets in).
        again = _submit(small, {"input": "room again"})
        _poll(small, again["id"], "completed")
        assert small.get(f"/v1/requests/{job['id']}").status_code == 404


def test_the_bearer_token_guards_every_async_route(live: JobGateways) -> None:
    good = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=live.auth_url, timeout=HTTP_TIMEOUT_S) as auth:
        job = auth.post("/v1/requests", json={"input": "secret"}, headers=good)
        assert job.status_code == 202
        path = f"/v1/requests/{job.json()['id']}"
        for method, url in (("POST", "/v1/requests"), ("GET", path), ("DELETE", path)):
            for headers in ({}, {"authorization": "Bearer wrong"}):
                denied = auth.request(method, url, json={"input": "x"}, headers=headers)
                assert denied.status_code == 401, (method, headers)
                assert denied.headers["www-authenticate"] == "Bearer"
        done = _poll_with(auth, path, good)
        assert done["result"]["text"] == "secret"


def _poll_with(client: httpx.Client, path: str, headers: dict[str, str]) -> dict[str, Any]:
    def completed() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(path, headers=headers).json()
        return job if job["status"] == "completed" else None

    found: dict[str, Any] = wait_until(completed, WAIT_S, f"{path} to complete")
    return found


def test_the_routes_are_in_the_openapi_document(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert set(doc["paths"]["/v1/requests"]) == {"post"}
    assert set(doc["paths"]["/v1/requests/{id}"]) == {"parameters", "get", "delete"}
    stream = doc["components"]["schemas"]["JobBody"]["properties"]["stream"]
    assert stream["enum"] == [False]


def test_a_refusal_at_submit_is_answered_at_once_and_is_never_a_job(
    live: JobGateways, client: httpx.Client
) -> None:
    """Too large for the first ring's record: /v1/prompt's 413, and no job is held."""
    before = client.get("/v1/status").json()["gateway"]["jobs"]
    body = {"input": "x " * 200_000}
    sync = client.post("/v1/prompt", json=body)
    job = client.post("/v1/requests", json=body)
    assert sync.status_code == 413
    assert (job.status_code, job.json()["error"]["type"]) == (413, sync.json()["error"]["type"])
    assert "location" not in job.headers
    # Nothing was added, refused or evicted (the open gateway's TTL is an hour).
    assert client.get("/v1/status").json()["gateway"]["jobs"] == before
