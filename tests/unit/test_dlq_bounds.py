"""The DLQ stays bounded, and two replays never take one record (issue 15 §5, §6).

A record larger than the cap is cut and marked, never dropped: its id, reason
and stage stay, so an operator still sees that the request failed and why.
The live file rotates by size and only ``keep`` rotated files stay; readers
read across them, oldest first, also while other processes append and rotate.
Claims: a replay takes records under an exclusive lock, a record another live
replay holds is skipped, and the claim of a process that died is void.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mpipeline.cli import main
from mpipeline.dlq import (
    DLQ_FILE,
    MAX_RECORD_BYTES,
    ClaimMarker,
    DeadLetter,
    DeadLetterQueue,
    Entry,
    ReplayMarker,
    RequestPayload,
    all_files,
    claim,
    listing,
    read_entries,
)
from mpipeline.dlq._reader import process_key
from mpipeline.errors import ExitCode

CAP = 4096


def _letter(rid: str, text: str = "hello", **kw: Any) -> DeadLetter:
    request = RequestPayload(input=text, session_id="s1", metadata=kw.pop("metadata", {}))
    return DeadLetter(
        id=rid, ts=1.0, reason="ring_full", stage="rag", message="full", request=request, **kw
    )


def _write(path: Path, batches: list[list[Entry]], **kw: Any) -> DeadLetterQueue:
    async def go() -> DeadLetterQueue:
        dlq = DeadLetterQueue(path, **kw)
        for batch in batches:
            await dlq.record(batch)
        await dlq.aclose()
        return dlq

    return asyncio.run(go())


def _ids(path: Path) -> list[str]:
    return [e.id for e in read_entries(path) if isinstance(e, DeadLetter)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / DLQ_FILE


# The per-record cap


def test_an_oversized_record_is_cut_to_the_cap_and_marked_never_dropped(path: Path) -> None:
    # The request of the issue: an 889 KB body, most of it 60,000 metadata keys.
    metadata = {f"k{i:05}": "v" * 8 for i in range(60_000)}
    big = _letter("big0-1", "x" * 100_000 + "é" * 50_000, metadata=metadata)
    small = _letter("small0-1")
    whole = len(msgspec.json.encode(big)) + 1
    assert whole > 700_000
    _write(path, [[big, small]])  # the default cap

    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and all(len(line) <= MAX_RECORD_BYTES for line in lines)
    cut, kept = list(read_entries(path))
    assert kept == small  # under the cap: untouched
    assert isinstance(cut, DeadLetter) and cut.truncated_from == whole
    assert (cut.id, cut.reason, cut.stage, cut.message) == ("big0-1", "ring_full", "rag", "full")
    assert cut.request is not None and cut.request.session_id == "s1"
    assert cut.request.input and "x" * 100 in cut.request.input
    assert len(cut.request.input) < 100_000 and len(cut.request.metadata) < 60_000
    # A smaller cap cuts deeper; the record is still there.
    _write(path, [[big]], max_record_bytes=CAP)
    assert len(path.read_bytes().splitlines()[-1]) < CAP
    assert [e.id for e in read_entries(path) if isinstance(e, DeadLetter)] == [
        "big0-1",
        "small0-1",
        "big0-1",
    ]


def test_a_cut_record_is_listed_shown_and_never_replayed(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(path, [[_letter("big0-1", "y" * 50_000), _letter("ok0-1")]], max_record_bytes=CAP)
    run_dir = str(path.parent)
    assert main(["dlq", "list", "--run-dir", run_dir]) == ExitCode.OK
    out = capsys.readouterr().out.splitlines()
    assert "big0-1" in out[1] and " cut " in out[1]
    assert out[-1].endswith("(1 not replayed)")  # the cut one cannot be
    assert main(["dlq", "show", "big0-1", "--run-dir", run_dir]) == ExitCode.OK
    assert "cannot be replayed" in capsys.readouterr().out
    assert main(["dlq", "replay", "big0-1", "--run-dir", run_dir]) == ExitCode.FAILURE
    assert "cut to fit the DLQ's record cap" in capsys.readouterr().err


def test_a_marker_over_the_cap_is_cut_too(path: Path) -> None:
    marker = ReplayMarker(replay_of="a0-1", ts=1.0, new_request_id="b0-1", outcome="stage_error")
    long = msgspec.structs.replace(marker, message="m" * 20_000)
    _write(path, [[long]], max_record_bytes=CAP)
    (back,) = read_entries(path)
    assert isinstance(back, ReplayMarker) and back.replay_of == "a0-1"
    assert len(path.read_bytes()) <= CAP


# Rotation


def test_the_file_rotates_by_size_and_keeps_n_files(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batches: list[list[Entry]] = [
        [_letter(f"r{b}-{i}", "z" * 300) for i in range(4)] for b in range(12)
    ]
    one = len(msgspec.json.encode(batches[0][0])) + 1  # a record's line
    with caplog.at_level(logging.WARNING, "mpipeline.dlq"):
        dlq = _write(path, batches, max_file_bytes=3000, keep=2, max_record_bytes=CAP)
    names = sorted(p.name for p in path.parent.iterdir() if p.suffix == ".jsonl")
    assert names == ["dlq.1.jsonl", "dlq.2.jsonl", "dlq.jsonl"]
    assert dlq.rotations >= 3 and "deleted" in caplog.text and "the oldest records" in caplog.text
    for p in all_files(path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert p.stat().st_size < 3000 + 4 * one  # the bound plus one batch
    assert stat.S_IMODE((path.parent / "dlq.lock").stat().st_mode) == 0o600
    # Read across the files, oldest first: the newest records, contiguous and in order.
    ids = _ids(path)
    everything = [f"r{b}-{i}" for b in range(12) for i in range(4)]
    assert ids == everything[-len(ids) :] and len(ids) >= 12


def test_list_reads_across_rotated_files(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batches: list[list[Entry]] = [[_letter(f"r{b}", "z" * 300)] for b in range(6)]
    _write(path, batches, max_file_bytes=700, keep=10)
    assert len(all_files(path)) > 2
    assert main(["dlq", "list", "--run-dir", str(path.parent)]) == ExitCode.OK
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:-1]] == [f"r{b}" for b in range(6)]
    assert out[-1].startswith("6 records in")


_APPENDER = """
import asyncio, sys
from mpipeline.dlq import DeadLetterQueue, DeadLetter

async def go():
    dlq = DeadLetterQueue(sys.argv[1], max_file_bytes=20000, keep=1000)
    tag = sys.argv[2]
    for batch in range(20):
        entries = [
            DeadLetter(id=f"{tag}-{batch}-{i}", ts=0.0, reason="ring_full", stage="rag",
                       message=tag * 2000)
            for i in range(5)
        ]
        await dlq.record(entries)
    await dlq.aclose()

asyncio.run(go())
"""


def test_processes_appending_while_rotating_lose_and_interleave_nothing(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), tag]) for tag in "xy"]
    assert [p.wait(60) for p in procs] == [0, 0]
    assert len(all_files(path)) > 5  # it did rotate, several times
    warnings: list[str] = []
    entries = list(read_entries(path, warnings.append))
    assert warnings == []
    ids = [e.id for e in entries if isinstance(e, DeadLetter)]
    assert len(ids) == len(set(ids)) == 200
    for tag in "xy":  # each writer's records in its own order
        assert [i for i in ids if i[0] == tag] == [
            f"{tag}-{b}-{i}" for b in range(20) for i in range(5)
        ]


def test_a_writer_follows_a_file_moved_away(path: Path) -> None:
    async def go() -> None:
        dlq = DeadLetterQueue(path)
        await dlq.record([_letter("a0-1")])
        os.rename(path, path.with_name("old.jsonl"))
        await dlq.record([_letter("a0-2")])
        await dlq.aclose()

    asyncio.run(go())
    assert _ids(path) == ["a0-2"] and stat.S_IMODE(path.stat().st_mode) == 0o600


# Claims


def test_a_claimed_record_is_not_claimed_again_until_settled(path: Path) -> None:
    _write(path, [[_letter("a0-1"), _letter("a0-2")]])
    taken, notes = claim(path, ["a0-1", "a0-2"], only_pending=True)
    assert [c.item.record.id for c in taken] == ["a0-1", "a0-2"] and notes == []
    again, notes = claim(path, ["a0-1", "a0-2"], only_pending=True)
    assert again == [] and notes == [
        f"a0-1: being replayed by pid {os.getpid()}; skipped",
        f"a0-2: being replayed by pid {os.getpid()}; skipped",
    ]
    # a0-1 accepted, a0-2 refused before acceptance: only a0-2 is pending again.
    settle: list[Entry] = [
        ReplayMarker(
            replay_of="a0-1",
            ts=2.0,
            new_request_id="b0-1",
            outcome="ok",
            claim=taken[0].claim.claim,
        ),
        ReplayMarker(
            replay_of="a0-2",
            ts=2.0,
            new_request_id=None,
            outcome="shutting_down",
            claim=taken[1].claim.claim,
        ),
    ]
    _write(path, [settle])
    third, notes = claim(path, ["a0-1", "a0-2"], only_pending=True)
    assert [c.item.record.id for c in third] == ["a0-2"] and notes == []
    claims = [e for e in read_entries(path) if isinstance(e, ClaimMarker)]
    assert len(claims) == 3 and all(c.pid == os.getpid() for c in claims)


def test_the_claim_of_a_process_that_died_is_void(path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    owner = process_key(child.pid)
    assert owner is not None
    dead_claim = ClaimMarker(replay_of="a0-1", ts=1.0, claim="c1", pid=child.pid, owner=owner)
    _write(path, [[_letter("a0-1")], [dead_claim]])
    (item,) = listing(read_entries(path))
    assert item.live_claim() == dead_claim
    assert claim(path, ["a0-1"], only_pending=True)[0] == []
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(10) == 0
    (item,) = listing(read_entries(path))
    assert item.live_claim() is None and item.open_claims() == [dead_claim]
    taken, _ = claim(path, ["a0-1"], only_pending=True)
    assert [c.item.record.id for c in taken] == ["a0-1"]


_CLAIMER = """
import sys
from pathlib import Path
from mpipeline.dlq import claim

taken, _ = claim(Path(sys.argv[1]), sys.argv[2].split(","), only_pending=True)
print(",".join(c.item.record.id for c in taken), flush=True)
sys.stdin.read()  # alive, so its claims hold, until the test lets go
"""


def test_two_processes_claiming_at_once_split_the_records(path: Path) -> None:
    ids = [f"a0-{i}" for i in range(40)]
    _write(path, [[_letter(rid) for rid in ids]])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, str(path), ",".join(ids)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        got = [p.stdout.readline().strip().split(",") if p.stdout else [] for p in procs]
    finally:
        for p in procs:
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()
            p.wait(10)
    taken = [rid for part in got for rid in part if rid]
    assert sorted(taken) == sorted(ids)  # every record once, none twice
