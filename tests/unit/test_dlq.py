"""The dead-letter queue file: format, permissions, group commit, reading back, CLI.

The promises checked here are the ones the reliability invariants lean on: a
record is fsynced before anyone is told it exists, one batch is one write (so
processes appending together never interleave lines), a torn tail never hides
the records before (or after) it, and only owner can read the file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import errno
import functools
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from mpipeline.cli import main
from mpipeline.dlq import (
    DLQ_FILE,
    DeadLetter,
    DeadLetterQueue,
    Entry,
    ReplayMarker,
    gone_letter,
    letter_for,
    listing,
    read_entries,
)
from mpipeline.errors import ErrorCode, ExitCode, MPipelineError, RequestFailed
from mpipeline.messages import (
    Completed,
    Failed,
    Priority,
    PromptRequest,
    Turn,
    Usage,
    failed_from,
)
from mpipeline.ops import dlq as _cli_dlq
from mpipeline.pipeline import Pipeline
from mpipeline.pipeline._inflight import Pending
from mpipeline.workers._failures import status_failure

CANARY = "sk-canary-9f8e7d6c5b4a"


def _request(rid: str = "abc0-1", text: str = "hello\nworld", **kw: Any) -> PromptRequest:
    fields: dict[str, Any] = {
        "request_id": rid,
        "session_id": "s1",
        "input": text,
        "metadata": {"user": "u7"},
        "priority": Priority.HIGH,
        "deadline_ns": 5_000_000_000,
        "reply_to": 2,
        "max_tokens": 64,
        **kw,
    }
    return PromptRequest(**fields)


def _failed(rid: str = "abc0-1", code: ErrorCode = ErrorCode.RING_FULL) -> Failed:
    return Failed(
        request_id=rid,
        session_id="s1",
        reply_to=2,
        code=code,
        reason=f"{code}:rag0-assemble0",
        stage="rag",
    )


def _letter(rid: str = "abc0-1", code: ErrorCode = ErrorCode.RING_FULL, **kw: Any) -> DeadLetter:
    return msgspec.structs.replace(letter_for(_request(rid), _failed(rid, code), 250.0), **kw)


def _write(path: Path, entries: list[Entry], **kw: Any) -> DeadLetterQueue:
    async def go() -> DeadLetterQueue:
        dlq = DeadLetterQueue(path, **kw)
        await dlq.record(entries)
        await dlq.aclose()
        return dlq

    return asyncio.run(go())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / DLQ_FILE


# Format


def test_records_round_trip_as_one_tagged_json_object_per_line(path: Path) -> None:
    dead = _letter()
    completed = Completed(
        request_id="old0-3",
        session_id=None,
        reply_to=0,
        text="the answer",
        usage=Usage(prompt_tokens=3, completion_tokens=2),
    )
    gone = gone_letter(completed)
    gone_failed = gone_letter(_failed("old0-4", ErrorCode.STAGE_ERROR))
    marker = ReplayMarker(replay_of="abc0-1", ts=1.5, new_request_id="def0-0", outcome="ok")
    _write(path, [dead, gone, gone_failed, marker])

    assert list(read_entries(path)) == [dead, gone, gone_failed, marker]
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert list(first)[:6] == ["kind", "id", "ts", "reason", "stage", "message"]
    assert first["kind"] == "dead" and first["reason"] == "ring_full"
    assert first["request"] == {
        "input": "hello\nworld",
        "session_id": "s1",
        "metadata": {"user": "u7"},
        "priority": "high",
        "deadline_ms": 250.0,
        "max_tokens": 64,
        "stream": False,
        "chat": None,
    }
    assert json.loads(lines[1])["request"] is None
    assert json.loads(lines[1])["result"]["text"] == "the answer"
    assert json.loads(lines[2])["result"]["outcome"] == "stage_error"
    assert json.loads(lines[3])["kind"] == "replayed"
    assert dead.request is not None and dead.request.priority_value() is Priority.HIGH


TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
ASKED = {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
PARAMS = {"temperature": 0.2, "tools": [{"type": "function", "function": {"name": "f"}}]}


def _conversation() -> PromptRequest:
    """A chat request that only its history, fields and model make what it is."""
    return _request(
        history=[
            Turn(role="user", content="weather?"),
            Turn(role="assistant", content="", raw=msgspec.json.encode(ASKED)),
        ],
        params=msgspec.json.encode(PARAMS),
        input_raw=msgspec.json.encode(RESULT),
        model="beta",
        endpoint="",
    )


def test_a_record_keeps_the_conversation_fields_and_model_as_json(path: Path) -> None:
    """Without them a replay would be another request (a tool result as plain text)."""
    dead = letter_for(_conversation(), _failed(), 250.0)
    _write(path, [dead])
    assert list(read_entries(path)) == [dead]
    chat = json.loads(path.read_bytes())["request"]["chat"]
    assert chat == {
        "history": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "raw": ASKED},
        ],
        "params": PARAMS,
        "input_raw": RESULT,
        "model": "beta",
    }


def test_a_replay_sends_the_request_as_it_was(path: Path) -> None:
    """``dlq replay`` resubmits history, fields, input JSON, model and endpoint."""
    from types import SimpleNamespace

    from mpipeline.gateway.dlq_replay import resubmit as _resubmit

    sent: dict[str, Any] = {}

    class Recorder:
        async def submit(self, text: str, **fields: Any) -> Completed:
            sent.update(fields, text=text)
            return Completed(
                request_id="new0-1",
                session_id=None,
                reply_to=0,
                text="",
                usage=Usage(prompt_tokens=0, completion_tokens=0),
            )

    original = _conversation()
    record = letter_for(original, _failed(), 250.0)
    claimed: Any = SimpleNamespace(
        item=SimpleNamespace(record=record), claim=SimpleNamespace(claim="t1")
    )
    marker = asyncio.run(_resubmit(Recorder(), claimed, None))  # type: ignore[arg-type]
    assert marker.outcome == "ok" and marker.new_request_id == "new0-1"
    assert sent["text"] == original.input and sent["history"] == original.history
    assert (sent["params"], sent["input_raw"]) == (original.params, original.input_raw)
    assert (sent["model"], sent["endpoint"]) == ("beta", None)


def test_file_is_0600_in_a_0700_dir_even_with_umask_0(path: Path) -> None:
    old = os.umask(0)
    try:
        _write(path, [_letter()])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_existing_file_open_to_others_is_made_owner_only(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"")
    path.chmod(0o644)
    _write(path, [_letter()])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_open_dir_is_warned_about(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(mode=0o755)
    path.parent.chmod(0o755)
    with caplog.at_level(logging.WARNING, "mpipeline.dlq"):
        _write(path, [_letter()])
    assert "chmod 700" in caplog.text


def test_a_symlink_is_refused(path: Path, tmp_path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    (tmp_path / "elsewhere").write_bytes(b"")
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(MPipelineError, match="dead-letter queue"):
        DeadLetterQueue(path)


def test_a_failure_that_quotes_the_key_is_recorded_without_it(path: Path) -> None:
    # RELIABILITY I7. The one way a key can reach a record: an upstream's 401
    # that quotes it (OpenAI's does), classified by the worker and carried as
    # the Failed's reason (runner/_pool.py), then written here.
    error = {
        "message": f"Incorrect API key provided: {CANARY}",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
    headers = httpx.Headers({"www-authenticate": f'Bearer realm="{CANARY}"'})
    failure = status_failure(401, headers, json.dumps({"error": error}).encode())
    request = _request("k0-1")
    failed = failed_from(request, failure.code, str(failure), "inference")
    _write(path, [letter_for(request, failed, 250.0), gone_letter(failed)])
    text = path.read_text()
    assert text.count("upstream answered HTTP 401 (invalid_api_key)") == 2  # recorded...
    assert CANARY not in text  # ...without the key


# Group commit and durability


class _Spy:
    """Records the order of writes, fsyncs and resolutions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        self.writes: list[bytes] = []
        self.gate: threading.Event | None = None
        self.in_fsync = threading.Event()
        real_write, real_fsync = os.write, os.fsync

        def write(fd: int, data: Any) -> int:
            self.writes.append(bytes(data))
            self.events.append("write")
            return real_write(fd, data)

        def fsync(fd: int) -> None:
            self.in_fsync.set()
            if self.gate is not None:
                self.gate.wait(10)
            real_fsync(fd)
            self.events.append("fsync")

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)


def _note(events: list[str], what: str, _done: object) -> None:
    events.append(what)


def test_one_write_per_loop_turn_and_fsync_before_any_future_resolves(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)

    async def go() -> None:
        dlq = DeadLetterQueue(path)
        futures = [dlq.record([_letter(f"a0-{i}")]) for i in range(5)]
        for i, f in enumerate(futures):
            f.add_done_callback(functools.partial(_note, spy.events, f"resolved {i}"))
        await asyncio.gather(*futures)
        await dlq.aclose()
        assert dlq.written == 5 and dlq.errors == 0

    asyncio.run(go())
    assert spy.events == ["write", "fsync", *(f"resolved {i}" for i in range(5))]
    assert spy.writes[0].count(b"\n") == 5


def test_records_that_arrive_during_a_write_go_in_the_next_batch(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    gate = spy.gate = threading.Event()

    async def go() -> None:
        dlq = DeadLetterQueue(path)
        first = dlq.record([_letter("a0-0")])
        # Until the gate opens the first batch sits in its fsync.
        assert await asyncio.to_thread(spy.in_fsync.wait, 10)
        later = [dlq.record([_letter(f"a0-{i}")]) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        assert not first.done() and not any(f.done() for f in later)
        gate.set()
        await asyncio.gather(first, *later)
        await dlq.aclose()

    asyncio.run(go())
    assert spy.events == ["write", "fsync", "write", "fsync"]
    assert [w.count(b"\n") for w in spy.writes] == [1, 3]


def test_fsync_can_be_turned_off(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    _write(path, [_letter()], fsync=False)
    assert spy.events == ["write"]


def test_a_failed_write_is_logged_counted_and_still_resolves(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def go() -> DeadLetterQueue:
        dlq = DeadLetterQueue(path)
        monkeypatch.setattr(os, "write", full)
        await asyncio.wait_for(dlq.record([_letter("a0-1"), _letter("a0-2")]), 10)
        await dlq.aclose()
        return dlq

    with caplog.at_level(logging.ERROR, "mpipeline.dlq"):
        dlq = asyncio.run(go())
    assert dlq.errors == 2 and dlq.written == 0
    assert "No space left" in caplog.text


def test_record_after_close_logs_and_resolves(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        dlq = DeadLetterQueue(path)
        await dlq.aclose()
        await dlq.record([_letter()])
        assert dlq.errors == 1

    with caplog.at_level(logging.ERROR, "mpipeline.dlq"):
        asyncio.run(go())
    assert "closed" in caplog.text


_APPENDER = """
import asyncio, sys
from mpipeline.dlq import DeadLetterQueue, DeadLetter

async def go():
    dlq = DeadLetterQueue(sys.argv[1])
    tag = sys.argv[2]
    for batch in range(20):
        entries = [
            DeadLetter(id=f"{tag}-{batch}-{i}", ts=0.0, reason="ring_full", stage="rag",
                       message=tag * 20000)
            for i in range(5)
        ]
        await dlq.record(entries)
    await dlq.aclose()

asyncio.run(go())
"""


def test_two_processes_appending_at_once_never_interleave_lines(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), tag]) for tag in "xy"]
    assert [p.wait(60) for p in procs] == [0, 0]
    warnings: list[str] = []
    entries = list(read_entries(path, warnings.append))
    assert warnings == []
    ids = {e.id for e in entries if isinstance(e, DeadLetter)}
    assert len(entries) == len(ids) == 200
    for e in entries:
        assert isinstance(e, DeadLetter) and e.message == e.id[0] * 20000


# Reading back


def test_a_torn_last_line_is_skipped_with_a_warning(path: Path) -> None:
    _write(path, [_letter("a0-1"), _letter("a0-2")])
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(whole.splitlines()[0][:50])
    warnings: list[str] = []
    entries = list(read_entries(path, warnings.append))
    assert [e.id for e in entries if isinstance(e, DeadLetter)] == ["a0-1", "a0-2"]
    assert len(warnings) == 1 and "torn record" in warnings[0] and ":3:" in warnings[0]


def test_a_record_appended_after_a_torn_one_is_still_read(path: Path) -> None:
    _write(path, [_letter("a0-1")])
    with open(path, "ab") as f:
        f.write(path.read_bytes()[:70])  # a writer died here, no newline
    _write(path, [_letter("a0-2")])  # the next append continues that line
    warnings: list[str] = []
    entries = list(read_entries(path, warnings.append))
    assert [e.id for e in entries if isinstance(e, DeadLetter)] == ["a0-1", "a0-2"]
    assert len(warnings) == 1 and "torn" in warnings[0]


def test_garbage_lines_are_skipped_and_named(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b'{"kind":"other"}\nnot json\n\n')
    _write(path, [_letter("a0-1")])
    warnings: list[str] = []
    entries = list(read_entries(path, warnings.append))
    assert [e.id for e in entries if isinstance(e, DeadLetter)] == ["a0-1"]
    assert [w.split(": ")[0].rsplit(":", 1)[1] for w in warnings] == ["1", "2"]


def test_a_missing_file_is_an_empty_queue(tmp_path: Path) -> None:
    assert list(read_entries(tmp_path / "nothing.jsonl")) == []


def test_listing_filters_and_joins_replay_markers() -> None:
    old = _letter("a0-1", ErrorCode.DEADLINE_EXCEEDED, ts=100.0)
    shed = _letter("a0-2", ErrorCode.RING_FULL, ts=200.0)
    again = _letter("b0-0", ErrorCode.DEADLINE_EXCEEDED, ts=300.0)
    gone = msgspec.structs.replace(gone_letter(_failed("c0-0")), ts=300.0)
    entries: list[Entry] = [
        old,
        shed,
        ReplayMarker(
            replay_of="a0-1", ts=250.0, new_request_id="b0-0", outcome="deadline_exceeded"
        ),
        again,
        ReplayMarker(replay_of="a0-2", ts=260.0, new_request_id=None, outcome="shutting_down"),
        gone,
    ]
    items = listing(entries)
    assert [i.record.id for i in items] == ["a0-1", "a0-2", "b0-0", "c0-0"]
    assert [i.pending_replay for i in items] == [False, True, True, False]
    first = items[0].replayed
    assert first is not None and first.new_request_id == "b0-0"
    assert items[2].replayed is None

    assert [i.record.id for i in listing(entries, reasons=["deadline_exceeded"])] == [
        "a0-1",
        "b0-0",
    ]
    assert [i.record.id for i in listing(entries, since=200.0)] == ["a0-2", "b0-0", "c0-0"]
    assert [i.record.id for i in listing(entries, ids=["a0-2"])] == ["a0-2"]


def test_parse_since() -> None:
    now = 10_000.0
    assert _cli_dlq.parse_since("10m", now) == now - 600
    assert _cli_dlq.parse_since("2h", now) == now - 7200
    assert _cli_dlq.parse_since("1.5s", now) == now - 1.5
    assert _cli_dlq.parse_since("1d", now) == now - 86400
    utc = "2024-06-01T12:00:00+00:00"
    assert _cli_dlq.parse_since(utc) == datetime.datetime.fromisoformat(utc).timestamp()
    local = datetime.datetime(2024, 6, 1, 12, 0, 0).timestamp()
    assert _cli_dlq.parse_since("2024-06-01 12:00:00") == local
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        _cli_dlq.parse_since("yesterday")


# The client's wiring (Pipeline without a supervisor: only its tables)


def _client(path: Path) -> Pipeline:
    p = Pipeline(None, run_dir=path.parent)
    p._table.prefix = "abc0-"
    return p


def test_a_failure_reaches_the_caller_only_after_its_record_is_fsynced(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)

    async def go() -> None:
        p = _client(path)
        p._table.dlq = DeadLetterQueue(path)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completed] = loop.create_future()
        req = _request("abc0-7", deadline_ns=3_000_000_000)
        p._inflight[req.request_id] = Pending(req, req.deadline_ns, future, 1_000_000_000)
        future.add_done_callback(lambda _f: spy.events.append("answered"))
        p._table.resolve_failed(
            p._table.failed("abc0-7", "s1", ErrorCode.DEADLINE_EXCEEDED, "too late")
        )
        assert p.inflight == 0  # out of the table at once: nothing answers it twice
        p._table.resolve_failed(p._table.failed("abc0-7", "s1", ErrorCode.SHUTTING_DOWN, "again"))
        with pytest.raises(RequestFailed) as caught:
            await future
        assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED
        await p._table.dlq.aclose()

    asyncio.run(go())
    assert spy.events == ["write", "fsync", "answered"]
    (record,) = read_entries(path)
    assert isinstance(record, DeadLetter) and record.id == "abc0-7"
    assert record.reason == "deadline_exceeded" and record.stage == "client"
    assert record.request is not None and record.request.deadline_ms == 2000.0


def test_results_for_an_earlier_client_of_the_slot_are_recorded_as_client_gone(
    path: Path,
) -> None:
    async def go() -> Pipeline:
        p = _client(path)
        p._table.dlq = DeadLetterQueue(path)
        usage = Usage(prompt_tokens=1, completion_tokens=1)
        done = Completed(request_id="fff0-1", session_id=None, reply_to=0, text="hi", usage=usage)
        p._table.deliver(done)  # an earlier process's request
        p._table.deliver(
            msgspec.structs.replace(done, request_id="abc0-1")
        )  # ours, already answered
        await p._table.dlq.aclose()
        return p

    p = asyncio.run(go())
    assert p.stats["gone"] == 1 and p.stats["late"] == 1
    (record,) = read_entries(path)
    assert isinstance(record, DeadLetter)
    assert record.reason == "client_gone" and record.request is None
    assert record.result is not None and record.result.text == "hi"


# CLI (reading only; replay needs a supervisor: tests/integration/test_dlq.py)


@pytest.fixture
def filled(path: Path) -> Iterator[Path]:
    now = time.time()
    _write(
        path,
        [
            _letter("a0-1", ErrorCode.DEADLINE_EXCEEDED, ts=now - 7200),
            _letter("a0-2", ErrorCode.RING_FULL, ts=now),
            ReplayMarker(replay_of="a0-1", ts=now, new_request_id="b0-0", outcome="ok"),
        ],
    )
    yield path.parent


def test_cli_list(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "list", "--run-dir", str(filled)]) == ExitCode.OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "TIME", "REASON", "STAGE", "REPLAYED", "INPUT"]
    assert "a0-1" in out[1] and "deadline_exceeded" in out[1] and "b0-0 ok" in out[1]
    assert '"hello\\nworld"' in out[1]
    assert "a0-2" in out[2] and "ring_full" in out[2]
    assert out[3].startswith("2 records in") and out[3].endswith("(1 not replayed)")

    assert main(["dlq", "list", "--run-dir", str(filled), "--since", "1h", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["id"] == "a0-2" and json.loads(line)["replays"] == []

    assert main(["dlq", "list", "--run-dir", str(filled), "--reason", "deadline_exceeded"]) == 0
    assert "a0-2" not in capsys.readouterr().out


def test_cli_show(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "show", "a0-1", "--run-dir", str(filled)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "reason:   deadline_exceeded" in out
    assert "    hello\n    world\n" in out and "session_id:  s1" in out
    assert "-> b0-0: ok" in out

    assert main(["dlq", "show", "a0-2", "--json", "--run-dir", str(filled)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["request"]["input"] == "hello\nworld" and shown["kind"] == "dead"

    assert main(["dlq", "show", "nope", "--run-dir", str(filled)]) == ExitCode.FAILURE
    assert "no record 'nope'" in capsys.readouterr().err


def test_cli_replay_without_a_supervisor_fails_clearly(
    filled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dlq", "replay", "--all", "--run-dir", str(filled)]) == ExitCode.FAILURE
    assert "no supervisor is running" in capsys.readouterr().err
    assert main(["dlq", "replay", "--run-dir", str(filled)]) == ExitCode.USAGE
    assert main(["dlq", "replay", "a0-1", "--all", "--run-dir", str(filled)]) == ExitCode.USAGE
    assert main(["dlq", "replay", "zz", "--run-dir", str(filled)]) == ExitCode.FAILURE
    assert "zz: no such record" in capsys.readouterr().err


def test_cli_list_of_an_empty_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "list", "--run-dir", str(tmp_path)]) == ExitCode.OK
    assert capsys.readouterr().out.startswith("0 records in")
