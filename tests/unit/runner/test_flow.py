"""StageRunner with a sync stage: batching, routing, failures, deadlines, bad input."""

from __future__ import annotations

import asyncio
import time

import msgspec

from mpipeline.errors import ErrorCode
from mpipeline.messages import Failed, Retrieved
from mpipeline.routing import message_key, shard_for
from tests.unit.runner.rig import (
    CODEC,
    Deliver,
    Retrieve,
    Rig,
    completed,
    failures,
    flip_data_byte,
    ids,
    request,
)


def test_a_batch_comes_out_in_order_as_one_record_stamped_by_the_stage() -> None:
    async def body() -> None:
        async with Rig(Retrieve, "rag") as rig:
            before = time.monotonic_ns()
            rig.send(*(request(f"r{i}") for i in range(5)))
            await rig.until(lambda: len(rig.out()) == 5, "five outputs")
            records = rig.records[rig.outputs[0].name]
            assert [ids(record) for record in records] == [[f"r{i}" for i in range(5)]]
            for msg in records[0]:
                assert isinstance(msg, Retrieved)
                assert msg.request.stamps["rag"] >= before
            assert rig.err() == []
            assert rig.stage.seen == [f"r{i}" for i in range(5)]
        assert rig.runner.processed == 5

    asyncio.run(body())


def test_outputs_go_to_the_next_stage_by_session_hash_one_record_per_ring() -> None:
    sessions = [f"s{i}" for i in range(24)]

    async def body() -> None:
        async with Rig(Retrieve, "rag", outputs=3) as rig:
            rig.send(*(request(f"r{i}", session=s) for i, s in enumerate(sessions)))
            await rig.until(lambda: len(rig.everything()) == 24, "every output")
            for ring in range(3):
                records = rig.records[rig.outputs[ring].name]
                want = [f"r{i}" for i, s in enumerate(sessions) if shard_for(s, 3) == ring]
                assert want, "every ring gets some of 24 sessions"
                assert len(records) == 1
                assert ids(records[0]) == want
                assert all(shard_for(message_key(m), 3) == ring for m in records[0])

    asyncio.run(body())


def test_the_last_stage_returns_each_reply_to_the_ring_of_its_client() -> None:
    async def body() -> None:
        async with Rig(Deliver, "stream", clients=3) as rig:
            failed = Failed(
                request_id="f2",
                session_id=None,
                reply_to=2,
                code=ErrorCode.STAGE_ERROR,
                reason="earlier",
                stage="inference",
            )
            rig.send(completed("a0", 0), completed("b1", 1), failed, completed("c0", 0))
            await rig.until(lambda: len(rig.everything()) == 4, "four replies")
            assert ids(rig.out(0)) == ["a0", "c0"]
            assert ids(rig.out(1)) == ["b1"]
            # A Failed passes through (not processed) to its client's return ring.
            assert rig.out(2) == [failed]
            assert [len(rig.records[r.name]) for r in rig.outputs] == [1, 1, 1]
        assert rig.runner.processed == 3

    asyncio.run(body())


def test_a_failing_message_becomes_one_failed_and_the_rest_of_the_batch_passes() -> None:
    async def body() -> None:
        async with Rig(Retrieve, "rag", clients=2) as rig:
            rig.send(request("ok1"), request("bad", "fail", reply_to=1), request("ok2"))
            await rig.answered("ok1", "bad", "ok2")
            assert ids(rig.out()) == ["ok1", "ok2"]
            assert rig.err(0) == []
            [failed] = rig.err(1)
            assert isinstance(failed, Failed)
            assert (failed.request_id, failed.code, failed.stage) == (
                "bad",
                ErrorCode.STAGE_ERROR,
                "rag",
            )
            assert failed.reason == "ValueError: cannot take bad"
        assert rig.runner.processed == 3

    asyncio.run(body())


def test_a_request_past_its_deadline_is_answered_before_the_stage_sees_it() -> None:
    async def body() -> None:
        async with Rig(Retrieve, "rag") as rig:
            late = request("late", deadline_ns=time.monotonic_ns() - 1)
            soon = request("soon", deadline_ns=time.monotonic_ns() + 60_000_000_000)
            rig.send(late, soon)
            await rig.answered("late", "soon")
            assert ids(rig.out()) == ["soon"]
            failed = failures(rig.err())["late"]
            assert failed.code == ErrorCode.DEADLINE_EXCEEDED
            assert failed.reason == "deadline passed before stage rag"
            assert rig.stage.seen == ["soon"]
            assert rig.runner.meter.expired == 1
        assert rig.runner.processed == 1

    asyncio.run(body())


def test_a_message_too_large_for_the_next_ring_is_answered_too_large() -> None:
    async def body() -> None:
        # 64 KiB ring: max_record is 16 KiB - 8.
        async with Rig(Retrieve, "rag", output_bytes=64 << 10) as rig:
            limit = rig.outputs[0].max_record
            rig.send(
                request("small"), request("huge", f"big:{limit + 1}"), request("fits", "big:9")
            )
            await rig.answered("small", "huge", "fits")
            assert ids(rig.out()) == ["small", "fits"]
            failed = failures(rig.err())["huge"]
            assert failed.code == ErrorCode.TOO_LARGE
            assert f"max record of {limit} bytes" in failed.reason

    asyncio.run(body())


def test_corrupt_and_undecodable_records_are_skipped_counted_and_reading_goes_on() -> None:
    async def body() -> None:
        async with Rig(Retrieve, "rag") as rig:
            good = CODEC.encode_many([request("r1")])
            rig.send_raw(
                good,  # corrupted below: its checksum no longer matches
                b"\xc1 not msgpack",
                msgspec.msgpack.encode([1, 2, 3]),  # msgpack, but not messages
                msgspec.msgpack.encode([]),  # a record holds at least one message
                CODEC.encode_many([request("r2"), request("r3")]),
            )
            flip_data_byte(rig.inputs[0], 8)  # the first payload byte of the first record
            await rig.until(lambda: len(rig.out()) == 2, "the good record")
            assert ids(rig.out()) == ["r2", "r3"]
            assert rig.runner.meter.corrupt == 4
            assert rig.err() == []
            rig.send(request("r4"))
            await rig.until(lambda: len(rig.out()) == 3, "a record after the bad ones")
        assert rig.runner.processed == 3

    asyncio.run(body())
