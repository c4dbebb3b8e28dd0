"""StageRunner with an async stage: session order, the concurrency limit and its
priority backlog, deadlines in the backlog, stage timeouts, client cancels."""

from __future__ import annotations

import asyncio
import time

from mpipeline.config import PipelineConfig
from mpipeline.errors import ErrorCode
from mpipeline.messages import Completed, Priority
from tests.unit.runner.rig import Model, Rig, configure, failures, ids, request

CRITICAL, LOW = Priority.CRITICAL, Priority.LOW


def _cfg(**fields: object) -> PipelineConfig:
    return configure(PipelineConfig(), "inference", **fields)


def test_a_sessions_next_turn_starts_after_the_previous_one_ends() -> None:
    async def body() -> None:
        async with Rig(Model, "inference", _cfg(concurrency=8)) as rig:
            model = rig.stage
            model.hold("t1")
            rig.send(
                request("t1", session="s"), request("t2", session="s"), request("o", session="x")
            )
            # Another session does not wait; the session's second turn does.
            await rig.answered("o")
            assert model.started() == ["t1", "o"]
            assert rig.runner.meter.inflight == 2  # t1 runs, t2 waits for it
            model.release("t1")
            await rig.answered("t1", "t2")
            assert model.events.index(("end", "t1")) < model.events.index(("start", "t2"))
            outputs = rig.out()
            assert ids(outputs) == ["o", "t1", "t2"]
            assert all(isinstance(m, Completed) for m in outputs)
        assert rig.runner.processed == 3

    asyncio.run(body())


def test_beyond_the_concurrency_limit_messages_wait_and_start_by_priority() -> None:
    async def body() -> None:
        async with Rig(Model, "inference", _cfg(concurrency=2)) as rig:
            model = rig.stage
            model.hold("a", "b")
            rig.send(
                request("a"),
                request("b"),
                request("low", priority=LOW),
                request("normal"),
                request("critical", priority=CRITICAL),
            )
            await rig.until(lambda: model.started() == ["a", "b"], "a and b to start")
            assert rig.runner.meter.inflight == 2
            model.release("a")
            await rig.answered("a", "critical")
            model.release("b")
            await rig.answered("b", "normal", "low")
            assert model.started() == ["a", "b", "critical", "normal", "low"]
            assert model.most_running == 2

    asyncio.run(body())


def test_a_message_arriving_while_others_wait_does_not_jump_the_backlog() -> None:
    # "urgent" waits for the one slot. The slot frees as "late" arrives: "late"
    # is read before the backlog's start runs, and must wait behind "urgent".
    async def body() -> None:
        async with Rig(Model, "inference", _cfg(concurrency=1)) as rig:
            model = rig.stage
            model.hold("first")
            rig.send(
                request("first", "yield"),
                request("low", priority=LOW),
                request("urgent", priority=CRITICAL),
            )
            await rig.until(lambda: model.started() == ["first"], "first to start")
            model.release("first")
            rig.send(request("late"))
            await rig.answered("first", "low", "urgent", "late")
            assert model.started() == ["first", "urgent", "late", "low"]
            assert model.most_running == 1

    asyncio.run(body())


def test_a_sessions_turn_arriving_as_the_slot_frees_waits_for_the_earlier_turn() -> None:
    async def body() -> None:
        async with Rig(Model, "inference", _cfg(concurrency=1)) as rig:
            model = rig.stage
            model.hold("first")
            rig.send(request("first", "yield"), request("turn1", session="s"))
            await rig.until(lambda: model.started() == ["first"], "first to start")
            model.release("first")
            rig.send(request("turn2", session="s"))
            await rig.answered("first", "turn1", "turn2")
            assert model.started() == ["first", "turn1", "turn2"]
            assert ids(rig.out()) == ["first", "turn1", "turn2"]

    asyncio.run(body())


def test_a_request_whose_deadline_passes_in_the_backlog_is_answered_not_started() -> None:
    async def body() -> None:
        async with Rig(Model, "inference", _cfg(concurrency=1)) as rig:
            model = rig.stage
            model.hold("busy")
            deadline = time.monotonic_ns() + 300_000_000
            rig.send(request("busy"), request("waits", deadline_ns=deadline), request("after"))
            await rig.until(lambda: model.started() == ["busy"], "busy to start")
            await rig.until(lambda: time.monotonic_ns() > deadline, "the deadline to pass")
            model.release("busy")
            await rig.answered("busy", "waits", "after")
            assert model.started() == ["busy", "after"]
            failed = failures(rig.err())["waits"]
            assert failed.code == ErrorCode.DEADLINE_EXCEEDED
            assert failed.reason == "deadline passed waiting in stage inference"
            assert rig.runner.meter.expired == 1

    asyncio.run(body())


def test_a_message_that_runs_past_the_stage_timeout_is_stopped_and_answered() -> None:
    async def body() -> None:
        async with Rig(Model, "inference", _cfg(timeout_s=0.2)) as rig:
            model = rig.stage
            model.hold("stuck")
            start = time.monotonic()
            rig.send(request("stuck"), request("quick"))
            await rig.answered("stuck", "quick")
            assert time.monotonic() - start >= 0.2
            failed = failures(rig.err())["stuck"]
            assert failed.code == ErrorCode.DEADLINE_EXCEEDED
            assert failed.reason == "stage inference timed out"
            assert ("cancelled", "stuck") in model.events
            assert not model.ended("stuck")
            assert ids(rig.out()) == ["quick"]
            assert rig.runner.meter.expired == 1
        assert rig.runner.processed == 2

    asyncio.run(body())


def test_a_cancel_on_the_board_stops_the_running_task_and_skips_the_waiting_one() -> None:
    async def body() -> None:
        async with Rig(Model, "inference", _cfg(concurrency=1), control=True) as rig:
            model = rig.stage
            ctl = rig.ctl
            assert ctl is not None
            model.hold("running")
            rig.send(request("running"), request("waiting"), request("kept"))
            await rig.until(lambda: model.started() == ["running"], "running to start")
            ctl.cancel(0, "running")
            ctl.cancel(0, "waiting")
            await rig.answered("kept")
            assert model.events == [
                ("start", "running"),
                ("cancelled", "running"),
                ("start", "kept"),
                ("end", "kept"),
            ]
            # The client answered its caller itself: nothing comes back for either.
            assert ids(rig.everything()) == ["kept"]
            # A cancel posted before the request arrives drops it at the door.
            ctl.cancel(0, "gone")
            rig.send(request("gone"), request("last"))
            await rig.answered("last")
            assert "gone" not in model.started()
            assert rig.runner.meter.cancelled == 3
            await rig.stop()
            assert rig.runner.processed == 5
            # The last beat reported every message as processed and none in flight.
            slot = ctl.record(0)
            assert (slot.processed, slot.in_flight) == (5, 0)
            assert slot.heartbeat_ns > 0

    asyncio.run(body())


def test_a_stop_finishes_running_and_waiting_messages_and_flushes_them() -> None:
    async def body() -> None:
        async with Rig(Model, "inference", _cfg(concurrency=1)) as rig:
            model = rig.stage
            model.hold("a")
            rig.send(request("a"), request("b"), request("c"))
            await rig.until(lambda: model.started() == ["a"], "a to start")
            rig.signal_stop()
            model.release("a")
            await rig.stop()
            rig.poll()
            assert ids(rig.out()) == ["a", "b", "c"]
            assert rig.runner.meter.inflight == 0

    asyncio.run(body())
