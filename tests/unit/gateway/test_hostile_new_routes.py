"""Hostile values against the routes and tools added with issue 18: each field bounded.

The rule these tests hold the new surfaces to: every field or route is bounded
(sizes, counts, integers, time) and a value that is too big, of the wrong type,
never-ending or concurrent gets a clear refusal naming the field, never a 500,
unbounded growth or a path outside the run dir. The Batch API's routes and the
async requests' GET/DELETE run in-process here (the routes' handlers with a
recording response, a pipeline stub that is never ready so no line runs); the
MCP tools' arguments go through ``args.parse`` as the server calls it. The
happy paths and the live wiring are the surfaces' own test files.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from mpipeline.config import GatewayConfig
from mpipeline.gateway import batch_routes
from mpipeline.gateway.batch_files import BatchStore, valid_id
from mpipeline.gateway.batch_input import (
    MAX_ERRORS,
    MAX_FILENAME,
    MAX_LINES,
    Line,
    Upload,
    check_lines,
    parse_upload,
)
from mpipeline.gateway.batch_routes import Batches
from mpipeline.gateway.batch_shapes import CHAT, MAX_CUSTOM_ID, BatchError, FileObject
from mpipeline.gateway.exchange import JSON, Reply, Request
from mpipeline.gateway.jobs import JobTable
from mpipeline.gateway.jobs_routes import PREFIX, AsyncRequests
from mpipeline.gateway.mcp_tools import args as mcp_args
from mpipeline.gateway.models import Models
from mpipeline.gateway.native import NativeApi
from mpipeline.gateway.openai_fields import Backend
from mpipeline.pipeline import Pipeline

# Ids a client may put in a path: traversal, absolute, long, non-ASCII (as the
# server decodes a path: latin-1, never percent-decoded), control bytes, empty.
HOSTILE_IDS = [
    "../secret",
    "../../etc/passwd",
    "..",
    "/etc/passwd",
    "file-x/../../secret",
    "..%2Fsecret",
    "file-" + "a" * 70_000,
    "fïle-ü".encode().decode("latin-1"),
    "file-x\x00",
    "file-x\n",
    "",
]


class _Captured:
    """A ``Response`` that records the one answer a handler sends."""

    def __init__(self) -> None:
        self.status = 0
        self.body = b""

    def send(
        self, status: int, body: bytes, headers: object = (), content_type: str = JSON
    ) -> None:
        assert self.status == 0, "answered twice"
        self.status, self.body = status, body

    def send_reply(self, reply: Reply) -> None:
        self.send(reply.status, reply.body, reply.headers, reply.content_type)

    def json(self) -> Any:
        return json.loads(self.body)


class _NeverReady:
    """The pipeline as a booting replica sees it: the runner holds every batch, runs nothing."""

    def not_ready(self) -> str:
        return "starting"


Call = Callable[..., _Captured]
Fixture = tuple["_Routes", BatchStore, Path]


def _form(purpose: str, data: bytes, filename: str = "b.jsonl") -> tuple[str, bytes]:
    body = (
        (
            f'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n--XyZ--\r\n"
    )
    return "multipart/form-data; boundary=XyZ", body


def _line(custom_id: str) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})


class _Routes:
    """The Batch API's routes over one run dir, on a loop of their own."""

    def __init__(self, run_dir: Path) -> None:
        models = Models.single("m", Backend.for_worker("echo"))
        self.routes = Batches(
            cast(Pipeline, _NeverReady()),
            GatewayConfig(),
            model="m",
            models=models,
            keepalive_s=1.0,
        )
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(_started(self.routes, run_dir))

    def __call__(self, method: str, path: str, body: bytes = b"", **headers: str) -> _Captured:
        return self.all([(method, path, body, headers)])[0]

    def all(self, requests: list[tuple[str, str, bytes, dict[str, str]]]) -> list[_Captured]:
        """Answer ``requests`` concurrently, on the one loop, as a gateway would."""
        answers = [_Captured() for _ in requests]
        handlers = []
        for (method, target, body, headers), response in zip(requests, answers, strict=True):
            path, _, query = target.partition("?")
            prefix = path
            for route in self.routes.routes:
                if route.endswith("/") and path.startswith(route):
                    prefix = route
            handler = self.routes.routes[prefix][method]
            request = Request(method, path, query, headers, body)
            handlers.append(handler(request, response))  # type: ignore[arg-type]

        async def run() -> None:
            await asyncio.gather(*handlers)

        self.loop.run_until_complete(run())
        return answers

    def close(self) -> None:
        self.loop.run_until_complete(self.routes.close())
        self.loop.close()


@pytest.fixture
def batches(tmp_path: Path) -> Iterator[tuple[_Routes, BatchStore, Path]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    routes = _Routes(run_dir)
    try:
        yield routes, BatchStore(run_dir), tmp_path
    finally:
        routes.close()


async def _started(routes: Batches, run_dir: Path) -> None:
    routes.start(run_dir)


def _upload(call: Call, data: bytes, filename: str = "b.jsonl") -> _Captured:
    content_type, body = _form("batch", data, filename)
    return call("POST", "/v1/files", body, **{"content-type": content_type})


def _create(call: Call, **fields: Any) -> _Captured:
    return call("POST", "/v1/batches", json.dumps(fields).encode())


def _refused(answer: _Captured, param: str | None, status: int = 400) -> str:
    """The answer is OpenAI's error shape with ``param``; its message, short."""
    assert answer.status == status, answer.body[:300]
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert len(error["message"]) < 400, len(error["message"])
    return cast(str, error["message"])


# Ids in paths


def test_hostile_ids_are_404_and_never_reach_a_path_outside_the_store(
    batches: Fixture,
) -> None:
    call, store, tmp_path = batches
    # Bait one level up from the store's folders: a valid file and batch object, and a file
    # that a traversal through ``files/`` would read.
    assert _upload(call, (_line("a") + "\n").encode()).status == 200  # the folders exist
    bait = FileObject(id="secret", bytes=6, created_at=1, filename="s", purpose="batch")
    (store.root / "secret.json").write_bytes(msgspec.json.encode(bait))
    (store.root / "secret.jsonl").write_bytes(b"secret")
    (tmp_path / "secret.json").write_bytes(msgspec.json.encode(bait))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for hostile in HOSTILE_IDS:
        assert not valid_id(hostile)
        for method, path, param in [
            ("GET", f"/v1/files/{hostile}", "file_id"),
            ("GET", f"/v1/files/{hostile}/content", "file_id"),
            ("DELETE", f"/v1/files/{hostile}", "file_id"),
            ("GET", f"/v1/batches/{hostile}", "batch_id"),
            ("POST", f"/v1/batches/{hostile}/cancel", "batch_id"),
        ]:
            answer = call(method, path)
            assert answer.status == 404, (method, path[:80], answer.body[:200])
            assert answer.json()["error"]["param"] == param
            assert b'secret"' not in answer.body or b"no " in answer.body
            assert len(answer.body) < 600
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing made, nothing gone
    assert (store.root / "secret.jsonl").read_bytes() == b"secret"


# POST /v1/batches


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata[...]"),
        ({"metadata": {"k": 1}}, "metadata[...]"),
        ({"metadata": ["k", "v"]}, "metadata"),
        ({"metadata": "k=v"}, "metadata"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"completion_window": "24H"}, "completion_window"),
        ({"completion_window": 24}, "completion_window"),
        ({"endpoint": "/v1/nope"}, "endpoint"),
        ({"endpoint": ["/v1/chat/completions"]}, "endpoint"),
        ({"input_file_id": 7}, "input_file_id"),
        ({"input_file_id": ""}, "input_file_id"),
        ({"input_file_id": "file-" + "a" * 300}, "input_file_id"),
        ({"input_file_id": "../../etc/passwd"}, "input_file_id"),
        ({"input_file_id": None}, "input_file_id"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_create_refuses_each_hostile_field_by_name(
    batches: Fixture, fields: dict[str, Any], param: str
) -> None:
    call, store, _ = batches
    file_id = _upload(call, (_line("a") + "\n").encode()).json()["id"]
    good = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    _refused(_create(call, **{**good, **fields}), param)
    assert store.batch_count() == 0


def test_create_takes_metadata_at_openais_limits_and_refuses_bodies_that_are_not_objects(
    batches: Fixture,
) -> None:
    call, store, _ = batches
    file_id = _upload(call, (_line("a") + "\n").encode()).json()["id"]
    most = {"k" * 63 + chr(ord("a") + i): "v" * 512 for i in range(16)}
    made = _create(
        call, input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata=most
    )
    assert made.status == 200 and made.json()["metadata"] == most
    for body in (b"", b"[]", b"null", b'"x"', b"{", b"\xff\xfe", b"[" * 100_000):
        answer = call("POST", "/v1/batches", body)
        assert answer.status == 400, (body[:20], answer.body[:200])
        assert answer.json()["error"]["type"] == "invalid_request_error"
    assert store.batch_count() == 1


# GET /v1/batches


@pytest.mark.parametrize(
    "limit",
    ["0", "-1", "101", "abc", "1e3", "2.5", "9" * 5000, "10%00", "0x10"]
    + ["", "%205", "1_0", "+5", "%D9%A5", "5&limit=6"],
)
def test_list_refuses_a_limit_out_of_range_or_not_whole(batches: Fixture, limit: str) -> None:
    call, _, _ = batches
    assert "1 to 100" in _refused(call("GET", f"/v1/batches?limit={limit}"), "limit")


def test_list_pages_with_any_after_and_the_largest_limit(
    batches: Fixture,
) -> None:
    call, _, _ = batches
    file_id = _upload(call, (_line("a") + "\n").encode()).json()["id"]
    made = [_create(call, input_file_id=file_id, endpoint=CHAT).json()["id"] for _ in range(3)]
    listed = call("GET", "/v1/batches?limit=100").json()
    assert sorted(b["id"] for b in listed["data"]) == sorted(made) and not listed["has_more"]
    one = call("GET", "/v1/batches?limit=1").json()
    assert len(one["data"]) == 1 and one["has_more"]
    for after in ("batch_nope", "../../etc", "x" * 60_000, "ü"):
        page = call("GET", f"/v1/batches?after={after}")
        assert page.status == 200 and page.json()["data"] == []


# How much one run keeps


def test_stored_files_and_batches_are_capped_with_a_clear_refusal(
    batches: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    call, store, _ = batches
    monkeypatch.setattr(batch_routes, "MAX_FILES", 2)
    monkeypatch.setattr(batch_routes, "MAX_BATCHES", 1)
    first = _upload(call, (_line("a") + "\n").encode()).json()["id"]
    assert _create(call, input_file_id=first, endpoint=CHAT).status == 200
    assert "1 batches" in _refused(_create(call, input_file_id=first, endpoint=CHAT), None)
    second = _upload(call, b"{}\n").json()["id"]
    assert "DELETE /v1/files/" in _refused(_upload(call, b"{}\n"), "file")
    assert "DELETE /v1/files/" in _refused(
        _create(call, input_file_id=first, endpoint=CHAT), "file"
    )
    assert store.file_count() == 2 and store.batch_count() == 1
    assert call("DELETE", f"/v1/files/{second}").status == 200  # room again
    assert _upload(call, b"{}\n").status == 200


def test_concurrent_uploads_and_creates_each_get_their_own_id(
    batches: Fixture,
) -> None:
    call, store, _ = batches
    file_id = _upload(call, (_line("a") + "\n").encode()).json()["id"]
    start = threading.Barrier(16)

    def upload(i: int) -> str:
        start.wait()
        return store.add_file(f"{i}.jsonl", "batch", b"{}\n" * i).id

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(upload, range(16)))
    assert len(set(ids)) == 16
    assert {f.id for f in store.list_files()} == {file_id, *ids}
    assert not list(store.files.glob(".*.tmp"))  # no temp file left behind

    body = json.dumps({"input_file_id": file_id, "endpoint": CHAT}).encode()
    made = call.all([("POST", "/v1/batches", body, {})] * 8)
    assert {m.status for m in made} == {200}
    assert len({m.json()["id"] for m in made}) == 8 and store.batch_count() == 8
    cancels = call.all([("POST", f"/v1/batches/{made[0].json()['id']}/cancel", b"", {})] * 4)
    assert {c.status for c in cancels} == {200}
    assert {c.json()["status"] for c in cancels} <= {"cancelling", "cancelled"}


# POST /v1/files and the JSONL lines


def test_an_upload_with_a_hostile_form_is_refused_or_bounded() -> None:
    long_name = parse_upload(*_form("batch", b"{}\n", "ü" * 10_000))
    assert isinstance(long_name, Upload) and len(long_name.filename) == MAX_FILENAME
    huge_purpose = parse_upload(*_form("x" * 100_000, b"{}\n"))
    assert getattr(huge_purpose, "field", None) == "purpose"
    assert len(getattr(huge_purpose, "message", "")) < 200
    for content_type, body in [
        ("multipart/form-data", b"no boundary"),
        ("multipart/form-data; boundary=XyZ", b"\xff" * 1000),
        ("multipart/form-data; boundary=" + "b" * 10_000, b""),
        ("text/plain", b"{}"),
    ]:
        assert getattr(parse_upload(content_type, body), "status", None) == 400, content_type


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("[1]", "invalid_json_line"),
        ("null", "invalid_json_line"),
        ('"line"', "invalid_json_line"),
        ("1", "invalid_json_line"),
        ("\udcff", "invalid_json_line"),
        (_line("x" * (MAX_CUSTOM_ID + 1)), "invalid_json_line"),
        (_line(""), "invalid_json_line"),
        (_line("a").replace('"a"', "7"), "invalid_json_line"),
        (_line("a").replace(f'"{CHAT}"', "7"), "invalid_json_line"),
        (_line("a").replace('"POST"', '"DELETE"'), "invalid_json_line"),
        (json.dumps({"custom_id": "a", "method": "POST", "url": CHAT}), "invalid_json_line"),
        (_line("a").replace("}}", "}, ") + '"extra": 1}', "invalid_json_line"),
        (json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": []}), "invalid_body"),
        (
            json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": "x"}),
            "invalid_body",
        ),
        (
            json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": None}),
            "invalid_body",
        ),
        (_line("a").replace(f'"{CHAT}"', json.dumps("/v1/" + "x" * 10_000)), "invalid_url"),
    ],
)
def test_a_hostile_line_is_named_by_number(line: str, code: str) -> None:
    data = (_line("ok") + "\n" + line + "\n").encode("utf-8", "surrogateescape")
    errors = check_lines(data, CHAT)
    assert [(cast(BatchError, e).line, cast(BatchError, e).code) for e in errors] == [(2, code)]
    assert all(len(cast(BatchError, e).message) < 400 for e in errors)


def test_the_longest_custom_id_and_a_huge_body_are_taken() -> None:
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 1_000_000}]})
    line = json.dumps({"custom_id": "x" * MAX_CUSTOM_ID, "method": "POST", "url": CHAT})
    lines = check_lines(line[:-1].encode() + b', "body": ' + big.encode() + b"}", CHAT)
    assert [len(cast(Line, x).body) for x in lines] == [len(big)]


def test_lines_and_errors_are_counted_to_their_caps() -> None:
    many = "\n".join(_line(str(i)) for i in range(MAX_LINES + 5)).encode()
    errors = check_lines(many, CHAT)
    assert [(cast(BatchError, e).code, cast(BatchError, e).line) for e in errors] == [
        ("too_many_requests", MAX_LINES + 1)
    ]
    bad = check_lines(b"{nope\n" * (MAX_ERRORS * 3), CHAT)
    assert len(bad) == MAX_ERRORS
    assert cast(BatchError, bad[-1]).code == "too_many_errors"
    assert f"{MAX_ERRORS * 2 + 1} more" in cast(BatchError, bad[-1]).message
    dupes = check_lines(("\n".join([_line("same")] * 500)).encode(), CHAT)
    assert {cast(BatchError, e).code for e in dupes[:-1]} == {"duplicate_custom_id"}


# GET/DELETE /v1/requests/{id}


def test_an_unknown_async_request_id_is_a_short_404(tmp_path: Path) -> None:
    table: JobTable[Any, Any] = JobTable(ttl_s=60.0, max_jobs=4)
    routes = AsyncRequests(cast(Pipeline, None), cast(NativeApi, None), table)
    job = table.add()
    assert job is not None
    for hostile in [*HOSTILE_IDS, job.id + "x", job.id.upper(), job.id[:-1]]:
        for method in ("GET", "DELETE"):
            response = _Captured()
            request = Request(method, PREFIX + hostile, "", {})
            coro = routes.routes[PREFIX][method](request, response)  # type: ignore[arg-type]
            asyncio.run(cast(Coroutine[Any, Any, None], coro))
            assert response.status == 404, (method, hostile[:80])
            assert len(response.body) < 600
    assert table.get(job.id) is job and len(table) == 1  # nothing else touched


# MCP tools' arguments


@pytest.mark.parametrize(
    ("kind", "arguments", "named"),
    [
        (mcp_args.InferArgs, {}, "prompt"),
        (mcp_args.InferArgs, {"prompt": ""}, "prompt"),
        (mcp_args.InferArgs, {"prompt": ["x"]}, "prompt"),
        (mcp_args.InferArgs, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        (mcp_args.InferArgs, {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        (mcp_args.InferArgs, {"prompt": "x", "max_tokens": "9"}, "max_tokens"),
        (mcp_args.InferArgs, {"prompt": "x", "deadline_ms": 0}, "deadline_ms"),
        (mcp_args.InferArgs, {"prompt": "x", "deadline_ms": 1e300}, "deadline_ms"),
        (mcp_args.InferArgs, {"prompt": "x", "session_id": ""}, "session_id"),
        (mcp_args.InferArgs, {"prompt": "x", "session_id": "s" * 100_000}, "session_id"),
        (mcp_args.InferArgs, {"prompt": "x", "model": "m" * 257}, "model"),
        (mcp_args.InferArgs, {"prompt": "x", "priority": "urgent"}, "priority"),
        (
            mcp_args.InferArgs,
            {"prompt": "x", "metadata": {str(i): "" for i in range(17)}},
            "metadata",
        ),
        (mcp_args.InferArgs, {"prompt": "x", "history": [{"role": "user"}]}, "history"),
        (
            mcp_args.InferArgs,
            {"prompt": "x", "history": [{"role": "user", "content": "h"}] * 4097},
            "history",
        ),
        (mcp_args.InferArgs, {"prompt": "x", "bogus": 1}, "bogus"),
        (mcp_args.BatchArgs, {"prompts": []}, "prompts"),
        (mcp_args.BatchArgs, {"prompts": ["x"] * (mcp_args.MAX_BATCH + 1)}, "prompts"),
        (mcp_args.BatchArgs, {"prompts": "x"}, "prompts"),
        (mcp_args.BatchArgs, {"prompts": [1]}, "prompts"),
        (mcp_args.BatchArgs, {"prompts": ["x"], "concurrency": 0}, "concurrency"),
        (mcp_args.BatchArgs, {"prompts": ["x"], "concurrency": 17}, "concurrency"),
        (mcp_args.BatchArgs, {"prompts": ["x"], "concurrency": "4"}, "concurrency"),
        (mcp_args.BatchArgs, {"prompts": ["x"], "concurrency": 4.5}, "concurrency"),
        (mcp_args.BatchArgs, {"prompts": ["x"], "concurrency": 10**30}, "concurrency"),
        (mcp_args.StatusArgs, {"verbose": True}, "verbose"),
        (mcp_args.DlqListArgs, {"limit": 0}, "limit"),
        (mcp_args.DlqListArgs, {"limit": mcp_args.MAX_LIST + 1}, "limit"),
        (mcp_args.DlqListArgs, {"limit": True}, "limit"),
        (mcp_args.DlqListArgs, {"limit": "10"}, "limit"),
        (mcp_args.DlqListArgs, {"ids": ["r"] * (mcp_args.MAX_IDS + 1)}, "ids"),
        (mcp_args.DlqListArgs, {"ids": ["r" * 257]}, "ids"),
        (mcp_args.DlqListArgs, {"ids": "r"}, "ids"),
        (mcp_args.DlqListArgs, {"reasons": ["ring_full"] * (mcp_args.MAX_REASONS + 1)}, "reasons"),
        (mcp_args.DlqListArgs, {"reasons": ["r" * 65]}, "reasons"),
        (mcp_args.DlqListArgs, {"since": "1" * (mcp_args.MAX_SINCE + 1)}, "since"),
        (mcp_args.DlqListArgs, {"since": 30}, "since"),
        (mcp_args.DlqReplayArgs, {"ids": ["r"] * (mcp_args.MAX_IDS + 1)}, "ids"),
        (mcp_args.DlqReplayArgs, {"reasons": ["x"] * (mcp_args.MAX_REASONS + 1)}, "reasons"),
        (mcp_args.DlqReplayArgs, {"since": "s" * 100_000}, "since"),
        (mcp_args.DlqReplayArgs, {"all": "yes"}, "all"),
        (mcp_args.DlqReplayArgs, {"deadline_ms": -1}, "deadline_ms"),
    ],
)
def test_each_tool_argument_is_bounded_and_named(
    kind: type[Any], arguments: dict[str, Any], named: str
) -> None:
    with pytest.raises(mcp_args.BadArgumentsError) as refused:
        mcp_args.parse(kind, arguments)
    assert f"`{named}" in str(refused.value), str(refused.value)
    assert len(str(refused.value)) < 400


def test_each_tool_takes_its_arguments_at_their_bounds() -> None:
    most = {
        "ids": ["r" * 256] * mcp_args.MAX_IDS,
        "reasons": ["x" * 64] * mcp_args.MAX_REASONS,
        "since": "1" * mcp_args.MAX_SINCE,
    }
    assert len(mcp_args.parse(mcp_args.DlqListArgs, {**most, "limit": 1000}).ids) == 1000
    assert len(mcp_args.parse(mcp_args.DlqReplayArgs, most).reasons) == mcp_args.MAX_REASONS
    batch = {"prompts": ["x"] * mcp_args.MAX_BATCH, "concurrency": mcp_args.MAX_CONCURRENCY}
    assert mcp_args.parse(mcp_args.BatchArgs, batch).concurrency == mcp_args.MAX_CONCURRENCY
    schema = mcp_args.input_schema(mcp_args.DlqReplayArgs)
    assert schema["properties"]["ids"]["maxItems"] == mcp_args.MAX_IDS
    assert schema["properties"]["reasons"]["maxItems"] == mcp_args.MAX_REASONS
