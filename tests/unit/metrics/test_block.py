"""The metrics block: a 0600 segment of float64 cells that replicas write and the supervisor reads.

Real shared memory and real processes: a writer in another process is seen
by the reader, the header refuses segments that are not metrics blocks, and
the stale sweep knows a metrics block's creator like a ring's.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import stat
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from mpipeline import _shm
from mpipeline._shm import H_KIND, H_PID, H_START
from mpipeline._shm import Kind as _Kind
from mpipeline.control import ControlBlock
from mpipeline.errors import RingCorrupted, RingNotFound
from mpipeline.metrics.block import (
    H_REGION_CELLS,
    H_REGIONS,
    H_VERSION,
    HEADER_WORDS,
    VERSION,
    MetricsBlock,
    attach_writer,
    segment_name,
)
from mpipeline.metrics.schema import (
    BUCKET_OF_BITS,
    HIST_CELLS,
    HIST_FINITE,
    HIST_INF,
    HIST_SUM,
    REGION_CELLS,
    Region,
    stage_region,
)
from mpipeline.ring import MAGIC, Ring

JOIN_S = 60.0

KIND_METRICS = _Kind.METRICS


@pytest.fixture
def prefix() -> Iterator[str]:
    """A private name space ("mpl-t<hex>"), removed whatever the test leaves."""
    pre = f"{_shm.PREFIX}t{secrets.token_hex(4)}"
    yield pre
    for path in _shm.SHM_DIR.glob(pre + "*"):
        path.unlink()


@pytest.fixture
def block(prefix: str) -> Iterator[MetricsBlock]:
    b = MetricsBlock.create(segment_name(prefix), 3)
    try:
        yield b
    finally:
        b.close()
        b.unlink()


def _header(name: str) -> list[int]:
    raw = _shm.segment_path(name).read_bytes()[: 8 * HEADER_WORDS]
    return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]


def _region() -> Region:
    return stage_region("inference", "inference-0", ["mpl-t-inference0-post0"], ["echo"])


# Creating


def test_create_is_0600_sized_and_headed(prefix: str, block: MetricsBlock) -> None:
    assert block.name == f"{prefix}-metrics"
    path = _shm.segment_path(block.name)
    assert path.parent == _shm.SHM_DIR
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 8 * (HEADER_WORDS + 3 * REGION_CELLS)
    head = _header(block.name)
    assert head[0] == MAGIC
    assert head[H_KIND] == KIND_METRICS
    assert head[H_REGIONS] == 3 == block.regions
    assert head[H_REGION_CELLS] == REGION_CELLS
    assert head[H_VERSION] == VERSION
    assert head[H_PID] == os.getpid()
    assert head[H_START] == _shm.proc_start_ticks(os.getpid())
    # Where the sweep and the leak check look for the creator.
    magic, pid, start = _shm.CREATOR_SLOTS.unpack(path.read_bytes()[: _shm.CREATOR_SLOTS.size])
    assert (magic, pid, start) == (MAGIC, head[H_PID], head[H_START])
    assert block.creator
    assert all(v == 0.0 for slot in range(3) for v in block.read(slot))


def test_create_refuses_an_existing_name(block: MetricsBlock) -> None:
    with pytest.raises(FileExistsError):
        MetricsBlock.create(block.name, 1)


# Attaching


def test_attach_shares_cells_with_the_creator(block: MetricsBlock) -> None:
    other = MetricsBlock.attach(block.name)
    try:
        assert not other.creator
        assert other.regions == 3
        w = other.writer(2, _region())
        w.add(w.index("expired", "inference"), 3)
        seen = block.read(2)
        assert seen[_region().offset("expired", "inference")] == 3.0
        assert sum(seen) == 3.0
        assert sum(block.read(0)) == sum(block.read(1)) == 0.0
    finally:
        other.close()
    assert _shm.segment_path(block.name).exists()  # closing an attachment removes nothing


def test_attach_missing_raises_ring_not_found(prefix: str) -> None:
    with pytest.raises(RingNotFound):
        MetricsBlock.attach(segment_name(prefix))


def test_attach_refuses_a_ring(prefix: str) -> None:
    with Ring.create(64 * 1024, name=f"{prefix}-metrics") as ring:
        with pytest.raises(RingCorrupted, match="not an mpipeline metrics block"):
            MetricsBlock.attach(ring.name)
        assert ring.try_put(b"the ring is untouched")


def test_attach_refuses_a_control_block(prefix: str) -> None:
    ctl = ControlBlock.create(f"{prefix}-control", 4, 2)
    try:
        with pytest.raises(RingCorrupted, match="not an mpipeline metrics block"):
            MetricsBlock.attach(ctl.name)
    finally:
        ctl.close()
        ctl.unlink()


@pytest.mark.parametrize("size", [0, 7, 8 * HEADER_WORDS, 4096])
def test_attach_refuses_zeros_and_short_files(prefix: str, size: int) -> None:
    name = segment_name(prefix)
    _shm.segment_path(name).write_bytes(bytes(size))
    with pytest.raises(RingCorrupted):
        MetricsBlock.attach(name)


def test_attach_refuses_a_truncated_block(prefix: str) -> None:
    """A header that claims more regions than the file holds: no read past the end."""
    b = MetricsBlock.create(segment_name(prefix), 2)
    b.close()
    path = _shm.segment_path(b.name)
    os.truncate(path, 8 * (HEADER_WORDS + REGION_CELLS))
    with pytest.raises(RingCorrupted):
        MetricsBlock.attach(b.name)
    b.unlink()


@pytest.mark.parametrize(("word", "value"), [(H_KIND, 0x100 | 1), (H_VERSION, VERSION + 1)])
def test_attach_refuses_another_kind_or_version(prefix: str, word: int, value: int) -> None:
    b = MetricsBlock.create(segment_name(prefix), 1)
    b.close()
    with open(_shm.segment_path(b.name), "r+b") as f:
        f.seek(8 * word)
        f.write(value.to_bytes(8, "little"))
    with pytest.raises(RingCorrupted):
        MetricsBlock.attach(b.name)
    b.unlink()


def test_only_the_creator_unlinks(block: MetricsBlock) -> None:
    other = MetricsBlock.attach(block.name)
    try:
        other.unlink()
        assert _shm.segment_path(block.name).exists()
    finally:
        other.close()


# Writers


def test_writer_slot_out_of_range(block: MetricsBlock) -> None:
    for slot in (-1, 3, 100):
        with pytest.raises(IndexError, match="out of range"):
            block.writer(slot, _region())
    block.writer(0, _region())
    block.writer(2, _region())


def test_writer_index_is_the_region_base_plus_the_offset(block: MetricsBlock) -> None:
    region = _region()
    w = block.writer(1, region)
    assert w.base == REGION_CELLS
    for (family, labels), offset in region.items():
        assert w.index(family, *labels) == REGION_CELLS + offset
    with pytest.raises(KeyError):
        w.index("expired", "rag")  # not a series of this region


def test_add_and_set(block: MetricsBlock) -> None:
    w = block.writer(1, _region())
    calls = w.index("upstream_calls", "echo")
    lag = w.index("event_loop_lag_seconds", "inference", "inference-0")
    w.add(calls)
    w.add(calls, 2.5)
    w.set(lag, 0.25)
    w.set(lag, 0.125)
    cells = block.read(1)
    assert cells[calls - w.base] == 3.5
    assert cells[lag - w.base] == 0.125


@pytest.mark.parametrize(
    ("ns", "cell"),
    [
        (0, 0),
        (1023, 0),
        (1024, 1),
        (1_000_000, 10),
        (2**36 - 1, HIST_FINITE - 1),
        (2**36, HIST_INF),
    ],
)
def test_observe_ns_fills_one_bucket_and_the_sum(block: MetricsBlock, ns: int, cell: int) -> None:
    w = block.writer(0, _region())
    hist = w.index("stage_duration_seconds", "inference", "inference-0")
    w.observe_ns(hist, ns)
    w.observe_ns(hist, ns)
    cells = block.read(0)[hist : hist + HIST_CELLS]
    assert cells[cell] == 2.0
    assert sum(cells[:HIST_SUM]) == 2.0  # one bucket, not a cumulative fill
    assert cells[HIST_SUM] == 2.0 * ns
    assert BUCKET_OF_BITS[ns.bit_length()] == cell


def test_observe_ns_stays_inside_its_histogram(block: MetricsBlock) -> None:
    region = _region()
    w = block.writer(2, region)
    hist = w.index("stage_duration_seconds", "inference", "inference-0")
    for ns in (0, 5, 2**20, 2**40, 2**63 - 1):
        w.observe_ns(hist, ns)
    cells = block.read(2)
    assert sum(cells[: region.offset("stage_duration_seconds", "inference", "inference-0")]) == 0
    assert sum(cells[hist - w.base + HIST_CELLS :]) == 0.0


def test_attach_writer(prefix: str, block: MetricsBlock) -> None:
    assert attach_writer("", 0, _region()) is None  # no run: metrics off
    w = attach_writer(prefix, 1, _region())
    assert w is not None
    try:
        w.add(w.index("tokens", "out"), 7)
        assert block.read(1)[_region().offset("tokens", "out")] == 7.0
    finally:
        w.block.close()
    with pytest.raises(RingNotFound):
        attach_writer(prefix + "x", 0, _region())


# Across processes


def _child_writer(name: str, conn: Connection) -> None:
    """Child: attach, report what the parent wrote, count, and exit."""
    block = MetricsBlock.attach(name)
    w = block.writer(1, _region())
    expired = w.index("expired", "inference")
    conn.send(block.cells[expired])
    for _ in range(1000):
        w.add(expired)
    w.observe_ns(w.index("stage_duration_seconds", "inference", "inference-0"), 3000)
    block.close()
    conn.send("done")


def test_a_writer_in_another_process_is_seen(block: MetricsBlock) -> None:
    region = _region()
    mine = block.writer(1, region)
    mine.add(mine.index("expired", "inference"), 5)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child_writer, args=(block.name, theirs))
    child.start()
    try:
        assert ours.poll(JOIN_S), "the child did not start"
        assert ours.recv() == 5.0  # the child sees the parent's write
        assert ours.poll(JOIN_S) and ours.recv() == "done"
        child.join(JOIN_S)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        ours.close()
        theirs.close()
    cells = block.read(1)
    assert cells[region.offset("expired", "inference")] == 1005.0
    hist = region.offset("stage_duration_seconds", "inference", "inference-0")
    assert cells[hist + BUCKET_OF_BITS[(3000).bit_length()]] == 1.0
    assert cells[hist + HIST_SUM] == 3000.0


def _child_creator(name: str, conn: Connection) -> None:
    """Child: create a block and exit without unlinking it (a SIGKILLed supervisor)."""
    MetricsBlock.create(name, 1).close()
    conn.send("created")


def test_sweep_removes_a_block_whose_creator_died_and_keeps_a_live_one(prefix: str) -> None:
    live = MetricsBlock.create(f"{prefix}-live-metrics", 2)
    try:
        dead_name = f"{prefix}-dead-metrics"
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        child = ctx.Process(target=_child_creator, args=(dead_name, theirs))
        child.start()
        try:
            assert ours.poll(JOIN_S) and ours.recv() == "created"
            child.join(JOIN_S)
            assert child.exitcode == 0
        finally:
            if child.is_alive():
                child.kill()
                child.join()
            ours.close()
            theirs.close()
        assert _shm.segment_path(dead_name).exists()

        assert _shm.sweep_stale(prefix=prefix) == [dead_name]
        assert not _shm.segment_path(dead_name).exists()
        assert _shm.segment_path(live.name).exists()
        w = live.writer(1, _region())
        w.add(w.index("expired", "inference"))  # still mapped and usable
        assert _shm.sweep_stale(prefix=prefix) == []
    finally:
        live.close()
        live.unlink()


def test_sweep_asks_the_liveness_check_about_the_blocks_creator(prefix: str) -> None:
    b = MetricsBlock.create(segment_name(prefix), 1)
    b.close()
    seen: list[tuple[int, int]] = []

    def alive(pid: int, start: int) -> bool:
        seen.append((pid, start))
        return False

    assert _shm.sweep_stale(prefix=prefix, alive=alive) == [b.name]
    assert seen == [(os.getpid(), _shm.proc_start_ticks(os.getpid()))]
    assert not _shm.segment_path(b.name).exists()
