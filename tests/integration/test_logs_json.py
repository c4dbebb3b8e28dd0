"""``mpipeline run --log-format json`` end to end (issue 6 §4).

A real supervised pipeline with a gateway and an openai worker pointed at a
fault upstream that answers 401, at debug level so that httpx and httpcore
would log URLs if anything let them. Every line the supervisor and its
children write must be a JSON object stamped with its process; the canary
key set in the environment must not appear anywhere in it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mpipeline.config import OpenAIConfig
from tests.fault_upstream import FaultUpstream, Status
from tests.integration.conftest import SupervisorFactory, SupervisorProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CANARY = "sk-canary-logs-5d1e8a0f2c7b9364"
KEY_ENV = "MPL_TEST_UPSTREAM_KEY"
CORE_KEYS = {"ts", "level", "logger", "msg", "pid", "stage", "replica"}


@pytest.fixture
def failed_run(
    start_supervisor: SupervisorFactory,
) -> Iterator[tuple[SupervisorProcess, str]]:
    """A run after one request failed upstream, stopped so every line is written."""
    with FaultUpstream() as upstream:
        upstream.default = Status(401, body=f'{{"error": {{"message": "key {CANARY}"}}}}'.encode())
        cfg = {
            "gateway.replicas": 1,
            "stages.inference.worker": "openai",
            "stages.inference.openai": OpenAIConfig(
                base_url=upstream.openai_url, model="fault-model", api_key_env=KEY_ENV
            ),
        }
        env = {KEY_ENV: CANARY, "OPENAI_API_KEY": CANARY}
        sp = start_supervisor(cfg, env=env, args=["--log-format", "json", "-v"])
        with sp.explain(), httpx.Client(base_url=sp.url, timeout=10) as client:
            reply = client.post("/v1/prompt", json={"input": "hello"})
            assert reply.status_code == 502, reply.text
            request_id = reply.json()["error"]["request_id"]
            assert upstream.calls[0].headers["authorization"] == f"Bearer {CANARY}"
            # The runner logs the failure as it sends the error back: wait for it.
            wait_until(lambda: "HTTP 401" in sp.log(), 10, "the failure to be logged")
        sp.stop()
        yield sp, request_id


def _records(sp: SupervisorProcess) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(sp.log().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"line {n} is not JSON: {line!r}") from None
        assert isinstance(rec, dict), line
        assert CORE_KEYS <= rec.keys(), line
        records.append(rec)
    return records


def _failure(records: list[dict[str, Any]]) -> dict[str, Any]:
    found = [r for r in records if r["logger"] == "mpipeline.runner" and "HTTP 401" in r["msg"]]
    assert len(found) == 1, found
    return found[0]


def test_every_line_is_json_stamped_with_its_process(
    failed_run: tuple[SupervisorProcess, str],
) -> None:
    sp, _ = failed_run
    records = _records(sp)
    by_process = {(r["stage"], r["replica"]) for r in records}
    assert ("supervisor", None) in by_process
    assert ("gateway", "gateway-0") in by_process
    for stage, replica in by_process:
        if replica is not None:
            assert replica.rpartition("-")[0] == stage
    assert any(r["msg"].startswith("pipeline ready") for r in records)
    failure = _failure(records)
    assert (failure["stage"], failure["replica"], failure["level"]) == (
        "inference",
        "inference-0",
        "WARNING",
    )


def test_no_secret_and_no_http_client_chatter_in_the_log(
    failed_run: tuple[SupervisorProcess, str],
) -> None:
    sp, _ = failed_run
    text = sp.log()
    assert CANARY not in text
    assert "HTTP Request:" not in text  # httpx's INFO line, which names the URL
    for rec in _records(sp):
        assert not rec["logger"].startswith(("httpx", "httpcore", "websockets")), rec


def test_the_record_about_a_failed_request_carries_its_request_id(
    failed_run: tuple[SupervisorProcess, str],
) -> None:
    sp, request_id = failed_run
    assert _failure(_records(sp)).get("request_id") == request_id


def test_a_secret_that_reaches_a_log_line_is_redacted(start_supervisor: SupervisorFactory) -> None:
    """Belt and braces: a key pasted into the config is echoed by the config
    error, and the formatter still keeps it out of the log."""
    sp = start_supervisor(
        {"stages.inference.worker": CANARY},
        env={KEY_ENV: CANARY},
        args=["--log-format", "json"],
        wait=False,
    )
    assert sp.wait_exit(30) == 2
    (rec,) = (r for r in _records(sp) if r["level"] == "ERROR")
    assert rec["msg"].startswith("invalid configuration:")
    assert "stages.inference.worker" in rec["msg"]
    assert "[redacted]" in rec["msg"]
    assert CANARY not in sp.log()
