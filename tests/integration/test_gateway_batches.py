"""OpenAI's Batch API (``/v1/files``, ``/v1/batches``) through the official ``openai`` SDK.

One supervisor serves the module with an echo worker slow per token, so a
long prompt is still running when a test cancels its batch. Two gateways
share one ``Pipeline`` client (``_live.Gateways``) and the run dir, as
replicas do: an open one (two lines of a batch at once) and one that wants
a token. The resume test runs its own supervisor with a gateway replica and
SIGKILLs it mid-batch. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import openai
import psutil
import pytest

from mpipeline.config import STAGE_ORDER, GatewayConfig
from tests.integration._live import Gateways
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    run_segments,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "batches-Test-Token-9012"
TOKEN_ENV = "MPIPELINE_TEST_BATCHES_TOKEN"
TOKEN_DELAY_MS = 10.0
# Long enough to be generating still when the batch is cancelled (1500 x 10 ms).
SLOW_WORDS = 1500
BIG_RING = 1024 * 1024
MODEL = "mpipeline-echo"
WAIT_S = 30.0
SLOW_OVERRIDES: dict[str, object] = {
    # Nothing here reads metrics: no metrics server to start on a loaded box.
    "metrics.enabled": False,
    "stages.inference.echo.token_delay_ms": TOKEN_DELAY_MS,
    "stages.inference.echo.max_tokens": SLOW_WORDS,
    "gateway.ring_capacity": BIG_RING,
    **{f"stages.{stage}.ring_capacity": BIG_RING for stage in STAGE_ORDER},
}
Line = dict[str, Any]


class BatchGateways(Gateways):
    def __init__(self, run_dir: Any) -> None:
        super().__init__(
            run_dir,
            [
                (GatewayConfig(batch_concurrency=2), None),
                (GatewayConfig(auth_token_env=TOKEN_ENV), {TOKEN_ENV: TOKEN}),
            ],
        )
        self.open_url, self.auth_url = self.urls


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchGateways]:
    factory = SupervisorFactory(ConfigFactory(tmp_path_factory.mktemp("batches")))
    try:
        sp = factory(SLOW_OVERRIDES)
        gateways = BatchGateways(sp.run_dir)
        try:
            yield gateways
        finally:
            gateways.close()
    finally:
        factory.stop_all()


@pytest.fixture
def client(live: BatchGateways) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live.open_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _chat(custom_id: str, text: str, **fields: Any) -> Line:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], **fields}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _jsonl(lines: list[Line] | list[str]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def _start(client: openai.OpenAI, lines: list[Line] | list[str]) -> Any:
    uploaded = client.files.create(file=("input.jsonl", _jsonl(lines)), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch"
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "test"},
    )
    assert batch.object == "batch" and batch.input_file_id == uploaded.id
    assert batch.metadata == {"job": "test"}
    return batch


def _until(client: openai.OpenAI, batch_id: str, *states: str) -> Any:
    def reached() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in states else None

    return wait_until(reached, WAIT_S, f"batch {batch_id} to be {states}")


def _completed(client: openai.OpenAI, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    assert counts is not None
    return counts.completed


def _lines(client: openai.OpenAI, file_id: str | None) -> dict[str, Line]:
    """An output or error file by custom_id; each custom_id must appear once."""
    if file_id is None:
        return {}
    rows = [json.loads(x) for x in client.files.content(file_id).content.splitlines()]
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a custom_id has two outcome lines"
    return by_id


def test_a_batch_answers_each_line_as_the_synchronous_route(client: openai.OpenAI) -> None:
    lines = [_chat(f"req-{i}", f"batch hello {i}", max_tokens=8) for i in range(4)]
    lines.append(_chat("too-hot", "hi", temperature=5))
    batch = _start(client, lines)
    done = _until(client, batch.id, "completed")
    assert done.request_counts.total == 5
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 1)
    assert done.completed_at >= done.created_at and done.in_progress_at is not None
    outputs = _lines(client, done.output_file_id)
    errors = _lines(client, done.error_file_id)
    assert sorted(outputs) == [f"req-{i}" for i in range(4)] and list(errors) == ["too-hot"]
    for i in range(4):
        row = outputs[f"req-{i}"]
        assert row["error"] is None and row["response"]["status_code"] == 200
        body = row["response"]["body"]
        assert row["response"]["request_id"] == body["id"]
        raw = client.chat.completions.with_raw_response.create(**lines[i]["body"])
        sync = raw.http_response.json()
        for key in ("object", "model", "choices"):
            assert body[key] == sync[key], key
        assert body["choices"][0]["message"]["content"] == f"batch hello {i}"
    failed = errors["too-hot"]
    with pytest.raises(openai.BadRequestError) as sync_error:
        client.chat.completions.create(**lines[4]["body"])
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["body"] == sync_error.value.response.json()
    assert sync_error.value.param == "temperature"
    assert failed["error"]["message"] == sync_error.value.response.json()["error"]["message"]
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes > 0
    listed = [b.id for b in client.batches.list(limit=100).data]
    assert batch.id in listed


def test_a_bad_line_fails_validation_naming_it(client: openai.OpenAI) -> None:
    lines: list[str] = [
        json.dumps(_chat("ok", "fine")),
        "{not json",
        json.dumps({**_chat("wrong-url", "x"), "url": "/v1/nope"}),
        json.dumps(_chat("ok", "repeated id")),
    ]
    batch = _start(client, lines)
    failed = _until(client, batch.id, "failed")
    assert failed.failed_at is not None and failed.output_file_id is None
    errors = {e.line: e for e in failed.errors.data}
    assert sorted(errors) == [2, 3, 4]
    assert errors[2].code == "invalid_json_line"
    assert errors[3].code == "invalid_url" and "/v1/nope" in errors[3].message
    assert errors[4].code == "duplicate_custom_id" and errors[4].param == "custom_id"


def test_bad_requests_are_refused_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as wrong_purpose:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert wrong_purpose.value.param == "purpose"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert unknown.value.param == "input_file_id"
    uploaded = client.files.create(file=("x.jsonl", _jsonl([_chat("a", "b")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as endpoint:
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/nope",  # type: ignore[arg-type]
            completion_window="24h",
        )
    assert endpoint.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-../../state")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_cancel_stops_the_lines_in_flight_and_keeps_the_outputs(
    live: BatchGateways, client: openai.OpenAI
) -> None:
    before = live.inflight()
    slow = " ".join(f"w{i}" for i in range(SLOW_WORDS))
    lines = [_chat("quick-0", "quick zero"), _chat("quick-1", "quick one")]
    lines += [_chat(f"slow-{i}", slow) for i in range(4)]
    batch = _start(client, lines)

    wait_until(lambda: _completed(client, batch.id) >= 2, WAIT_S, "the quick lines")
    wait_until(lambda: live.inflight() > before, WAIT_S, "slow lines to be in flight")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    cancelled = _until(client, batch.id, "cancelled")
    assert cancelled.cancelled_at is not None and cancelled.cancelling_at is not None
    assert cancelled.request_counts.total == 6
    assert sorted(_lines(client, cancelled.output_file_id)) == ["quick-0", "quick-1"]
    assert cancelled.error_file_id is None
    # The slow requests were cancelled in the pipeline, as a client hang-up cancels one.
    wait_until(lambda: live.inflight() == before, WAIT_S, "the slow lines to leave")
    again = client.batches.cancel(batch.id)
    assert again.status == "cancelled"


def test_the_token_is_required_when_set(live: BatchGateways) -> None:
    url = f"{live.auth_url}/v1"
    with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.files.create(file=("x.jsonl", b"{}\n"), purpose="batch")
        with pytest.raises(openai.AuthenticationError):
            bad.batches.list()
    with openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0) as good:
        uploaded = good.files.create(file=("x.jsonl", _jsonl([_chat("a", "b")])), purpose="batch")
        assert good.files.retrieve(uploaded.id).bytes == len(_jsonl([_chat("a", "b")]))


@pytest.mark.parametrize("killed", ["gateway-replica", "supervisor"])
def test_a_batch_resumes_after_a_sigkill(start_supervisor: SupervisorFactory, killed: str) -> None:
    """SIGKILL mid-batch, then the replica (restarted by the supervisor) or a new
    supervisor on the same run dir adopts the batch: one outcome per custom_id."""
    cfg = {**SLOW_OVERRIDES, "gateway.replicas": 1, "gateway.batch_concurrency": 2}
    sp = start_supervisor(cfg)
    words = " ".join(f"w{i}" for i in range(60))  # about 0.6 s a line
    lines = [_chat(f"line-{i}", f"{i} {words}") for i in range(8)]
    with openai.OpenAI(base_url=f"{sp.url}/v1", api_key="x", max_retries=0) as c:
        batch = _start(c, lines)
        wait_until(lambda: _completed(c, batch.id) >= 2, WAIT_S, "two lines to be answered")
    state = sp.run_dir / "batches" / f"{batch.id}.json"
    if killed == "supervisor":
        kids = sp.descendants()
        sp.send(signal.SIGKILL)
        sp.wait_exit(5)
        wait_until(lambda: not any(k.is_running() for k in kids), WAIT_S, "replicas to die")
        assert json.loads(state.read_bytes())["status"] == "in_progress"
        sp = start_supervisor(config_path=sp.config_path)
    else:
        old = sp.replica_pid("gateway-0")
        os.kill(old, signal.SIGKILL)
        assert json.loads(state.read_bytes())["status"] == "in_progress"
        sp.wait_replaced("gateway-0", old)
    with sp.explain(), openai.OpenAI(base_url=f"{sp.url}/v1", api_key="x", max_retries=0) as c:
        done = _until(c, batch.id, "completed")
        assert done.request_counts.completed == 8 and done.error_file_id is None
        outputs = _lines(c, done.output_file_id)
        assert sorted(outputs) == sorted(line["custom_id"] for line in lines)
    run_id, kids = sp.run_id, sp.descendants()
    sp.stop()
    assert run_segments(run_id) == []
    assert not [p for p in kids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    # The batch's files are the user's data: they stay, private to the user.
    assert state.stat().st_mode & 0o777 == 0o600
    assert state.parent.stat().st_mode & 0o777 == 0o700
