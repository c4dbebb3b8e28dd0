"""Chaos under load, checked by a ledger: random SIGKILLs of replicas while requests flow.

About 40 seconds on the 2-core CI box. A client keeps requests in flight,
plain and streamed, over many sessions, each with a text of its own; every
half to one and a half seconds a random stage replica is SIGKILLed (the
supervisor restarts it). The ledger records every request sent and every
outcome. At the end it must show:

- I1: exactly one outcome per request, a result or a ``RequestFailed``;
- no cross-wired answer: each result's text is its own request's, and a
  stream's chunks join to that text;
- I2: every failed request has its DLQ record with the same id and code;
- I6: /metrics counts what the ledger counts for this client, and
  accepted = completed + failed + in flight with nothing in flight;
- I5: SIGTERM ends the run with exit 0, no segment and no process left.

The random choices come from a seeded generator, so a failure names its seed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import time
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from mpipeline.dlq import DeadLetter, read_entries
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import Completed, TokenChunk
from mpipeline.pipeline import Pipeline
from tests.integration.conftest import SupervisorFactory, run_segments, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SEED = int(os.environ.get("MPIPELINE_CHAOS_SEED", "1505"))
DURATION_S = 25.0
IN_FLIGHT = 48
SESSIONS = 40
# Codes a replica's death may give a request (besides a result).
DEATH_CODES = {ErrorCode.STAGE_RESTARTED, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.RING_FULL}


@dataclass
class Ledger:
    """What was sent and what came back, by request number."""

    texts: dict[int, str] = field(default_factory=dict)
    streamed: set[int] = field(default_factory=set)
    outcomes: dict[int, list[object]] = field(default_factory=lambda: collections.defaultdict(list))
    request_ids: dict[int, str] = field(default_factory=dict)
    chunks: dict[int, list[str]] = field(default_factory=lambda: collections.defaultdict(list))


async def _one(p: Pipeline, ledger: Ledger, i: int, rng: random.Random) -> None:
    text = f"req {i} " + " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randrange(1, 8)))
    ledger.texts[i] = text
    session = f"s{rng.randrange(SESSIONS)}"
    try:
        if rng.random() < 0.3:
            ledger.streamed.add(i)
            async for event in p.stream_events(text, session_id=session):
                if isinstance(event, TokenChunk):
                    ledger.request_ids[i] = event.request_id
                    ledger.chunks[i].append(event.text)
                else:
                    ledger.outcomes[i].append(event)
        else:
            ledger.outcomes[i].append(await p.submit(text, session_id=session))
    except RequestFailed as exc:
        ledger.outcomes[i].append(exc)


async def _load(p: Pipeline, ledger: Ledger, until: float, rng: random.Random) -> int:
    sem = asyncio.Semaphore(IN_FLIGHT)
    tasks: list[asyncio.Task[None]] = []
    i = 0

    async def run(n: int) -> None:
        try:
            await _one(p, ledger, n, rng)
        finally:
            sem.release()

    while time.monotonic() < until:
        await sem.acquire()
        tasks.append(asyncio.ensure_future(run(i)))
        i += 1
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return i


async def _nemesis(sp: object, names: list[str], until: float, rng: random.Random) -> list[str]:
    killed = []
    while time.monotonic() < until - 2:
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        victim = rng.choice(names)
        pid = sp.replica_pid(victim)  # type: ignore[attr-defined]
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed.append(victim)
            await asyncio.to_thread(sp.wait_replaced, victim, pid)  # type: ignore[attr-defined]
    return killed


def _metrics(url: str, client: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if f'client="{client}"' in line and line.startswith("mpipeline_requests_"):
            name = line.split("{", 1)[0].removeprefix("mpipeline_requests_")
            out[name.removesuffix("_total")] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_ledger_of_requests_survives_random_sigkills(start_supervisor: SupervisorFactory) -> None:
    rng = random.Random(SEED)
    sp = start_supervisor(
        {
            "stages.inference.replicas": 2,
            "stages.post.replicas": 2,
            "stages.inference.echo.token_delay_ms": 2.0,
            # Every kill is a restart; none may count toward FATAL here.
            "supervisor.restart_intensity": 1000,
        }
    )
    names = sp.replica_names()
    ledger = Ledger()

    async def main() -> tuple[int, list[str], int]:
        async with Pipeline.attach(sp.run_dir) as p:
            until = time.monotonic() + DURATION_S
            sent, killed = await asyncio.gather(
                _load(p, ledger, until, rng), _nemesis(sp, names, until, rng)
            )
            return sent, killed, p.client_index

    with sp.explain():
        sent, killed, client = asyncio.run(main())
        assert len(killed) >= 10, killed
        # I1, and nothing cross-wired.
        counts: collections.Counter[str] = collections.Counter()
        failed: dict[str, str] = {}
        for i in range(sent):
            outs = ledger.outcomes[i]
            assert len(outs) == 1, (SEED, i, outs)
            out = outs[0]
            if isinstance(out, Completed):
                counts["ok"] += 1
                assert out.text == ledger.texts[i], (SEED, i, out.text, ledger.texts[i])
                if i in ledger.streamed:
                    assert "".join(ledger.chunks[i]) == out.text, (SEED, i)
            else:
                assert isinstance(out, RequestFailed), (SEED, i, out)
                assert out.code in DEATH_CODES, (SEED, i, out)
                counts[str(out.code)] += 1
                failed[out.request_id] = str(out.code)
                if ledger.chunks[i]:  # a stream cut short: what arrived was its own text
                    assert ledger.texts[i].startswith("".join(ledger.chunks[i])), (SEED, i)
        assert counts["ok"] >= sent * 0.8, (SEED, counts)
        assert failed, f"no request was in flight at any of {len(killed)} kills"
        # I2: every failure has its DLQ record, same id, same code.
        letters = {
            e.id: e.reason
            for e in read_entries(sp.run_dir / "dlq.jsonl")
            if isinstance(e, DeadLetter)
        }
        missing = {rid: code for rid, code in failed.items() if letters.get(rid) != code}
        assert not missing, (SEED, missing)
        # I6, from /metrics, for this client's slot.
        url = sp.state["metrics_url"]
        label = f"api-{client - len(sp.state['topology']['gateways'])}"
        m = _metrics(url, label)
        assert m["accepted"] == sent, (m, sent)
        assert m["completed"] == counts["ok"], (m, counts)
        assert m["failed"] == sum(v for k, v in counts.items() if k != "ok"), (m, counts)
        assert m["in_flight"] == 0, m
        # I5: a clean stop.
        run_id = sp.run_id
        kids = sp.descendants()
        sp.send(signal.SIGTERM)
        assert sp.wait_exit(30) == 0
        psutil.wait_procs(kids, timeout=10)
        assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        wait_until(lambda: not run_segments(run_id), 10, "segments unlinked")
