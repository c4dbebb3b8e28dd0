"""The Batch API's parts without a pipeline: storage, input checks, the runner's states.

The runner is driven with a fake ``execute`` (each line's HTTP status and
body), so its transitions — validating to in_progress to completed, failed
validation, cancel mid-line, resume after a kill, a pipeline not ready —
are checked exactly; the executor is checked against a stub pipeline for
the priority it stamps. Waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import msgspec

from mpipeline.gateway.admission import Admission
from mpipeline.gateway.batch_execute import LineExecutor
from mpipeline.gateway.batch_files import BatchStore, new_id, now, output_ids
from mpipeline.gateway.batch_input import Line, Upload, check_lines, parse_upload
from mpipeline.gateway.batch_runner import BatchRunner
from mpipeline.gateway.batch_shapes import CHAT, Batch, BatchError
from mpipeline.gateway.exchange import Request
from mpipeline.gateway.models import Models
from mpipeline.gateway.openai import ChatCompletions
from mpipeline.gateway.openai_fields import Backend
from mpipeline.messages import Completed, Priority, Usage
from mpipeline.pipeline import Pipeline, RequestOptions

OK = b'{"id":"chatcmpl-1","object":"chat.completion"}'
WAIT_S = 10.0
Execute = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]


def _line(custom_id: str, **body: Any) -> str:
    req = {"model": "m", "messages": [{"role": "user", "content": custom_id}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": req})


def _file(store: BatchStore, *lines: str) -> str:
    return store.add_file("in.jsonl", "batch", "\n".join(lines).encode() + b"\n").id


def _batch(store: BatchStore, file_id: str) -> Batch:
    t = now()
    batch = Batch(
        id=new_id("batch_"), endpoint=CHAT, input_file_id=file_id, created_at=t, expires_at=t
    )
    store.write_batch(batch)
    return batch


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _ended(store: BatchStore, batch_id: str) -> Callable[[], bool]:
    def check() -> bool:
        batch = store.batch(batch_id)
        return batch is not None and batch.status in ("completed", "failed", "cancelled")

    return check


def _outputs(store: BatchStore, batch_id: str) -> tuple[list[Any], list[Any]]:
    found = []
    for file_id in output_ids(batch_id):
        data = store.content_path(file_id).read_bytes() if store.file(file_id) else b""
        found.append([json.loads(x) for x in data.splitlines()])
    return found[0], found[1]


def _run(store: BatchStore, execute: Execute, batch_id: str, **kw: Any) -> None:
    async def main() -> None:
        runner = BatchRunner(store, execute, concurrency=kw.pop("concurrency", 2), **kw)
        runner.start()
        try:
            await _until(_ended(store, batch_id), "the batch to end")
        finally:
            await runner.close()

    asyncio.run(main())


# Storage


def test_the_store_is_private_and_atomic(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    obj = store.add_file("in.jsonl", "batch", b"abc\n")
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    for path in store.files.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not [p for p in store.files.iterdir() if p.name.endswith(".tmp")]
    assert store.file(obj.id) == obj and store.content(obj.id) == b"abc\n"
    assert store.file("../batches") is None and store.content("nope") is None
    assert store.delete_file(obj.id) and store.file(obj.id) is None
    assert not store.delete_file(obj.id)


def test_the_lock_is_exclusive_until_its_holder_closes_it(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    first = store.lock("batch_x")
    assert first is not None
    assert store.lock("batch_x") is None  # another open file description: refused
    os.close(first)
    again = store.lock("batch_x")
    assert again is not None
    os.close(again)


def test_a_torn_last_output_line_is_cut_off_on_resume(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    assert not store.root.exists()  # made on the first write only
    store.add_file("in.jsonl", "batch", b"")
    out, _ = output_ids("batch_t")
    path = store.content_path(out)
    path.write_bytes(b'{"custom_id":"a","x":1}\n{"custom_id":"b","x"')
    done, completed, failed = store.answered("batch_t")
    assert (done, completed, failed) == ({"a"}, 1, 0)
    assert path.read_bytes() == b'{"custom_id":"a","x":1}\n'


# Input


def test_bad_lines_are_named_by_number() -> None:
    data = "\n".join(
        [
            _line("a"),
            "{nope",
            _line("a"),
            _line("s", stream=True),
            _line("u").replace(CHAT, "/v1/embeddings"),
            json.dumps({"custom_id": "x", "method": "GET", "url": CHAT, "body": {}}),
        ]
    ).encode()
    errors = check_lines(data, CHAT)
    assert all(isinstance(e, BatchError) for e in errors)
    got = {cast(BatchError, e).line: cast(BatchError, e).code for e in errors}
    assert got == {
        2: "invalid_json_line",
        3: "duplicate_custom_id",
        4: "invalid_body",
        5: "mismatched_endpoint",
        6: "invalid_json_line",
    }
    assert [cast(BatchError, e).code for e in check_lines(b"\n\n", CHAT)] == ["empty_file"]
    lines = check_lines((_line("a") + "\n" + _line("b")).encode(), CHAT)
    assert [cast(Line, x).custom_id for x in lines] == ["a", "b"]


def _form(purpose: str, data: bytes, boundary: str = "XyZ") -> tuple[str, bytes]:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={boundary}", body


def test_the_upload_form_is_parsed_and_checked() -> None:
    content_type, body = _form("batch", b'{"a": 1}\n{"b": 2}\n')
    upload = parse_upload(content_type, body)
    assert isinstance(upload, Upload), upload
    assert upload.data == b'{"a": 1}\n{"b": 2}\n' and upload.filename == "b.jsonl"
    wrong = parse_upload(*_form("fine-tune", b"x"))
    assert getattr(wrong, "field", None) == "purpose"
    assert getattr(parse_upload("application/json", b"{}"), "status", None) == 400
    no_file = parse_upload(
        content_type,
        body.split(b'--XyZ\r\nContent-Disposition: form-data; name="file"')[0] + b"--XyZ--\r\n",
    )
    assert getattr(no_file, "field", None) == "file"


# The runner


def test_a_batch_runs_every_line_once_and_sorts_outcomes(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = _batch(store, _file(store, _line("a"), _line("bad"), _line("c")))
    running = 0
    peak = 0

    async def execute(url: str, body: bytes) -> tuple[int, bytes]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        if b'"bad"' in body:
            return 400, b'{"error":{"message":"no","type":"invalid_request_error","code":"x"}}'
        return 200, OK

    _run(store, execute, batch.id, concurrency=2)
    done = store.batch(batch.id)
    assert done is not None and done.status == "completed" and peak <= 2
    assert (done.request_counts.total, done.request_counts.completed) == (3, 2)
    assert done.request_counts.failed == 1 and done.finalizing_at and done.completed_at
    outputs, errors = _outputs(store, batch.id)
    assert sorted(o["custom_id"] for o in outputs) == ["a", "c"]
    assert outputs[0]["response"]["body"] == json.loads(OK) and outputs[0]["error"] is None
    assert outputs[0]["response"]["request_id"] == "chatcmpl-1"
    assert errors[0]["custom_id"] == "bad" and errors[0]["error"] == {"code": "x", "message": "no"}
    assert done.output_file_id and done.error_file_id


def test_a_bad_file_fails_validation_and_runs_nothing(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = _batch(store, _file(store, _line("a"), "not json"))

    async def execute(url: str, body: bytes) -> tuple[int, bytes]:
        raise AssertionError("a line ran")

    _run(store, execute, batch.id)
    failed = store.batch(batch.id)
    assert failed is not None and failed.status == "failed" and failed.errors is not None
    assert [(e.line, e.code) for e in failed.errors.data] == [(2, "invalid_json_line")]


def test_a_resumed_batch_skips_the_lines_already_answered(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = _batch(store, _file(store, _line("a"), _line("b"), _line("c")))
    store.write_batch(msgspec.structs.replace(batch, status="in_progress", in_progress_at=now()))
    out, _ = output_ids(batch.id)
    store.content_path(out).write_bytes(b'{"id":"r","custom_id":"b","response":null}\n')
    ran: list[bytes] = []

    async def execute(url: str, body: bytes) -> tuple[int, bytes]:
        ran.append(body)
        return 200, OK

    _run(store, execute, batch.id)
    assert len(ran) == 2 and not [b for b in ran if b'"b"' in b]
    outputs, _ = _outputs(store, batch.id)
    assert sorted(o["custom_id"] for o in outputs) == ["a", "b", "c"]
    assert store.batch(batch.id).request_counts.completed == 3  # type: ignore[union-attr]


def test_cancel_cancels_the_line_in_flight_and_ends_cancelled(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = _batch(store, _file(store, _line("quick"), _line("slow"), _line("never")))
    cancelled: list[bool] = []

    async def execute(url: str, body: bytes) -> tuple[int, bytes]:
        if b'"quick"' in body:
            return 200, OK
        store.request_cancel(batch.id)
        try:
            await asyncio.sleep(WAIT_S * 2)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return 200, OK

    _run(store, execute, batch.id, concurrency=1)
    done = store.batch(batch.id)
    assert done is not None and done.status == "cancelled" and cancelled == [True]
    assert done.cancelling_at and done.cancelled_at
    outputs, errors = _outputs(store, batch.id)
    assert [o["custom_id"] for o in outputs] == ["quick"] and errors == []


def test_a_pipeline_not_ready_writes_nothing_and_leaves_the_batch_to_resume(
    tmp_path: Path,
) -> None:
    store = BatchStore(tmp_path)
    batch = _batch(store, _file(store, _line("a")))
    busy = b'{"error":{"message":"starting","type":"server_error","code":"shutting_down"}}'

    async def refused(url: str, body: bytes) -> tuple[int, bytes]:
        return 503, busy

    async def main() -> None:
        runner = BatchRunner(store, refused, concurrency=1)
        assert runner.adopt(batch.id)
        await _until(lambda: not runner._running, "the run to stop")
        await runner.close()

    asyncio.run(main())
    stopped = store.batch(batch.id)
    assert stopped is not None and stopped.status == "in_progress"
    assert _outputs(store, batch.id) == ([], [])
    fd = store.lock(batch.id)  # released for whoever resumes it
    assert fd is not None
    os.close(fd)

    async def ok(url: str, body: bytes) -> tuple[int, bytes]:
        return 200, OK

    _run(store, ok, batch.id)
    assert store.batch(batch.id).status == "completed"  # type: ignore[union-attr]


def test_a_batch_held_elsewhere_is_not_adopted(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    batch = _batch(store, _file(store, _line("a")))
    held = store.lock(batch.id)

    async def main() -> bool:
        runner = BatchRunner(store, cast(Execute, None), concurrency=1)
        try:
            return runner.adopt(batch.id)
        finally:
            await runner.close()

    assert asyncio.run(main()) is False
    assert held is not None
    os.close(held)


# The executor


class _Pipeline:
    def __init__(self) -> None:
        self.options: list[RequestOptions] = []

    async def submit(self, text: str, options: RequestOptions) -> Completed:
        self.options.append(options)
        usage = Usage(prompt_tokens=1, completion_tokens=1)
        return Completed(request_id="r1", session_id=None, reply_to=0, text=text, usage=usage)


def test_a_line_runs_through_the_chat_route_at_the_batch_priority() -> None:
    pipeline = _Pipeline()
    stub = cast(Pipeline, pipeline)
    models = Models.single("m", Backend.for_worker("echo"))
    executor = LineExecutor(stub, model="m", models=models, priority=Priority.LOW, keepalive_s=1.0)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, answer = asyncio.run(executor.execute(CHAT, body))
    assert status == 200 and pipeline.options[0].priority == Priority.LOW
    sync = _Pipeline()
    route = ChatCompletions(
        cast(Pipeline, sync), "m", 1.0, admission=Admission(None), models=models
    )
    captured: list[bytes] = []

    class _Response:
        def send(self, status: int, body: bytes, *args: object) -> None:
            captured.append(body)

    asyncio.run(route.create(Request("POST", CHAT, "", {}, body), _Response()))  # type: ignore[arg-type]
    mine, theirs = json.loads(answer), json.loads(captured[0])
    assert {**mine, "created": 0} == {**theirs, "created": 0}
    assert sync.options[0].priority == Priority.NORMAL
    hot = json.dumps({**json.loads(body), "temperature": 9}).encode()
    status, refused = asyncio.run(executor.execute(CHAT, hot))
    assert status == 400 and json.loads(refused)["error"]["param"] == "temperature"
