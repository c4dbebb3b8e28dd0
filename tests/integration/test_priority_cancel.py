"""Where work waits, critical goes first; a caller that gives up stops the work.

One inference shard that runs one request at a time (``concurrency = 1``)
with an echo worker slow enough that requests queue inside the shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from mpipeline.control import R_INFLIGHT
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.messages import Priority
from mpipeline.pipeline import Pipeline
from tests.integration.conftest import SupervisorFactory

pytestmark = pytest.mark.timeout(120)


async def _until(predicate: Callable[[], bool], limit_s: float = 30.0) -> None:
    for _ in range(int(limit_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


SLOW = {
    "stages.inference.concurrency": 1,
    "stages.inference.echo.token_delay_ms": 20.0,
    "stages.inference.echo.max_tokens": 2,
}


def test_critical_overtakes_the_low_requests_waiting_in_the_shard(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(SLOW)

    async def main() -> list[str]:
        order: list[str] = []
        async with Pipeline.attach(sp.run_dir) as client:

            async def one(name: str, priority: Priority) -> None:
                await client.submit(f"{name} x", priority=priority)
                order.append(name)

            # One loop tick: all of them reach the shard in one record.
            tasks = [asyncio.ensure_future(one(f"low{i}", Priority.LOW)) for i in range(8)]
            tasks.append(asyncio.ensure_future(one("critical", Priority.CRITICAL)))
            tasks.append(asyncio.ensure_future(one("high", Priority.HIGH)))
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return order

    with sp.explain():
        order = asyncio.run(main())
    # low0 was already running when the rest arrived; then critical, high, the rest.
    assert order[:3] == ["low0", "critical", "high"], order
    assert order[3:] == [f"low{i}" for i in range(1, 8)], order


def test_a_cancelled_submit_fails_client_cancelled_and_frees_the_shard(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(
        {**SLOW, "stages.inference.echo.max_tokens": 200, "stages.inference.concurrency": 4}
    )
    shard = sp.slot("inference-0")

    def inflight() -> int:
        with sp.control() as ctl:
            return ctl.get(shard, R_INFLIGHT)

    async def main() -> None:
        async with Pipeline.attach(sp.run_dir) as client:
            words = " ".join(f"w{i}" for i in range(200))  # 200 tokens x 20 ms
            task = asyncio.ensure_future(client.submit(words))
            await _until(lambda: inflight() > 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert client.inflight == 0
            loop = asyncio.get_running_loop()
            left = loop.time()
            while inflight():
                assert loop.time() - left < 2.0, "the shard kept working for nobody"
                await asyncio.sleep(0.02)
            # Cancelling by id, from another task, answers that request's caller.
            other = asyncio.ensure_future(client.submit(words))
            await _until(lambda: client.inflight > 0)
            (request_id,) = client._inflight  # the only one in flight
            assert client.cancel(request_id)
            with pytest.raises(RequestFailed) as caught:
                await other
            assert caught.value.code == ErrorCode.CLIENT_CANCELLED
            assert not client.cancel(request_id)  # already over

    with sp.explain():
        asyncio.run(main())
