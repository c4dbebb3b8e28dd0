"""StageRunner against full rings: shed, block until the deadline, a full error ring."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from mpipeline.config import PipelineConfig
from mpipeline.errors import ErrorCode
from mpipeline.topology import edge_label
from tests.unit.runner.rig import Retrieve, Rig, configure, failures, ids, request

MINUTE_NS = 60_000_000_000


def test_shed_fails_the_batch_for_a_full_next_ring_at_once() -> None:
    cfg = configure(PipelineConfig(), "assemble", full_policy="shed", timeout_s=30.0)

    async def body() -> None:
        async with Rig(Retrieve, "rag", cfg, fill_outputs=True) as rig:
            deadline = time.monotonic_ns() + MINUTE_NS
            start = time.monotonic()
            rig.send(*(request(f"r{i}", deadline_ns=deadline) for i in range(3)))
            await rig.answered("r0", "r1", "r2")
            assert time.monotonic() - start < 2.0  # not the block timeout, nor the deadline
            edge = edge_label(rig.outputs[0].name)
            assert edge == "rag0-assemble0"
            failed = failures(rig.err())
            assert sorted(failed) == ["r0", "r1", "r2"]
            for f in failed.values():
                assert (f.code, f.reason, f.stage) == (
                    ErrorCode.RING_FULL,
                    f"ring_full:{edge}",
                    "rag",
                )
            assert rig.runner.meter.shed == 3
            assert rig.runner.meter.expired == 0

    asyncio.run(body())


def test_block_waits_for_room_then_fails_when_the_deadline_passes_first() -> None:
    async def body() -> None:
        async with Rig(Retrieve, "rag", fill_outputs=True) as rig:
            deadline = time.monotonic_ns() + 500_000_000
            rig.send(
                request("r1", deadline_ns=deadline), request("r2", deadline_ns=deadline + MINUTE_NS)
            )
            await rig.answered("r1", "r2")
            # Answered only once the earliest deadline of the record had passed.
            assert time.monotonic_ns() >= deadline
            failed = failures(rig.err())
            assert sorted(failed) == ["r1", "r2"]
            for f in failed.values():
                assert f.code == ErrorCode.DEADLINE_EXCEEDED
                assert f.reason == f"ring {rig.outputs[0].name} stayed full past the deadline"
            assert rig.runner.meter.expired == 2
            assert rig.runner.meter.shed == 0

    asyncio.run(body())


def test_block_delivers_when_the_consumer_makes_room_in_time() -> None:
    async def body() -> None:
        async with Rig(Retrieve, "rag", fill_outputs=True) as rig:
            rig.send(request("r1", deadline_ns=time.monotonic_ns() + MINUTE_NS))
            # The runner has read the record and waits on the full ring.
            await rig.until(lambda: rig.stage.seen == ["r1"], "the stage to run r1")
            assert rig.everything() == []
            rig.unblock(rig.outputs[0])
            await rig.answered("r1")
            assert ids(rig.out()) == ["r1"]
            assert rig.err() == []

    asyncio.run(body())


def test_a_full_error_ring_is_given_up_after_a_bounded_wait_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        async with Rig(Retrieve, "rag", fill_errors=True) as rig:
            start = time.monotonic()
            rig.send(request("bad", "fail"))
            what = f"could not deliver 1 errors on {rig.errors[0].name}"
            await rig.until(lambda: what in caplog.text, "the dropped error to be logged", 10.0)
            took = time.monotonic() - start
            # _ERROR_PUT_TIMEOUT_S (1 s), then it moved on: not the block timeout (30 s).
            assert 0.9 < took < 5.0
            # Still serving: the next message goes through.
            rig.send(request("ok"))
            await rig.answered("ok")
            assert ids(rig.out()) == ["ok"]
        records = [r for r in caplog.records if what in r.getMessage()]
        assert [(r.name, r.levelno) for r in records] == [("mpipeline.runner", logging.ERROR)]

    with caplog.at_level(logging.ERROR, logger="mpipeline.runner"):
        asyncio.run(body())
