"""What timing one message costs a stage: the runner's inline shared-memory
histogram against doing nothing, a bisect over float bounds, and
prometheus_client's own ``Histogram.observe`` (the obvious alternative).

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
from mpipeline.metrics.schema import BUCKET_BOUNDS_S, BUCKET_OF_BITS, HIST_SUM

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


def shm_inline(blk: MetricsBlock) -> Callable[[], float]:
    """The runner's pattern: one bit_length, one tuple index, two cell adds."""
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
    if variant.startswith("shm"):
        assert block.read(0)[HIST_SUM] > 0  # the cells really were written
