"""What timing one message costs a stage: the runner's local histogram (published
to shared memory on each heartbeat), adding to the shared-memory cells
directly, a bisect over float bounds, and prometheus_client's own
``Histogram.observe`` (the obvious alternative), against doing nothing.

Run: ``.venv/bin/pytest bench/micro/test_metrics.py``; ``scripts/test.sh`` runs it
with ``--benchmark-disable`` as a smoke test. One round records ``N`` durations
spread over six decades, so divide by ``N`` for the cost per message. The
clock read is in every variant (the runner reads it anyway for heartbeats),
so the differences are the recording alone.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, Histogram
from pytest_benchmark.fixture import BenchmarkFixture

from mpipeline.metrics import MetricsBlock, stage_region
from mpipeline.metrics.schema import BUCKET_BOUNDS_S, BUCKET_OF_BITS, HIST_CELLS, HIST_SUM

N = 10_000
DURATIONS = [(i * 7919) % 10_000_000 + 500 for i in range(N)]  # 0.5 µs .. 10 ms


@pytest.fixture(scope="module")
def block() -> Iterator[MetricsBlock]:
    blk = MetricsBlock.create(f"mpl-bench{os.getpid()}-metrics", 1)
    try:
        yield blk
    finally:
        blk.close()
        blk.unlink()


def nothing(_: MetricsBlock) -> Callable[[], float]:
    clock = time.monotonic_ns

    def run() -> float:
        total = 0
        for d in DURATIONS:
            clock()
            total += d
        return total

    return run


def local_list(blk: MetricsBlock) -> Callable[[], float]:
    """The runner's sync path: one add to a local list per message; the durations
    telescope to one sum per batch; the heartbeat adds the list to the cells."""
    writer = blk.writer(0, stage_region("rag", "rag-0", []))
    cells = writer.cells
    base = writer.index("stage_duration_seconds", "rag", "rag-0")
    hist = [0] * HIST_CELLS
    clock = time.monotonic_ns

    def run() -> float:
        now = start = clock()
        for d in DURATIONS:
            then, now = now, clock()
            hist[BUCKET_OF_BITS[(now - then + d).bit_length()]] += 1
        hist[HIST_SUM] += now - start
        for i, n in enumerate(hist):  # the heartbeat's publish
            if n:
                cells[base + i] += n
                hist[i] = 0
        return cells[base + HIST_SUM]

    return run


def shm_inline(blk: MetricsBlock) -> Callable[[], float]:
    """Every message added to the cells: one bit_length, one tuple index, two cell adds."""
    writer = blk.writer(0, stage_region("rag", "rag-0", []))
    cells = writer.cells
    hist = writer.index("stage_duration_seconds", "rag", "rag-0")
    hist_sum = hist + HIST_SUM
    clock = time.monotonic_ns

    def run() -> float:
        for d in DURATIONS:
            clock()
            cells[hist + BUCKET_OF_BITS[d.bit_length()]] += 1.0
            cells[hist_sum] += d
        return cells[hist_sum]

    return run


def shm_bisect(blk: MetricsBlock) -> Callable[[], float]:
    """The same cells, with the bucket found by bisect over float bounds in seconds."""
    writer = blk.writer(0, stage_region("rag", "rag-0", []))
    cells = writer.cells
    hist = writer.index("stage_duration_seconds", "rag", "rag-0")
    hist_sum = hist + HIST_SUM
    bounds = list(BUCKET_BOUNDS_S)
    clock = time.monotonic_ns

    def run() -> float:
        for d in DURATIONS:
            clock()
            seconds = d / 1e9
            cells[hist + bisect.bisect_left(bounds, seconds)] += 1.0
            cells[hist_sum] += seconds
        return cells[hist_sum]

    return run


def prometheus_histogram(_: MetricsBlock) -> Callable[[], float]:
    """prometheus_client in-process (what multiprocess mode would add file writes to)."""
    hist = Histogram(
        "bench_seconds",
        "bench",
        ["stage", "replica"],
        buckets=BUCKET_BOUNDS_S,
        registry=CollectorRegistry(),
    ).labels("rag", "rag-0")
    clock = time.monotonic_ns

    def run() -> float:
        for d in DURATIONS:
            clock()
            hist.observe(d / 1e9)
        return 0.0

    return run


VARIANTS: dict[str, Callable[[MetricsBlock], Callable[[], float]]] = {
    "nothing": nothing,
    "local-list": local_list,
    "shm-inline": shm_inline,
    "shm-bisect": shm_bisect,
    "prometheus-client": prometheus_histogram,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_record_stage_duration(
    benchmark: BenchmarkFixture, block: MetricsBlock, variant: str
) -> None:
    benchmark.group = f"record {N} message durations"
    benchmark.extra_info["per_message"] = N
    run = VARIANTS[variant](block)
    benchmark(run)
    if variant != "nothing" and variant != "prometheus-client":
        assert block.read(0)[HIST_SUM] > 0  # the cells really were written
