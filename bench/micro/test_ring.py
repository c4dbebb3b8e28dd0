"""Ring micro-benchmarks: one record through try_put/try_get, and a batch through *_many.

Run: ``.venv/bin/pytest bench/micro/test_ring.py`` (``--benchmark-group-by=group``
puts the sizes side by side). ``scripts/test.sh`` runs it with
``--benchmark-disable`` as a smoke test. Both ends live in one process, so this
is the CPU cost per call with hot caches; ``bench/ring_vs_peers.py`` measures
the same calls between two pinned processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench._ipc_loops import make_pool
from mpipeline import _shm
from mpipeline.codec import Codec
from mpipeline.messages import PromptRequest
from mpipeline.ring import Ring

SIZES = [64, 512]
BATCH = 64
CAPACITY = 1 << 20


def record(size: int, tag: int = 0) -> bytes:
    """``size`` bytes that differ per ``tag``, so a swapped record is noticed."""
    return bytes((tag + i) % 251 for i in range(size))


@pytest.fixture
def ring() -> Iterator[Ring]:
    ring = Ring.create(CAPACITY)
    try:
        yield ring
    finally:
        ring.close()
        ring.unlink()
    assert not list(_shm.SHM_DIR.glob(ring.name + "*")), "segment or doorbell left behind"


@pytest.mark.parametrize("size", SIZES)
def test_put_get(benchmark: BenchmarkFixture, ring: Ring, size: int) -> None:
    data = record(size)
    put, get = ring.try_put, ring.try_get

    def pair() -> tuple[bool, memoryview | None]:
        return put(data), get()

    benchmark.group = f"ring {size} B"
    written, view = benchmark(pair)
    assert written
    assert view is not None and view == data
    view.release()
    assert ring.try_get() is None
    stats = ring.stats()
    assert stats.records_in == stats.records_out > 0
    assert stats.corrupt_records == 0


@pytest.mark.parametrize("size", SIZES)
def test_put_many_get_many(benchmark: BenchmarkFixture, ring: Ring, size: int) -> None:
    batch = [record(size, i) for i in range(BATCH)]
    put_many, get_many = ring.put_many, ring.get_many

    def round_trip() -> tuple[int, list[memoryview]]:
        return put_many(batch), get_many(BATCH)

    benchmark.group = f"ring {size} B"
    written, views = benchmark(round_trip)
    assert written == BATCH
    assert [bytes(v) for v in views] == batch
    for view in views:
        view.release()
    assert ring.get_many(BATCH) == []
    assert ring.stats().records_in == ring.stats().records_out


@pytest.mark.parametrize("size", SIZES)
def test_message_put_get(benchmark: BenchmarkFixture, ring: Ring, size: int) -> None:
    """What one message costs a stage end to end in one process: encode, put, get, decode."""
    codec = Codec(PromptRequest)
    msg = make_pool(codec, size)[0]
    put, get, enc, dec = ring.try_put, ring.try_get, codec.encode, codec.decode_one

    def pair() -> PromptRequest | None:
        put(enc(msg))
        view = get()
        return None if view is None else dec(view)

    benchmark.group = f"ring {size} B"
    assert len(enc(msg)) == size
    assert benchmark(pair) == msg
