"""The ``sink_jsonl`` result sink against a real supervisor (issue 15 §8).

The promise: every result a client received is in the sink, also when the
stream replica is SIGKILLed in the middle of a load (a result is handed on
only after its line is fsynced), and the file holds one JSON object with
field names per result, mode 0600 whatever the umask the run started with.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import Completed
from mpipeline.pipeline import Pipeline
from tests.integration.conftest import SupervisorFactory, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

LIMIT_S = 30.0


def _sink_lines(path: Path) -> list[dict[str, Any]]:
    """The sink's records; a torn last line (the kill hit a write) is not one of them."""
    lines = path.read_bytes().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith(b"\n")]


def test_no_result_a_client_received_is_lost_when_the_stream_replica_is_killed(
    start_supervisor: SupervisorFactory, tmp_path: Path
) -> None:
    sink = tmp_path / "results.jsonl"
    old = os.umask(0)
    try:
        sp = start_supervisor(
            {"stages.stream.sink_jsonl": str(sink), "stages.inference.echo.token_delay_ms": 2.0}
        )
    finally:
        os.umask(old)
    victim = sp.replica_pid("stream-0")

    async def load() -> list[Completed | BaseException]:
        async with Pipeline.attach(sp.run_dir) as p:
            futures: list[asyncio.Future[Completed]] = []
            stop = asyncio.Event()

            async def submit() -> None:
                i = 0
                while not stop.is_set():
                    futures.append(
                        asyncio.ensure_future(p.submit(f"result {i}", deadline_ms=20_000))
                    )
                    i += 1
                    await asyncio.sleep(0.003)

            loader = asyncio.ensure_future(submit())
            await asyncio.to_thread(
                wait_until, lambda: p.stats["completed"] >= 40, LIMIT_S, "results"
            )
            os.kill(victim, signal.SIGKILL)
            await asyncio.to_thread(sp.wait_replaced, "stream-0", victim)
            done = p.stats["completed"]
            await asyncio.to_thread(
                wait_until,
                lambda: p.stats["completed"] >= done + 20,
                LIMIT_S,
                "results after restart",
            )
            stop.set()
            await loader
            outcomes = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), LIMIT_S
            )
            return list(outcomes)

    with sp.explain():
        outcomes = asyncio.run(load())
    received = {o.request_id: o for o in outcomes if isinstance(o, Completed)}
    failed = [o for o in outcomes if not isinstance(o, Completed)]
    assert all(
        isinstance(o, RequestFailed) and o.code == ErrorCode.STAGE_RESTARTED for o in failed
    ), failed
    assert len(received) >= 60

    records = _sink_lines(sink)
    assert all(isinstance(r, dict) for r in records)  # field names, not positional arrays
    in_sink = {r["request_id"]: r for r in records}
    missing = sorted(set(received) - set(in_sink))
    assert missing == [], f"{len(missing)} results a client received are not in the sink"
    for rid, result in received.items():
        assert in_sink[rid]["text"] == result.text
        assert in_sink[rid]["completion_tokens"] == result.usage.completion_tokens
    assert stat.S_IMODE(sink.stat().st_mode) == 0o600
    assert time.time() - max(r["ts"] for r in records) < 120
