"""The dead-letter queue against a real supervisor (RELIABILITY I2, issue 4 §4).

Requests that fail (expired on a slow model, poisoned at assemble) each get
exactly one record with their full payload, written before the caller hears
of the failure; the CLI lists and shows them; once the cause is gone,
``dlq replay --all`` resubmits them, they complete, and the markers say so.
Results for a client that died are kept as ``client_gone``.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mpipeline.dlq import (
    DLQ_FILE,
    DeadLetter,
    DeadLetterQueue,
    ReplayMarker,
    RequestPayload,
    read_entries,
)
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import Completed
from mpipeline.pipeline import Pipeline
from tests.integration.conftest import SupervisorFactory, faults_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CLI_TIMEOUT_S = 60.0
# Each echo reply takes 4 x 400 ms: far past the 600 ms deadline of the slow ones.
SLOW = {"stages.inference.echo.token_delay_ms": 400.0, "stages.inference.echo.max_tokens": 4}
DEADLINE_MS = 600.0


def _cli(run_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpipeline", "dlq", *argv, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _records(path: Path) -> list[DeadLetter]:
    return [e for e in read_entries(path) if isinstance(e, DeadLetter)]


def test_failed_requests_are_recorded_listed_shown_and_replayed(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(SLOW, env=faults_env("assemble:raise_on=POISON"))
    path = sp.run_dir / DLQ_FILE
    on_disk_first: dict[str, bool] = {}

    def note(future: asyncio.Future[Completed]) -> None:
        # Runs the moment the caller's future resolves: the record must be there already.
        exc = future.exception()
        if isinstance(exc, RequestFailed):
            on_disk_first[exc.request_id] = f'"id":"{exc.request_id}"' in path.read_text()

    async def submit_all() -> dict[str, Any]:
        outcomes: dict[str, Any] = {}
        async with Pipeline.attach(sp.run_dir) as p:
            futures: dict[str, asyncio.Future[Completed]] = {}
            for i in range(3):
                text = f"slow request {i} with several words in it"
                fut = p.submit_nowait(text, session_id=f"s{i}", deadline_ms=DEADLINE_MS)
                futures[text] = fut
            for i in range(2):
                text = f"POISON pill {i}"
                fut = p.submit_nowait(text, metadata={"n": str(i)}, max_tokens=2)
                futures[text] = fut
            for fut in futures.values():
                fut.add_done_callback(note)
            for text, fut in futures.items():
                try:
                    outcomes[text] = await asyncio.wait_for(fut, 60)
                except RequestFailed as exc:
                    outcomes[text] = exc
        return outcomes

    with sp.explain():
        outcomes = asyncio.run(submit_all())
    failures = {text: o for text, o in outcomes.items() if isinstance(o, RequestFailed)}
    assert len(failures) == 5, outcomes
    codes = {text: o.code for text, o in failures.items()}
    assert [c for t, c in codes.items() if t.startswith("slow")] == [
        ErrorCode.DEADLINE_EXCEEDED
    ] * 3
    assert [c for t, c in codes.items() if t.startswith("POISON")] == [ErrorCode.STAGE_ERROR] * 2
    assert all(on_disk_first.values()) and len(on_disk_first) == 5

    # Exactly one record per failure, with the full payload, in an owner-only file.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sp.run_dir.stat().st_mode) == 0o700
    records = {r.id: r for r in _records(path)}
    assert len(records) == len(_records(path)) == 5
    for text, exc in failures.items():
        record = records[exc.request_id]
        assert record.reason == str(exc.code) and record.request is not None
        assert record.request.input == text
    slow = [r for r in records.values() if r.reason == "deadline_exceeded"]
    assert all(r.request and r.request.deadline_ms == DEADLINE_MS for r in slow)
    assert sorted(r.request.session_id or "" for r in slow if r.request) == ["s0", "s1", "s2"]
    poison = [r for r in records.values() if r.reason == "stage_error"]
    assert all(r.stage == "assemble" and r.request and r.request.max_tokens == 2 for r in poison)

    listed = _cli(sp.run_dir, "list", "--reason", "deadline_exceeded")
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()[1:4]) == sorted(
        r.id for r in slow
    )
    assert "3 records" in listed.stdout and "(3 not replayed)" in listed.stdout

    shown = _cli(sp.run_dir, "show", poison[0].id)
    assert shown.returncode == 0, shown.stderr
    assert poison[0].request is not None
    assert f"    {poison[0].request.input}\n" in shown.stdout
    assert "reason:   stage_error" in shown.stdout and "stage:    assemble" in shown.stdout

    # The cause goes away: the same run dir, a fast model, no poison.
    sp.stop()
    sp2 = start_supervisor({})
    with sp2.explain():
        replay = _cli(sp2.run_dir, "replay", "--all")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    lines = [line for line in replay.stdout.splitlines() if " -> " in line]
    assert sorted(line.split()[0] for line in lines) == sorted(records)
    assert all(line.endswith(": ok") for line in lines), replay.stdout
    assert "replayed 5: 5 ok, 0 failed" in replay.stdout

    after = _cli(sp2.run_dir, "list", "--json")
    assert after.returncode == 0, after.stderr
    rows = [json.loads(line) for line in after.stdout.splitlines()]
    assert len(rows) == 5  # successful replays add markers, not records
    assert all(row["replays"][-1]["outcome"] == "ok" for row in rows)
    assert "(0 not replayed)" in _cli(sp2.run_dir, "list").stdout
    again = _cli(sp2.run_dir, "replay", "--all")
    assert again.returncode == 0 and "nothing to replay" in again.stdout


_GONE_CLIENT = """
import asyncio, os, sys
from mpipeline.pipeline import Pipeline

async def go():
    p = Pipeline.attach(sys.argv[1])
    await p.start()
    p.submit_nowait("a client that will not wait for this", deadline_ms=30000)
    await asyncio.sleep(0.2)  # the request is in the ring by now
    (rid,) = p._inflight
    print(p.client_index, rid, flush=True)
    os._exit(0)  # gone without a word, like a SIGKILLed gateway

asyncio.run(go())
"""


def test_a_result_for_a_client_that_died_is_recorded_as_client_gone(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(SLOW)
    path = sp.run_dir / DLQ_FILE
    with sp.explain():
        gone = subprocess.run(
            [sys.executable, "-c", _GONE_CLIENT, str(sp.run_dir)],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=True,
        )
    slot, rid = gone.stdout.split()

    async def take_over() -> dict[str, int]:
        async with Pipeline.attach(sp.run_dir) as p:
            assert p.client_index == int(slot)  # the dead client's slot, its return ring
            for _ in range(3000):
                if p.stats["gone"]:
                    break
                await asyncio.sleep(0.01)
            return dict(p.stats)

    with sp.explain():
        stats = asyncio.run(take_over())
    assert stats["gone"] == 1, stats
    (record,) = _records(path)
    assert record.id == rid and record.reason == "client_gone" and record.request is None
    assert record.result is not None and record.result.outcome == "completed"
    assert record.result.text and record.result.completion_tokens == 4


def test_two_replays_at_once_resubmit_each_record_exactly_once(
    start_supervisor: SupervisorFactory,
) -> None:
    """RELIABILITY #46 (issue 15 §6): two ``replay --all`` started together split the
    records between them; none is submitted twice, none is left out."""
    # Each replay takes a while (4 x 50 ms per request), so the two overlap.
    sp = start_supervisor(
        {"stages.inference.echo.token_delay_ms": 50.0, "stages.inference.echo.max_tokens": 4}
    )
    path = sp.run_dir / DLQ_FILE
    ids = [f"dead0-{i}" for i in range(40)]
    letters = [
        DeadLetter(
            id=rid,
            ts=1.0,
            reason="ring_full",
            stage="rag",
            message="ring_full:rag0-assemble0",
            request=RequestPayload(input=f"replay me {rid}", deadline_ms=20_000.0),
        )
        for rid in ids
    ]

    async def fill() -> None:
        dlq = DeadLetterQueue(path)
        await dlq.record(letters)
        await dlq.aclose()

    asyncio.run(fill())
    argv = [sys.executable, "-m", "mpipeline", "dlq", "replay", "--all", "--run-dir"]
    procs = [
        subprocess.Popen(
            [*argv, str(sp.run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=CLI_TIMEOUT_S) for p in procs]
    with sp.explain():
        assert [p.returncode for p in procs] == [0, 0], outputs
    submitted = [
        line.split()[0] for out, _ in outputs for line in out.splitlines() if " -> " in line
    ]
    assert sorted(submitted) == sorted(ids), outputs  # each exactly once, across both
    markers = [e for e in read_entries(path) if isinstance(e, ReplayMarker)]
    assert sorted(m.replay_of for m in markers) == sorted(ids)
    assert all(m.outcome == "ok" and m.claim for m in markers)
    again = _cli(sp.run_dir, "replay", "--all")
    assert again.returncode == 0 and "nothing to replay" in again.stdout
