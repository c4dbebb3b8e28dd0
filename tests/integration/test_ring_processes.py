"""The ring between real processes: bulk exchange, dead peers, torn writes, stale segments.

Children are started with the spawn context (RELIABILITY.md §2.3) and report
over a pipe; every wait polls against a deadline. Records carry their sequence
number and a checksum of their content (see ``_ring_children``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import pytest
import uvloop

from mpipeline import _shm
from mpipeline.errors import PeerGone, RingNotFound
from mpipeline.ring import S_PRODUCER_WAIT, Ring
from tests.integration import _ring_children as kids

pytestmark = pytest.mark.integration

CTX = multiprocessing.get_context("spawn")
# Generous bounds for a loaded 2-core CI box; the happy path takes a fraction.
START_TIMEOUT_S = 20.0


def _name() -> str:
    return f"test-{secrets.token_hex(6)}"


def _start(target: Callable[..., None], *args: object) -> tuple[BaseProcess, Connection]:
    """Start ``target(*args, conn)`` in a spawned child; return it and our pipe end."""
    ours, theirs = CTX.Pipe()
    proc = CTX.Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    theirs.close()
    return proc, ours


def _recv(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise AssertionError(f"no {what} within {timeout}s")
    return conn.recv()


def _reap(*procs: BaseProcess) -> None:
    """Kill what is still running and wait for it, so no test leaves a child behind."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(5)


def _put_is_parked(ring: Ring) -> bool:
    """True when the producer's wait sequence in the header is odd: asleep on its doorbell."""
    with open(_shm.segment_path(ring.name), "rb") as f:
        f.seek(S_PRODUCER_WAIT * 8)
        return bool(int.from_bytes(f.read(8), "little") & 1)


def _result(conn: Connection, who: str) -> Any:
    status, detail = _recv(conn, 5, f"result from the {who}")
    assert status == "ok", f"{who} failed:\n{detail}"
    return detail


@pytest.fixture
def uvloop_runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        yield runner


@pytest.mark.timeout(90)
def test_million_records_cross_process_intact_and_in_order() -> None:
    count = 1_000_000
    with Ring.create(256 * 1024, name=_name(), max_record=kids.MAX_RECORD) as ring:
        # Producer switches to awaitable put at 70 %, consumer to awaitable get at
        # 40 %: every pairing of batch and single-record paths gets its share.
        producer, pconn = _start(kids.produce, ring, count, 700_000)
        consumer, cconn = _start(kids.consume, ring, count, 400_000)
        try:
            deadline = time.monotonic() + 80
            pending = {producer.sentinel, consumer.sentinel}
            while pending and time.monotonic() < deadline:
                for ready in wait(list(pending), timeout=deadline - time.monotonic()):
                    pending.discard(ready)
            assert not pending, "the exchange did not finish in time"
            full_events = _result(pconn, "producer")
            assert _result(cconn, "consumer") == count
        finally:
            _reap(producer, consumer)
        stats = ring.stats()
        assert stats.records_in == stats.records_out == count
        assert stats.bytes_in == stats.bytes_out
        assert stats.used_bytes == 0
        assert stats.corrupt_records == 0
        # The ring was full at times, so the parked-producer path ran too.
        assert full_events > 0
        assert stats.producer_pid == stats.consumer_pid == 0  # both closed cleanly


@pytest.mark.timeout(30)
def test_producer_blocked_on_full_ring_gets_peer_gone_when_consumer_is_killed(
    uvloop_runner: asyncio.Runner,
) -> None:
    with Ring.create(4096, name=_name()) as ring:
        consumer, conn = _start(kids.hold_consumer, ring)
        try:
            assert _recv(conn, START_TIMEOUT_S, "ready from the consumer") == "ready"
            while ring.try_put(b"x" * 100):
                pass

            async def main() -> float:
                put = asyncio.ensure_future(ring.put(b"y" * 100))
                # Poll until the producer is parked on the doorbell, not just spinning.
                deadline = time.monotonic() + 5
                while not _put_is_parked(ring):
                    assert time.monotonic() < deadline, "put() never parked"
                    await asyncio.sleep(0.005)
                assert not put.done()
                os.kill(consumer.pid or 0, signal.SIGKILL)
                killed = time.monotonic()
                with pytest.raises(PeerGone, match="consumer pid"):
                    await asyncio.wait_for(put, timeout=10)
                return time.monotonic() - killed

            elapsed = uvloop_runner.run(main())
            assert elapsed < 2.0
        finally:
            _reap(consumer)


@pytest.mark.timeout(120)
def test_producer_killed_mid_put_many_never_exposes_a_torn_record() -> None:
    """Scenario 16: SIGKILL a producer a random 0-2 ms into its writing, a hundred times.

    One ring lives through every iteration, and each new producer attaches to
    the ring its predecessor died in and continues the sequence from what the
    consumer (this process) has read: so the records must form one gapless
    sequence, and nothing the dead producers half-wrote may ever surface.
    """
    iterations = 100
    rng = random.Random(kids.SEED)
    with Ring.create(1 << 20, name=_name(), max_record=kids.MAX_RECORD) as ring:
        launcher, conn = _start(kids.launch_producers, ring.name)
        seq = 0
        killed = 0

        def drain() -> None:
            nonlocal seq
            for view in ring.get_many(512):
                kids.check_record(view, seq)
                seq += 1

        try:
            for i in range(iterations):
                conn.send(("start", seq, i))
                kind, pid = _recv(conn, START_TIMEOUT_S, "a started producer")
                assert kind == "started"
                # The producer records its pid in the header as it starts writing.
                deadline = time.monotonic() + 10
                while ring.stats().producer_pid != pid:
                    assert time.monotonic() < deadline, "the producer never started"
                    drain()
                kill_at = time.perf_counter() + rng.uniform(0, 0.002)
                while time.perf_counter() < kill_at:
                    drain()
                os.kill(pid, signal.SIGKILL)
                kind, dead_pid, status = _recv(conn, 10, "the producer's exit")
                assert (kind, dead_pid) == ("exited", pid)
                if os.WIFSIGNALED(status):
                    killed += 1
                else:
                    assert os.WEXITSTATUS(status) == 0, "the producer failed"
                # Everything the dead producer published is there; nothing else is.
                before = -1
                while seq != before:
                    before = seq
                    drain()
            conn.send(("stop",))
            launcher.join(10)
        finally:
            _reap(launcher)
        ring.get_many(0)  # release the last batch so the counters settle
        stats = ring.stats()
        assert stats.corrupt_records == 0
        assert not stats.poisoned
        assert stats.records_out == seq
        assert stats.used_bytes == 0
        # Nearly every kill must land while the producer was still producing.
        assert killed >= iterations * 0.9, f"only {killed} of {iterations} kills landed"
        assert seq > 0


@pytest.mark.timeout(30)
def test_consumer_killed_holding_a_record_leaves_it_to_its_successor() -> None:
    """A record handed out by a get is released only by the next get (at-least-once)."""
    with Ring.create(4096, name=_name()) as ring:
        for rec in (b"first", b"second"):
            assert ring.try_put(rec)
        consumer, conn = _start(kids.take_one_and_die, ring)
        try:
            assert _recv(conn, START_TIMEOUT_S, "the record the consumer took") == b"first"
            consumer.join(10)
            assert consumer.exitcode == -signal.SIGKILL
        finally:
            _reap(consumer)
        assert ring.consumer_alive() is False
        with Ring.attach(ring.name) as successor:
            assert [bytes(v) for v in successor.get_many(10)] == [b"first", b"second"]


@pytest.mark.timeout(30)
def test_sweep_stale_removes_segment_of_killed_creator() -> None:
    prefix = f"{_shm.PREFIX}sweep{secrets.token_hex(4)}-"
    name = prefix + "edge"
    creator, conn = _start(kids.create_and_die, name)
    try:
        assert _recv(conn, START_TIMEOUT_S, "the created ring's name") == name
        creator.join(10)
        assert creator.exitcode == -signal.SIGKILL
        assert _shm.segment_path(name).exists()
        with Ring.create(4096, name=prefix + "live") as live:
            assert _shm.sweep_stale(prefix=prefix) == [name]
            assert _shm.sweep_stale(prefix=prefix) == []
            assert live.stats().capacity == 4096  # the live one is untouched
        with pytest.raises(RingNotFound):
            Ring.attach(name)
        assert not any(p.name.startswith(prefix) for p in _shm.SHM_DIR.iterdir())
    finally:
        _reap(creator)
        _shm.unlink_segment(name)
