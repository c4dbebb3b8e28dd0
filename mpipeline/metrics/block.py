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
from typing import Protocol, cast

from mpipeline import _shm
from mpipeline.metrics.schema import BUCKET_OF_BITS, HIST_SUM, REGION_CELLS, Region

VERSION = 1
HEADER_WORDS = _shm.HEADER_WORDS
# Header words 2-4 (the rest are _shm's).
H_REGIONS, H_REGION_CELLS, H_VERSION = _shm.H_WORD2, _shm.H_WORD3, _shm.H_WORD4


class Cells(Protocol):
    """A float64 memoryview as the hot path uses it (typeshed types memoryview items as int)."""

    def __getitem__(self, index: int, /) -> float: ...
    def __setitem__(self, index: int, value: float, /) -> None: ...


def segment_name(prefix: str) -> str:
    """The block of the run whose segments are named ``prefix`` ("mpl-<run id>")."""
    return f"{prefix}-metrics"


class MetricsBlock(_shm.Segment):
    """A mapped metrics segment: the supervisor creates it, replicas attach."""

    KIND = _shm.Kind.METRICS
    WHAT = "metrics block"

    def __init__(self, name: str, fd: int, mem: mmap.mmap, *, creator: bool) -> None:
        super().__init__(name, fd, mem, creator=creator)
        self.regions = int(self._header[H_REGIONS])
        self._doubles = self.doubles(HEADER_WORDS)
        self.cells = cast(Cells, self._doubles)

    @classmethod
    def create(cls, name: str, regions: int) -> MetricsBlock:
        words = {H_REGIONS: regions, H_REGION_CELLS: REGION_CELLS, H_VERSION: VERSION}
        return cls._create(name, 8 * (HEADER_WORDS + regions * REGION_CELLS), words)

    @classmethod
    def attach(cls, name: str) -> MetricsBlock:
        """:raises RingNotFound: no such segment; RingCorrupted: not a metrics block."""
        return cls._attach(name)

    @classmethod
    def _problem(cls, mem: memoryview, header: memoryview) -> str | None:
        if header[H_VERSION] != VERSION or header[H_REGION_CELLS] != REGION_CELLS:
            return "another layout version"
        if len(mem) < 8 * (HEADER_WORDS + header[H_REGIONS] * REGION_CELLS):
            return f"{len(mem)} bytes cannot hold {header[H_REGIONS]} regions"
        return None

    def writer(self, slot: int, region: Region) -> Writer:
        """The cells of region ``slot``, for the one process that writes them."""
        if not 0 <= slot < self.regions:
            raise IndexError(f"metrics region {slot} out of range({self.regions})")
        return Writer(self.cells, slot * REGION_CELLS, region, self)

    def read(self, slot: int) -> list[float]:
        """A copy of region ``slot``'s cells (one memcpy: as consistent as a scrape needs)."""
        base = slot * REGION_CELLS
        return cast(list[float], self._doubles[base : base + REGION_CELLS].tolist())


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
