"""Child-process entry points for ``test_ring_processes.py`` and the records they exchange.

Spawned children must be importable top-level functions. Each one reports back
over a ``Connection``: ``("ok", detail)`` or ``("error", traceback)``, so a
failure in a child shows up in the test's assertion message.

A record is ``[u64 seq][u64 xxh3(body, seed=seq)][body]``. The body length and
content are a pure function of ``seq`` (a slice of a seeded random pool), so a
consumer can check a record without having seen the producer's state: a
truncated, torn, reordered or duplicated record fails one of the checks.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import traceback
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

import uvloop
import xxhash

from mpipeline.ring import Ring

SEED = 20240611
MAX_BODY = 2048
_POOL = random.Random(SEED).randbytes(1 << 16)
_HEAD = struct.Struct("<QQ")
HEAD_SIZE = _HEAD.size
# The largest record ``make_record`` builds.
MAX_RECORD = HEAD_SIZE + MAX_BODY
# Records one forked producer has ready; more than it can write in the few
# milliseconds it lives, so the kill lands while it is still producing.
RECORDS_PER_PRODUCER = 4000


def _shape(seq: int) -> tuple[int, int]:
    """Offset into the pool and length of record ``seq``'s body."""
    h = xxhash.xxh3_64_intdigest(seq.to_bytes(8, "little"), seed=SEED)
    return (h >> 16) % (len(_POOL) - MAX_BODY), h % (MAX_BODY + 1)


def make_record(seq: int) -> bytes:
    off, n = _shape(seq)
    body = _POOL[off : off + n]
    return _HEAD.pack(seq, xxhash.xxh3_64_intdigest(body, seed=seq)) + body


def check_record(view: memoryview, expect_seq: int) -> None:
    """Raise AssertionError unless ``view`` is exactly record ``expect_seq``."""
    if len(view) < HEAD_SIZE:
        raise AssertionError(f"record {expect_seq}: {len(view)} bytes, shorter than its head")
    seq, digest = _HEAD.unpack_from(view)
    if seq != expect_seq:
        raise AssertionError(f"expected record {expect_seq}, got {seq}")
    body = view[HEAD_SIZE:]
    if len(body) != _shape(seq)[1]:
        raise AssertionError(f"record {seq}: body of {len(body)} bytes, expected {_shape(seq)[1]}")
    if xxhash.xxh3_64_intdigest(body, seed=seq) != digest:
        raise AssertionError(f"record {seq}: checksum mismatch")


def _run(conn: Connection, main: Callable[[], Coroutine[Any, Any, object]]) -> None:
    """Run ``main`` on uvloop and report its result or its traceback."""
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(main())
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("ok", result))


# The million-record exchange


def produce(ring: Ring, count: int, many_until: int, conn: Connection) -> None:
    """Write records ``0..count-1``: with ``put_many`` below ``many_until``, then one
    awaitable ``put`` at a time. ``ring`` arrives pickled, i.e. attached by name."""
    rng = random.Random(SEED + 1)

    async def main() -> int:
        with ring:
            seq = 0
            while seq < many_until:
                size = min(rng.randint(1, 512), many_until - seq)
                seq += ring.put_many(make_record(s) for s in range(seq, seq + size))
                if seq < many_until:
                    # Full (or partly): sleep on the doorbell for room for the next one.
                    await ring.put(make_record(seq), timeout=20)
                    seq += 1
            for s in range(seq, count):
                await ring.put(make_record(s), timeout=20)
            return ring.stats().full_events

    _run(conn, main)


def consume(ring: Ring, count: int, many_until: int, conn: Connection) -> None:
    """Read and check records ``0..count-1``: ``get_many`` below ``many_until``, then
    one awaitable ``get`` at a time."""
    rng = random.Random(SEED + 2)

    async def main() -> int:
        with ring:
            seq = 0
            while seq < many_until:
                views = ring.get_many(min(rng.randint(1, 512), many_until - seq))
                if not views:
                    views = [await ring.get(timeout=20)]
                for view in views:
                    check_record(view, seq)
                    seq += 1
            while seq < count:
                check_record(await ring.get(timeout=20), seq)
                seq += 1
            return seq

    _run(conn, main)


# A consumer that waits to be killed


def hold_consumer(ring: Ring, conn: Connection) -> None:
    """Claim the consumer side of ``ring``, say so, then block until the pipe closes."""
    with ring:
        if ring.try_get() is not None:
            raise AssertionError("the ring should start empty")
        conn.send("ready")
        try:
            conn.recv()
        except EOFError:
            pass


def take_one_and_die(ring: Ring, conn: Connection) -> None:
    """Take one record, report its bytes, and die by SIGKILL while holding it."""
    view = ring.try_get()
    conn.send(None if view is None else bytes(view))
    os.kill(os.getpid(), signal.SIGKILL)


def create_and_die(name: str, conn: Connection) -> None:
    """Create a ring and die by SIGKILL without unlinking it: a crashed supervisor."""
    ring = Ring.create(4096, name=name)
    conn.send(ring.name)
    os.kill(os.getpid(), signal.SIGKILL)


# Producers killed mid-put_many


def launch_producers(name: str, conn: Connection) -> None:
    """Fork one producer of ``name`` per ``("start", first_seq, seed)`` request.

    Spawning costs ~100 ms of imports per process; forking this already-warm
    process costs about a millisecond, which is what makes a hundred kills
    affordable. Forking is safe here because this process is single-threaded
    and has never run an event loop: the child builds its own uvloop loop.
    Replies ``("started", pid)`` and then ``("exited", pid, wait status)``.
    """
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            _, first_seq, seed = msg
            records = [make_record(s) for s in range(first_seq, first_seq + RECORDS_PER_PRODUCER)]
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _produce_in_batches(name, records, seed)
                    code = 0
                finally:
                    os._exit(code)
            conn.send(("started", pid))
            _, status = os.waitpid(pid, 0)
            conn.send(("exited", pid, status))
    except EOFError:
        return


def _produce_in_batches(name: str, records: list[bytes], seed: int) -> None:
    """Write ``records`` with ``put_many`` in big batches, waiting for room when full."""
    rng = random.Random(seed)

    async def main() -> None:
        with Ring.attach(name) as ring:
            i = 0
            while i < len(records):
                batch = records[i : i + rng.randint(200, 2000)]
                done = 0
                while done < len(batch):
                    done += ring.put_many(batch[done:])
                    if done < len(batch):
                        await ring.put(batch[done], timeout=5)
                        done += 1
                i += len(batch)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
