"""The doorbell's cheap park (issue 16): one registration and one timer per waiter, not per park.

And the consumer's ``wait_readable``, which lets a batch reader wake once per
batch: it sleeps until a record is there without taking (or releasing) any.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from mpipeline import _shm
from mpipeline._doorbell import Doorbell
from mpipeline.errors import RingEmpty, RingPoisoned
from mpipeline.ring import S_CONSUMER_WAIT, Ring

T = TypeVar("T")
# The data doorbell of a ring: made by Ring.create, removed with the ring.
_DATA = _shm.BELL_SUFFIXES[0]


def _name() -> str:
    return f"test-{secrets.token_hex(6)}"


def run(coro: Awaitable[T], *, uv: bool = True) -> T:
    async def main() -> T:
        return await coro

    factory = uvloop.new_event_loop if uv else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@pytest.fixture
def pair() -> Iterator[tuple[Ring, Ring]]:
    """A producer (creator) and a consumer handle of one 4 KiB ring, no spinning."""
    with Ring.create(4096, name=_name(), spin_s=0) as r, Ring.attach(r.name, spin_s=0) as c:
        yield r, c


@pytest.fixture
def bell(pair: tuple[Ring, Ring]) -> Iterator[Doorbell]:
    b = Doorbell(pair[0].name, _DATA)
    yield b
    b.close()


async def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def _spy(loop: Any, name: str, calls: list[str]) -> None:
    """Count calls of a (pure-Python) loop's method ``name``."""
    real = getattr(loop, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return real(*args, **kwargs)

    setattr(loop, name, wrapper)


def test_the_fifo_stays_registered_across_parks_and_one_timer_serves_them(
    bell: Doorbell,
) -> None:
    calls: list[str] = []

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        for name in ("add_reader", "remove_reader", "call_at", "call_later"):
            _spy(loop, name, calls)
        results = []
        for _ in range(50):
            loop.call_soon(bell.ring)
            results.append(await bell.wait(5.0))
        return results

    assert run(main(), uv=False) == [True] * 50
    # 50 parks: one registration and one timer, where each park used to cost
    # an add_reader, a remove_reader and a call_later.
    assert calls == ["add_reader", "call_at"]


def test_close_unregisters_the_fifo_from_a_live_loop(pair: tuple[Ring, Ring]) -> None:
    calls: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        _spy(loop, "remove_reader", calls)
        b = Doorbell(pair[0].name, _DATA)
        loop.call_soon(b.ring)
        assert await b.wait(5.0)
        b.close()

    run(main(), uv=False)
    assert calls == ["remove_reader"]


def test_a_shorter_wait_after_a_long_one_still_times_out_on_time(bell: Doorbell) -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        loop.call_soon(bell.ring)
        assert await bell.wait(30.0)  # arms the timer for 30 s
        start = time.monotonic()
        rung = await bell.wait(0.05)  # must not wait for the 30 s timer
        return rung, time.monotonic() - start

    rung, took = run(main())
    assert rung is False
    assert 0.04 <= took < 1.0


def test_a_longer_wait_after_a_short_one_is_not_cut_short(bell: Doorbell) -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        loop.call_soon(bell.ring)
        assert await bell.wait(0.02)  # arms the timer for 20 ms
        start = time.monotonic()
        rung = await bell.wait(0.15)  # the old timer fires early and re-arms
        return rung, time.monotonic() - start

    rung, took = run(main())
    assert rung is False
    assert 0.14 <= took < 1.0


def test_a_ring_from_another_handle_wakes_the_waiter(pair: tuple[Ring, Ring]) -> None:
    waiter = Doorbell(pair[0].name, _DATA)
    ringer = Doorbell(pair[0].name, _DATA)
    try:

        async def main() -> bool:
            asyncio.get_running_loop().call_later(0.01, ringer.ring)
            return await waiter.wait(5.0)

        assert run(main()) is True
    finally:
        waiter.close()
        ringer.close()


def test_a_second_waiter_is_refused(bell: Doorbell) -> None:
    async def main() -> None:
        first = asyncio.ensure_future(bell.wait(5.0))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already has a waiter"):
            await bell.wait(5.0)
        bell.ring()
        assert await first

    run(main())


def test_the_doorbell_follows_its_owner_to_a_new_loop(bell: Doorbell) -> None:
    async def once() -> bool:
        asyncio.get_running_loop().call_soon(bell.ring)
        return await bell.wait(5.0)

    assert run(once()) is True
    assert run(once()) is True  # the first loop is closed: registered anew
    assert run(once(), uv=False) is True


def test_a_cancelled_wait_leaves_the_doorbell_usable(bell: Doorbell) -> None:
    async def main() -> bool:
        task = asyncio.ensure_future(bell.wait(5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        asyncio.get_running_loop().call_soon(bell.ring)
        return await bell.wait(5.0)

    assert run(main()) is True


# Consumer.wait_readable


def test_wait_readable_wakes_on_a_put_and_takes_nothing(pair: tuple[Ring, Ring]) -> None:
    producer, consumer = pair

    async def main() -> list[bytes]:
        async def put_once_parked() -> None:
            await _until(lambda: consumer._q[S_CONSUMER_WAIT] & 1 == 1, "the consumer to park")
            producer.put_many([b"a", b"b", b"c"])

        task = asyncio.ensure_future(put_once_parked())
        await consumer.wait_readable(timeout=5)
        await task
        return [bytes(v) for v in consumer.get_many(64)]

    # One wake, then the whole batch: nothing was taken by the wait.
    assert run(main()) == [b"a", b"b", b"c"]


def test_wait_readable_returns_at_once_and_keeps_views_valid(pair: tuple[Ring, Ring]) -> None:
    producer, consumer = pair
    producer.put_many([b"first", b"second"])
    [view] = consumer.get_many(1)
    read_pos = consumer.stats().read_pos
    run(consumer.wait_readable(timeout=5))
    # The record handed out is still held: nothing was released to the producer.
    assert bytes(view) == b"first"
    assert consumer.stats().read_pos == read_pos
    assert [bytes(v) for v in consumer.get_many(64)] == [b"second"]


def test_wait_readable_times_out_on_an_empty_ring(pair: tuple[Ring, Ring]) -> None:
    start = time.monotonic()
    with pytest.raises(RingEmpty, match="stayed empty for 0.1s"):
        run(pair[1].wait_readable(timeout=0.1))
    assert 0.09 <= time.monotonic() - start < 1.0


def test_wait_readable_raises_on_a_poisoned_ring(pair: tuple[Ring, Ring]) -> None:
    producer, consumer = pair
    producer.put_many([b"x"])
    producer.poison()
    with pytest.raises(RingPoisoned):
        run(consumer.wait_readable(timeout=1))
