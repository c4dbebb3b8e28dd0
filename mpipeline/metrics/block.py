"""The run's metrics block: one shared segment of float64 cells, a region per writer.

Aeron's counters file, not prometheus_client's multiprocess mode (RELIABILITY
§2.6): that mode writes a file per pid which grows with every restart and
cannot host custom collectors. Here each replica adds to cells of its own
region (one writer per cell, so a plain ``cells[i] += 1`` is safe without
atomics), and the supervisor reads every region at scrape time. An aligned
8-byte store is a single store on x86-64 and aarch64, so a reader sees the old
or the new value, never a torn one; a value one increment stale is fine for a
scrape. The segment lives as long as the run: a restarted replica keeps
counting in the same cells, so its counters never go backwards.

Layout: 8 u64 header words (magic, kind, regions, cells per region, version,
creator pid, creator start ticks, created ns; magic, pid and start where
``_shm.sweep_stale`` looks for them), then ``regions * REGION_CELLS`` f64.
Region i belongs to the writer in control-block slot i.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Protocol, cast

from mpipeline import _shm
from mpipeline.errors import RingCorrupted
from mpipeline.metrics.schema import BUCKET_OF_BITS, HIST_SUM, REGION_CELLS, Region
from mpipeline.ring import MAGIC

KIND_METRICS = 0x100 | 4
VERSION = 1
HEADER_WORDS = 8
H_MAGIC, H_KIND, H_REGIONS, H_REGION_CELLS, H_VERSION, H_PID, H_START, H_CREATED = range(8)


class Cells(Protocol):
    """A float64 memoryview as the hot path uses it (typeshed types memoryview items as int)."""

    def __getitem__(self, index: int, /) -> float: ...
    def __setitem__(self, index: int, value: float, /) -> None: ...


def segment_name(prefix: str) -> str:
    """The block of the run whose segments are named ``prefix`` ("mpl-<run id>")."""
    return f"{prefix}-metrics"


class MetricsBlock:
    """A mapped metrics segment: the supervisor creates it, replicas attach."""

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool) -> None:
        self.name = name
        self._fd = fd
        self._mem = mem
        self.creator = creator
        self._mv = memoryview(mem)
        with self._mv[: 8 * HEADER_WORDS].cast("Q") as q:
            self.regions = int(q[H_REGIONS])
        self._doubles = self._mv[8 * HEADER_WORDS :].cast("d")
        self.cells = cast(Cells, self._doubles)

    @classmethod
    def create(cls, name: str, regions: int) -> MetricsBlock:
        size = 8 * (HEADER_WORDS + regions * REGION_CELLS)
        fd, mem = _shm.create_segment(name, size)
        with memoryview(mem) as mv, mv[: 8 * HEADER_WORDS].cast("Q") as q:
            q[H_KIND] = KIND_METRICS
            q[H_REGIONS] = regions
            q[H_REGION_CELLS] = REGION_CELLS
            q[H_VERSION] = VERSION
            pid = os.getpid()
            q[H_PID] = pid
            q[H_START] = _shm.proc_start_ticks(pid) or 0
            q[H_CREATED] = time.monotonic_ns()
            q[H_MAGIC] = MAGIC  # last: a reader that sees the magic sees the rest
        return cls(name, fd, mem, creator=True)

    @classmethod
    def attach(cls, name: str) -> MetricsBlock:
        """:raises RingNotFound: no such segment; RingCorrupted: not a metrics block."""
        fd, mem = _shm.attach_segment(name)
        ok = len(mem) >= 8 * HEADER_WORDS
        if ok:
            with memoryview(mem) as mv, mv[: 8 * HEADER_WORDS].cast("Q") as q:
                ok = (
                    q[H_MAGIC] == MAGIC
                    and q[H_KIND] == KIND_METRICS
                    and q[H_VERSION] == VERSION
                    and q[H_REGION_CELLS] == REGION_CELLS
                    and len(mem) >= 8 * (HEADER_WORDS + q[H_REGIONS] * REGION_CELLS)
                )
        if not ok:
            mem.close()
            os.close(fd)
            raise RingCorrupted(f"segment {name} is not an mpipeline metrics block")
        return cls(name, fd, mem, creator=False)

    def writer(self, slot: int, region: Region) -> Writer:
        """The cells of region ``slot``, for the one process that writes them."""
        if not 0 <= slot < self.regions:
            raise IndexError(f"metrics region {slot} out of range({self.regions})")
        return Writer(self.cells, slot * REGION_CELLS, region, self)

    def read(self, slot: int) -> list[float]:
        """A copy of region ``slot``'s cells (one memcpy: as consistent as a scrape needs)."""
        base = slot * REGION_CELLS
        return cast(list[float], self._doubles[base : base + REGION_CELLS].tolist())

    def close(self) -> None:
        self._doubles.release()
        self._mv.release()
        self._mem.close()
        os.close(self._fd)

    def unlink(self) -> None:
        """Remove the segment (creator only: a reader such as ``mpipeline top`` must
        never delete a live run's block; attached processes keep their mapping)."""
        if self.creator:
            _shm.unlink_segment(self.name)


class Writer:
    """One process's handle on its region.

    Hot paths ask for an absolute cell index once (``index``) and then add to
    ``cells`` directly: a method call costs more than the add itself.
    """

    __slots__ = ("base", "block", "cells", "region")

    def __init__(self, cells: Cells, base: int, region: Region, block: MetricsBlock) -> None:
        self.cells = cells
        self.base = base
        self.region = region
        # Held so the mapping outlives every view of it (the process exit unmaps it).
        self.block = block

    def index(self, family: str, *labels: str) -> int:
        return self.base + self.region.offset(family, *labels)

    def add(self, index: int, value: float = 1.0) -> None:
        self.cells[index] += value

    def set(self, index: int, value: float) -> None:
        self.cells[index] = value

    def observe_ns(self, index: int, ns: int) -> None:
        """Count a duration in the histogram starting at cell ``index`` (a negative
        one, from clocks read in two places, as zero)."""
        ns = max(ns, 0)
        cells = self.cells
        cells[index + BUCKET_OF_BITS[ns.bit_length()]] += 1.0
        cells[index + HIST_SUM] += ns


def attach_writer(prefix: str, slot: int, region: Region) -> Writer | None:
    """The writer for ``slot`` in the run ``prefix``, or None outside a supervised run.

    A stage built by a test or a library user has no block; metrics are then
    simply not recorded (the caller checks for None once, at boot).
    """
    if not prefix:
        return None
    return MetricsBlock.attach(segment_name(prefix)).writer(slot, region)
