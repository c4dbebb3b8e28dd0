"""Every HTTP route fuzzed against the gateway's own ``/openapi.json`` (schemathesis).

The document is generated from the msgspec types the routes decode and
encode (``gateway/openapi.py``), so a route added with its types is fuzzed
from its first day. schemathesis generates valid and invalid requests for
each operation, sends them to a live gateway on a real pipeline, and runs
its checks on every answer: never a 5xx, the status, content type and body
documented, invalid input refused. Examples are bounded and derandomized,
so the run is the same on every machine and stays within seconds.

Covers RELIABILITY §3 #19 (bad JSON and bad fields: "schemathesis with zero
5xx") and #42 (out-of-range numbers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, CheckFunction
from schemathesis.core.result import Ok

from mpipeline.config import STAGE_ORDER, GatewayConfig
from tests.integration._live import Gateways
from tests.integration.conftest import ConfigFactory, SupervisorFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOKEN = "openapi-Token-4321"
TOKEN_ENV = "MPIPELINE_TEST_OPENAPI_TOKEN"
BIG_RING = 1024 * 1024
# Per operation; enough to reach every field's bounds and the invalid cases.
EXAMPLES = 40


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("openapi")))
    try:
        sp = factory(
            {
                # Bodies up to max_body_bytes must fit the first ring.
                "gateway.ring_capacity": BIG_RING,
                **{f"stages.{stage}.ring_capacity": BIG_RING for stage in STAGE_ORDER},
            }
        )
        live = Gateways(
            sp.run_dir,
            [
                (GatewayConfig(), None),
                (GatewayConfig(auth_token_env=TOKEN_ENV), {TOKEN_ENV: TOKEN}),
            ],
        )
        try:
            yield live
        finally:
            live.close()
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def api_schema(gateways: Gateways) -> schemathesis.BaseSchema:
    url = gateways.urls[0]
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


# schemathesis's own pytest plugin does not load under pytest 9 yet, so each
# operation runs as a hypothesis test built here, for valid and invalid input.
Case = schemathesis.Case[Any]
Operation = APIOperation[Any, Any, Any, Any]
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
# 5xx answers that are the pipeline's documented outcome, not a fault: a client
# may ask for a 1 ms deadline, and 504 deadline_exceeded is then the right answer.
OUTCOMES = frozenset({"deadline_exceeded", "ring_full", "shutting_down"})


@schemathesis.check
def no_server_fault(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
) -> None:
    """schemathesis's not_a_server_error, less the documented pipeline outcomes above."""
    if response.status_code < 500:
        return
    try:
        kind = json.loads(response.content)["error"].get("type")
    except (ValueError, KeyError, AttributeError):
        kind = None
    if response.status_code == 500 or kind not in OUTCOMES:
        raise AssertionError(f"server fault {response.status_code}: {response.text[:500]}")


# Valid by the schema, refused by a rule JSON Schema cannot state: the chat's last
# message must be from the user (or a tool) and some message must have content
# (on /v1/messages too, where the echo worker also refuses sampling fields);
# /v1/stream is a WebSocket, whose plain GET is answered 426 as documented; the
# echo worker has no /v1/completions or /v1/embeddings (404, as documented); a
# batch's input_file_id must name an uploaded file (400, as OpenAI answers it).
CROSS_FIELD = {
    "POST /v1/batches",
    "POST /v1/chat/completions",
    "POST /v1/messages",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "GET /v1/stream",
}


def _fuzz(operation: Operation, mode: schemathesis.GenerationMode) -> None:
    excluded: list[CheckFunction] = [schemathesis.checks.not_a_server_error]
    if operation.label in CROSS_FIELD:
        excluded.append(schemathesis.checks.positive_data_acceptance)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case) -> None:
        case.call_and_validate(
            timeout=30,
            excluded_checks=excluded,
            additional_checks=[no_server_fault],
        )

    run()


def test_every_route_answers_as_documented(api_schema: schemathesis.BaseSchema) -> None:
    failures: dict[str, str] = {}
    operations = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is valid
        operations.append(result.ok())
    labels = {op.label for op in operations}
    assert {"POST /v1/prompt", "POST /v1/chat/completions", "GET /v1/models"} <= labels, labels
    for operation in operations:
        for mode in MODES:
            try:
                _fuzz(operation, mode)
            except Unsatisfiable:
                # Nothing to make invalid: no parameters and no body (GET /healthz).
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # run all; report every failure
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_the_document_is_generated_from_the_types_and_carries_their_bounds(
    gateways: Gateways,
) -> None:
    doc = httpx.get(gateways.urls[0] + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    prompt = doc["components"]["schemas"]["PromptBody"]["properties"]
    max_tokens = prompt["max_tokens"]["anyOf"][0]
    assert max_tokens["maximum"] == 2**31 - 1
    assert prompt["metadata"]["maxProperties"] == 16
    assert "/v1/chat/completions" in doc["paths"] and "/v1/prompt" in doc["paths"]
    assert "security" not in doc  # no token: no security requirement


def test_with_a_token_the_document_wants_it_and_says_so(gateways: Gateways) -> None:
    url = gateways.urls[1] + "/openapi.json"
    assert httpx.get(url, timeout=10).status_code == 401
    r = httpx.get(url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    doc = json.loads(r.content)
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
