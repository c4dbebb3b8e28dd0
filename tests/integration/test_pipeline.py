"""The echo pipeline end to end: every accepted request gets one reply or one error.

Requests go through real replicas over real rings. The happy path checks
content, exactly-once delivery, per-session order and that a session's work
lands on one shard; the rest injects the faults of RELIABILITY §3 (#1, #2,
#4, #5, #10, #23) and checks that every caller gets a result or an
explicit ``RequestFailed`` within a bound: nobody hangs.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from mpipeline.config import STAGE_ORDER
from mpipeline.control import R_PROCESSED, R_RESTARTS
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import Completed, TokenChunk
from mpipeline.pipeline import Pipeline
from mpipeline.routing import shard_for
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    alive,
    faults_env,
    wait_until,
)

pytestmark = pytest.mark.integration

Outcome = Completed | BaseException
# Longest any single await may take before the test calls it a hang.
HANG_S = 30.0


def _sessions_for(shard: int, n: int, count: int = 1) -> list[str]:
    """Session ids that ``shard_for`` sends to ``shard`` of ``n``."""
    found = [f"sess-{i}" for i in range(10_000) if shard_for(f"sess-{i}", n) == shard]
    return found[:count]


async def _gather(tasks: Sequence[Awaitable[Any]], limit_s: float = HANG_S) -> list[Outcome]:
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), limit_s)
    return list(outcomes)


def _codes(outcomes: list[Outcome]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for o in outcomes:
        if isinstance(o, RequestFailed):
            counts[str(o.code)] += 1
        elif isinstance(o, BaseException):
            raise AssertionError(f"not a RequestFailed: {o!r}") from o
        else:
            counts["ok"] += 1
    return counts


def _alive_pid(pid: int) -> bool:
    try:
        return alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _processed(sp: SupervisorProcess, stage: str, n: int) -> list[int]:
    with sp.control() as ctl:
        return [ctl.get(sp.slot(f"{stage}-{i}"), R_PROCESSED) for i in range(n)]


async def _until(predicate: Callable[[], object], limit_s: float, what: str) -> Any:
    return await asyncio.to_thread(wait_until, predicate, limit_s, what)


# The happy path

SHARDS = 3
POSTS = 2


def _text(i: int) -> str:
    # Single spaces inside, padding outside: post strips it, echo keeps the words.
    return f"  request {i} says {'x' * (1 + i % 11)} hello  "


def _record_in(seen: list[int], i: int) -> Callable[[object], None]:
    return lambda _: seen.append(i)


def _expected(i: int, max_tokens: int | None) -> str:
    words = _text(i).split()
    return " ".join(words[:max_tokens] if max_tokens else words)


@pytest.mark.timeout(120)
def test_every_request_comes_back_once_in_session_order(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor({"stages.inference.replicas": SHARDS, "stages.post.replicas": POSTS})
    n = 400
    sessions = [f"user-{k}" for k in range(37)]

    async def main() -> None:
        async with Pipeline.attach(sp.run_dir) as p:
            order: dict[str | None, list[int]] = collections.defaultdict(list)
            tasks = []
            plan = []
            for i in range(n):
                session = None if i % 5 == 0 else sessions[i % len(sessions)]
                max_tokens = 2 if i % 9 == 0 else None
                plan.append((session, max_tokens))
                task = asyncio.ensure_future(
                    p.submit(_text(i), session_id=session, max_tokens=max_tokens)
                )
                task.add_done_callback(_record_in(order[session], i))
                tasks.append(task)
            outcomes = await _gather(tasks)

            assert _codes(outcomes) == {"ok": n}
            ids = set()
            for i, (outcome, (session, max_tokens)) in enumerate(zip(outcomes, plan, strict=True)):
                assert isinstance(outcome, Completed)
                ids.add(outcome.request_id)
                assert outcome.session_id == session
                assert outcome.text == _expected(i, max_tokens)
                assert outcome.finish_reason == ("length" if max_tokens else "stop")
                assert outcome.usage.completion_tokens == len(outcome.text.split())
                # The stamps show the whole path, in flow order.
                stamps = [outcome.stamps[stage] for stage in STAGE_ORDER]
                assert stamps == sorted(stamps)
            assert len(ids) == n
            assert p.stats["completed"] == n
            assert p.stats["failed"] == p.stats["late"] == 0
            for session, seen in order.items():
                if session is not None:
                    assert seen == sorted(seen), f"session {session} out of order"

            # Streaming: the chunks are the reply; post trims only the final text.
            # Count the messages each stage handles, to check affinity below.
            handled = {"inference": n, "post": n}
            for i in range(20):
                session = sessions[i % 3]
                chunks = [c async for c in p.stream(_text(i), session_id=session)]
                assert all(isinstance(c, TokenChunk) for c in chunks)
                assert [c.index for c in chunks] == list(range(len(chunks)))
                joined = "".join(c.text for c in chunks)
                assert joined.split() == _text(i).split()
                done = await asyncio.wait_for(p.submit(_text(i), session_id=session), HANG_S)
                assert joined.strip() == done.text
                handled["inference"] += 2
                handled["post"] += len(chunks) + 2
            assert p.stats["late"] == 0

            # Affinity: every request of a session is processed by one inference
            # shard and one post replica, the ones routing.shard_for names.
            replicas = {"inference": SHARDS, "post": POSTS}

            async def counts(stage: str) -> list[int]:
                want = handled[stage]

                def reached() -> list[int] | None:
                    got = _processed(sp, stage, replicas[stage])
                    assert sum(got) <= want, (stage, got, want)
                    return got if sum(got) == want else None

                found: list[int] = await _until(reached, 10, f"{stage} to count {want}")
                return found

            before = {stage: await counts(stage) for stage in replicas}
            k = 15
            for shard in range(SHARDS):
                (session,) = _sessions_for(shard, SHARDS)
                outs = await _gather(
                    [
                        asyncio.ensure_future(p.submit(f"pin {j}", session_id=session))
                        for j in range(k)
                    ]
                )
                assert _codes(outs) == {"ok": k}
                for stage, count in replicas.items():
                    handled[stage] += k
                    after = await counts(stage)
                    delta = [a - b for a, b in zip(after, before[stage], strict=True)]
                    owner = shard_for(session, count)
                    assert delta == [k if r == owner else 0 for r in range(count)], stage
                    before[stage] = after

    with sp.explain():
        asyncio.run(main())


@pytest.mark.timeout(60)
def test_pipeline_starts_and_stops_its_own_supervisor(configs: ConfigFactory) -> None:
    """``async with Pipeline(config)``: the library path, no CLI in between."""
    cfg = configs({"stages.inference.replicas": 2})

    async def main() -> int:
        async with Pipeline(cfg, run_dir=configs.run_dir) as p:
            supervisor = p.supervisor_pid
            assert supervisor is not None
            outs = await _gather([asyncio.ensure_future(p.submit(f" hi {i} ")) for i in range(50)])
            assert [o.text for o in outs if isinstance(o, Completed)] == [
                f"hi {i}" for i in range(50)
            ]
            return supervisor

    supervisor = asyncio.run(main())
    assert not _alive_pid(supervisor)
    assert not (configs.run_dir / "state.json").exists()


# Replicas killed under load (RELIABILITY #1, #2)


async def _load(
    p: Pipeline,
    results: list[tuple[str, int, asyncio.Future[Completed]]],
    stop: asyncio.Event,
    every_s: float,
    sessions: int,
) -> None:
    i = 0
    while not stop.is_set():
        session = f"load-{i % sessions}"
        fut = asyncio.ensure_future(p.submit(f"load {i} a b c", session_id=session))
        results.append((session, i, fut))
        i += 1
        await asyncio.sleep(every_s)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", ["rag-0", "assemble-0", "inference-1", "post-0", "stream-0"])
def test_killed_replica_is_restarted_and_no_caller_hangs(
    start_supervisor: SupervisorFactory, victim: str
) -> None:
    sp = start_supervisor(
        {"stages.inference.replicas": 2, "stages.inference.echo.token_delay_ms": 15.0}
    )
    old_pid = sp.replica_pid(victim)
    stage = victim.rsplit("-", 1)[0]

    async def main() -> tuple[list[tuple[str, int, Outcome]], int]:
        async with Pipeline.attach(sp.run_dir) as p:
            results: list[tuple[str, int, asyncio.Future[Completed]]] = []
            stop = asyncio.Event()
            loader = asyncio.ensure_future(_load(p, results, stop, 0.01, 12))
            await _until(lambda: p.stats["completed"] >= 20, 20, "warm-up replies")
            os.kill(old_pid, signal.SIGKILL)
            new_pid = await asyncio.to_thread(sp.wait_replaced, victim, old_pid)
            done_at_restart = p.stats["completed"]
            await _until(
                lambda: p.stats["completed"] >= done_at_restart + 20, 20, "replies after restart"
            )
            stop.set()
            await loader
            outcomes = await _gather([f for _, _, f in results])
            # Fresh requests after the restart all succeed.
            fresh = await _gather(
                [
                    asyncio.ensure_future(p.submit(f"fresh {j}", session_id=f"load-{j}"))
                    for j in range(24)
                ]
            )
            texts = [o.text if isinstance(o, Completed) else repr(o) for o in fresh]
            assert texts == [f"fresh {j}" for j in range(24)]
            joined = [(s, i, o) for (s, i, _), o in zip(results, outcomes, strict=True)]
            return joined, new_pid

    with sp.explain():
        outcomes, new_pid = asyncio.run(main())
        _check_restart_outcomes(sp, victim, stage, old_pid, new_pid, outcomes)


def _check_restart_outcomes(
    sp: SupervisorProcess,
    victim: str,
    stage: str,
    old_pid: int,
    new_pid: int,
    outcomes: list[tuple[str, int, Outcome]],
) -> None:
    assert new_pid != old_pid
    assert not _alive_pid(old_pid)
    assert f"replica {sp.process_of(victim)} died (killed by SIGKILL" in sp.log()
    with sp.control() as ctl:
        assert ctl.get(sp.slot(victim), R_RESTARTS) == 1
    # In the chained layout the victim's process runs other stages too: its
    # requests may have been in any of them.
    held = {name.rpartition("-")[0]: name for name in sp.comembers(victim)}

    codes = _codes([o for _, _, o in outcomes])
    assert set(codes) <= {"ok", ErrorCode.STAGE_RESTARTED}, codes
    assert codes[ErrorCode.STAGE_RESTARTED] >= 1, "nothing was in flight at the kill"
    for session, i, outcome in outcomes:
        if isinstance(outcome, Completed):
            assert outcome.text == f"load {i} a b c"
        else:
            assert isinstance(outcome, RequestFailed)
            assert outcome.stage in held, (outcome.stage, held)
            assert f"replica {held[outcome.stage]} was restarted" in outcome.failed.reason
            if stage == "inference":
                # Only the killed shard's sessions were failed.
                assert shard_for(session, 2) == 1


# Failing stages (RELIABILITY #4, #5)


@pytest.mark.timeout(60)
def test_poison_message_fails_alone_and_the_stage_stays_up(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(env=faults_env("assemble:raise_on=BOOM"))
    pid = sp.replica_pid("assemble-0")

    async def main() -> list[Outcome]:
        async with Pipeline.attach(sp.run_dir) as p:
            texts = [f"msg {i} BOOM" if i % 10 == 3 else f"msg {i}" for i in range(60)]
            tasks = [
                asyncio.ensure_future(p.submit(t, session_id=f"s{i % 4}"))
                for i, t in enumerate(texts)
            ]
            return await _gather(tasks)

    outcomes = asyncio.run(main())
    for i, outcome in enumerate(outcomes):
        if i % 10 == 3:
            assert isinstance(outcome, RequestFailed)
            assert outcome.code == ErrorCode.STAGE_ERROR
            assert outcome.stage == "assemble"
            assert "injected raise_on fault" in outcome.failed.reason
            assert outcome.request_id
        else:
            assert isinstance(outcome, Completed)
            assert outcome.text == f"msg {i}"
    assert sp.replica_pid("assemble-0") == pid
    with sp.control() as ctl:
        assert ctl.get(sp.slot("assemble-0"), R_RESTARTS) == 0
    assert "died" not in sp.log()


@pytest.mark.timeout(90)
def test_hung_replica_is_killed_and_its_requests_fail_explicitly(
    start_supervisor: SupervisorFactory,
) -> None:
    liveness = 1.0
    sp = start_supervisor(
        {"supervisor.liveness_timeout_s": liveness, "supervisor.drain_timeout_s": 2.0},
        env=faults_env("inference:hang_after=3"),
    )
    old_pid = sp.replica_pid("inference-0")

    async def main() -> tuple[list[Outcome], list[Outcome], float]:
        async with Pipeline.attach(sp.run_dir) as p:
            # One per record, so the fourth is the one the replica blocks on.
            first = [await asyncio.wait_for(p.submit(f"ok {i}"), HANG_S) for i in range(3)]
            hung = asyncio.ensure_future(p.submit("the fourth hangs"))
            hung_at = time.monotonic()
            later: list[asyncio.Future[Completed]] = []
            pid = await asyncio.to_thread(lambda: sp.replica_pid("inference-0"))
            while pid == old_pid:
                assert time.monotonic() - hung_at < 15, "the hung replica was never killed"
                # Work waiting behind the hung replica is what marks it hung.
                later.append(asyncio.ensure_future(p.submit(f"queued {len(later)}")))
                await asyncio.sleep(0.1)
                pid = await asyncio.to_thread(lambda: sp.replica_pid("inference-0"))
            killed_after = time.monotonic() - hung_at
            outcomes = await _gather([hung, *later])
            return list(first), outcomes, killed_after

    first, outcomes, killed_after = asyncio.run(main())
    assert [o.text for o in first if isinstance(o, Completed)] == ["ok 0", "ok 1", "ok 2"]
    assert liveness <= killed_after < liveness + 5
    assert isinstance(outcomes[0], RequestFailed)
    assert outcomes[0].code == ErrorCode.STAGE_RESTARTED
    assert set(_codes(outcomes)) <= {"ok", ErrorCode.STAGE_RESTARTED}
    # Stop at once: the successor may hang again on the backlog it inherits.
    sp.send(signal.SIGTERM)
    sp.wait_log("draining", 10)
    sp.send(signal.SIGTERM)
    assert sp.wait_exit(15) == 0
    log = sp.log()
    shard = sp.process_of("inference-0")
    hung = log.count(f"replica {shard} is hung")
    killed = log.count(f"replica {shard} died (killed for missing heartbeats")
    assert killed >= 1
    # One report and one kill per hang, not one per turn of the supervisor's loop
    # while the killed process is still exiting (the last may not be reaped yet).
    assert killed <= hung <= killed + 1, log


# Deadlines and shedding (RELIABILITY #10, #23)


@pytest.mark.timeout(60)
def test_deadlines_end_in_deadline_exceeded_within_the_grace(
    start_supervisor: SupervisorFactory,
) -> None:
    # 10 tokens x 100 ms: a reply takes about a second.
    sp = start_supervisor({"stages.inference.echo.token_delay_ms": 100.0})
    slow = "a b c d e f g h i j"

    async def timed(coro: Awaitable[Completed]) -> tuple[Outcome, float]:
        start = time.monotonic()
        try:
            result: Outcome = await coro
        except RequestFailed as exc:
            result = exc
        return result, time.monotonic() - start

    async def main() -> list[tuple[Outcome, float]]:
        async with Pipeline.attach(sp.run_dir) as p:
            jobs = [timed(p.submit("tiny", deadline_ms=0.001)) for _ in range(10)]
            jobs += [timed(p.submit(slow, deadline_ms=300, session_id=f"d{i}")) for i in range(10)]
            jobs += [timed(p.submit("no rush", deadline_ms=20_000)) for _ in range(5)]
            return list(await asyncio.wait_for(asyncio.gather(*jobs), HANG_S))

    results = asyncio.run(main())
    # I3: nobody waits past deadline + 250 ms grace (+ slack for a loaded CI box).
    for outcome, took in results[:10]:
        assert isinstance(outcome, RequestFailed)
        assert outcome.code == ErrorCode.DEADLINE_EXCEEDED
        assert took < 0.25 + 1.0
    for outcome, took in results[10:20]:
        assert isinstance(outcome, RequestFailed)
        assert outcome.code == ErrorCode.DEADLINE_EXCEEDED
        assert took < 0.3 + 0.25 + 1.0
    # Expired inside the pipeline: the stage that held it says so.
    assert {o.stage for o, _ in results[10:20] if isinstance(o, RequestFailed)} <= {
        "inference",
        "client",
    }
    assert all(isinstance(o, Completed) and o.text == "no rush" for o, _ in results[20:])


@pytest.mark.per_stage  # the rag -> assemble ring
@pytest.mark.timeout(60)
def test_shed_policy_fails_fast_with_ring_full_and_nobody_hangs(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(
        {
            "stages.assemble.full_policy": "shed",
            "stages.assemble.ring_capacity": 4096,
            "stages.inference.echo.token_delay_ms": 5.0,
        }
    )
    n = 300
    body = "pad " * 50

    async def main() -> list[Outcome]:
        async with Pipeline.attach(sp.run_dir) as p:
            return await _gather(
                [asyncio.ensure_future(p.submit(f"{i} {body}", max_tokens=1)) for i in range(n)]
            )

    started = time.monotonic()
    outcomes = asyncio.run(main())
    assert time.monotonic() - started < HANG_S
    codes = _codes(outcomes)
    assert set(codes) == {"ok", ErrorCode.RING_FULL}, codes
    assert codes["ok"] + codes[ErrorCode.RING_FULL] == n
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, RequestFailed):
            assert outcome.stage == "rag"
            assert outcome.failed.reason.startswith("ring_full:rag0-assemble0")
        else:
            assert isinstance(outcome, Completed)
            assert outcome.text == str(i)


@pytest.mark.timeout(60)
def test_smallest_allowed_first_ring_still_takes_short_requests(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor({"stages.rag.ring_capacity": 4096})

    async def main() -> str:
        async with Pipeline.attach(sp.run_dir) as p:
            done = await asyncio.wait_for(p.submit("hi"), HANG_S)
            return done.text

    assert asyncio.run(main()) == "hi"


def _write_corpus(folder: Path, files: int = 40, paragraphs: int = 100) -> None:
    """Many short paragraphs over a small vocabulary: every query term has long postings."""
    rnd = random.Random(7)
    vocab = [f"term{i}" for i in range(40)]
    folder.mkdir()
    for f in range(files):
        paras = [" ".join(rnd.choice(vocab) for _ in range(30)) for _ in range(paragraphs)]
        (folder / f"doc{f}.txt").write_text("\n\n".join(paras), encoding="utf-8")


@pytest.mark.timeout(120)
def test_busy_cpu_bound_stage_is_not_mistaken_for_hung(
    start_supervisor: SupervisorFactory, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    _write_corpus(docs)
    # Each message costs rag 10 ms of CPU (bm25s alone answers in a fraction of a
    # millisecond, which would prove nothing): the burst keeps it busy for 5 s, longer
    # than the liveness timeout, while it makes steady progress. The timeout is 2 s,
    # not 1: on a loaded 2-core box a process can go a second without the CPU at all.
    sp = start_supervisor(
        {"stages.rag.documents": str(docs), "supervisor.liveness_timeout_s": 2.0},
        env=faults_env("rag:busy_ms=10"),
    )
    query = " ".join(f"term{i}" for i in range(6))

    async def main() -> list[Outcome]:
        async with Pipeline.attach(sp.run_dir, timeout_s=60) as p:
            return await _gather(
                [asyncio.ensure_future(p.submit(f"{query} {i}")) for i in range(500)], 90
            )

    with sp.explain():
        outcomes = asyncio.run(main())
        assert "is hung" not in sp.log()
        assert _codes(outcomes) == {"ok": 500}
