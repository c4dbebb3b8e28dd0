"""The client's deadlines: requests on different default timeouts (a stream's hour, a
plain request's minutes) each expire in their own submit order, and requests with a
deadline of their own sit in a heap that never outgrows the table for long."""

from __future__ import annotations

import asyncio

import pytest

from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import Completed, PromptRequest, Usage
from mpipeline.pipeline._inflight import Inflight, Pending

S = 10**9
PLAIN_NS = 600 * S
STREAM_NS = 3600 * S


def _stats() -> dict[str, int]:
    return {"submitted": 0, "completed": 0, "failed": 0, "late": 0, "gone": 0}


def _add(table: Inflight, rid: str, deadline_ns: int, timeout_ns: int = 0) -> Pending:
    req = PromptRequest(request_id=rid, input="x", deadline_ns=deadline_ns)
    pending = Pending(req, deadline_ns, asyncio.get_running_loop().create_future(), 0)
    pending.custom_deadline = timeout_ns == 0
    table.add(pending, timeout_ns)
    return pending


def _done(rid: str) -> Completed:
    usage = Usage(prompt_tokens=1, completion_tokens=1)
    return Completed(request_id=rid, session_id=None, reply_to=0, text="", usage=usage)


def test_each_default_timeout_expires_in_its_own_order() -> None:
    async def main() -> None:
        table = Inflight(_stats())
        # Submitted alternately at t = 0, 1, 2, ...: streams' deadlines are an hour out.
        for t in range(6):
            stream = t % 2 == 1
            timeout = STREAM_NS if stream else PLAIN_NS
            _add(table, f"{'s' if stream else 'p'}{t}", t * S + timeout, timeout)
        custom = _add(table, "c", 100 * S)
        table.deliver(_done("p2"))  # ended: it leaves its queue
        table.expire(PLAIN_NS + 3 * S)
        await asyncio.sleep(0)
        assert sorted(table.pending) == ["p4", "s1", "s3", "s5"]
        with pytest.raises(RequestFailed) as late:
            custom.future.result()
        assert late.value.code is ErrorCode.DEADLINE_EXCEEDED
        table.expire(STREAM_NS + 3 * S)
        assert sorted(table.pending) == ["s5"]

    asyncio.run(main())


def test_ended_requests_with_their_own_deadline_do_not_pile_up_in_the_heap() -> None:
    async def main() -> None:
        table = Inflight(_stats())
        for i in range(5000):
            _add(table, f"r{i}", 3600 * S)
            table.deliver(_done(f"r{i}"))
        assert table.pending == {}
        assert len(table._deadlines) <= 1024 + 1

    asyncio.run(main())
