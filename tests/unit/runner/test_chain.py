"""LocalLink and GroupRunner: a placement group's hand-over and its stop order.

The whole chained process is tested end to end by the reliability suite's
chained run (scripts/test.sh); these pin the two rules it rests on: outputs
are handed over at the flush a ring would have had, in order, and members
stop one after another, each drained before the next is told to stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mpipeline.messages import Message
from mpipeline.runner import GroupRunner, LocalLink
from mpipeline.runner._meter import Meter
from mpipeline.topology import ReplicaSpec
from tests.unit.runner.rig import completed, ids, request

SPEC = ReplicaSpec(
    stage="post", index=0, replicas=1, cpus=(), slot=0, next_stage="stream",
    inputs=(), outputs=(), errors=(),
)  # fmt: skip


class Sink:
    """The next member's own sink: records flushes, may report pending output."""

    def __init__(self) -> None:
        self.flushes = 0
        self.pending = False

    def attach(self, *, spin_s: float) -> None: ...

    def close(self) -> None: ...

    def emit(self, msg: Message) -> None: ...

    def has_pending(self) -> bool:
        return self.pending

    def schedule_flush(self) -> None: ...

    async def flush(self) -> None:
        self.flushes += 1

    async def finish(self) -> None:
        await self.flush()


def _link() -> tuple[LocalLink, list[tuple[Message, int]], Sink]:
    got: list[tuple[Message, int]] = []
    sink = Sink()
    return (
        LocalLink(
            lambda m, now: got.append((m, now)), sink, Meter(SPEC, 1.0, None, None), timed=True
        ),
        got,
        sink,
    )


def test_outputs_wait_for_the_flush_then_go_in_order_and_onward() -> None:
    asyncio.run(_outputs_wait_for_the_flush_then_go_in_order_and_onward())


async def _outputs_wait_for_the_flush_then_go_in_order_and_onward() -> None:
    link, got, sink = _link()
    for i in range(3):
        link.emit(request(f"r{i}"))
    assert got == [] and link.has_pending()
    await link.flush()
    assert ids(m for m, _ in got) == ["r0", "r1", "r2"]
    assert all(now > 0 for _, now in got)
    assert sink.flushes == 1 and not link.has_pending()
    sink.pending = True
    assert link.has_pending(), "the next member's unflushed output is pending too"


def test_an_emit_during_the_hand_over_is_handed_over_in_the_same_flush() -> None:
    asyncio.run(_an_emit_during_the_hand_over_is_handed_over_in_the_same_flush())


async def _an_emit_during_the_hand_over_is_handed_over_in_the_same_flush() -> None:
    got: list[str] = []
    sink = Sink()

    def dispatch(msg: Message, now: int) -> None:
        got.append(ids([msg])[0])
        if ids([msg])[0] == "a":
            link.emit(completed("late", 0))  # e.g. a Failed made by admission

    link = LocalLink(dispatch, sink, Meter(SPEC, 1.0, None, None), timed=False)
    link.emit(request("a"))
    link.emit(request("b"))
    await link.flush()
    assert got == ["a", "b", "late"]


def test_schedule_flush_runs_once_and_finish_waits_for_it() -> None:
    asyncio.run(_schedule_flush_runs_once_and_finish_waits_for_it())


async def _schedule_flush_runs_once_and_finish_waits_for_it() -> None:
    link, got, sink = _link()
    link.emit(request("x"))
    link.schedule_flush()
    link.schedule_flush()  # one task at a time
    await link.finish()
    assert ids(m for m, _ in got) == ["x"]
    assert sink.flushes >= 1


class Member:
    """A runner stand-in that logs when it is told to stop and when it has drained."""

    def __init__(self, name: str, log: list[str], work_s: float = 0.0) -> None:
        self.spec = SPEC
        self.name = name
        self.log = log
        self.work_s = work_s

    def attach(self) -> None: ...

    def close(self) -> None: ...

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.log.append(f"stop {self.name}")
        await asyncio.sleep(self.work_s)  # draining: the next one must wait for it
        self.log.append(f"drained {self.name}")


def test_a_group_stops_its_members_in_flow_order_each_after_the_last_drained() -> None:
    asyncio.run(_a_group_stops_its_members_in_flow_order_each_after_the_last_drained())


async def _a_group_stops_its_members_in_flow_order_each_after_the_last_drained() -> None:
    log: list[str] = []
    members: list[Any] = [
        Member("rag", log, 0.02),
        Member("assemble", log, 0.01),
        Member("post", log),
    ]
    stop = asyncio.Event()
    task = asyncio.create_task(GroupRunner(members).run(stop))
    await asyncio.sleep(0)
    assert log == []
    stop.set()
    await asyncio.wait_for(task, 5)
    assert log == [
        "stop rag", "drained rag", "stop assemble", "drained assemble", "stop post", "drained post",
    ]  # fmt: skip


def test_a_member_that_crashes_takes_the_group_down() -> None:
    asyncio.run(_a_member_that_crashes_takes_the_group_down())


async def _a_member_that_crashes_takes_the_group_down() -> None:
    class Broken(Member):
        async def run(self, stop: asyncio.Event) -> None:
            raise RuntimeError("pump died")

    members: list[Any] = [Member("rag", []), Broken("assemble", [])]
    try:
        await asyncio.wait_for(GroupRunner(members).run(asyncio.Event()), 5)
    except RuntimeError as exc:
        assert str(exc) == "pump died"
    else:
        raise AssertionError("the group kept running without a member")
