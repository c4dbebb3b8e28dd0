"""Everything ``/metrics`` serves, read at scrape time from a running supervisor.

Nothing is pushed: the replicas' counters come from the metrics block, ring
depths straight from the ring headers (``metrics.snapshot``), restarts and
liveness from the control block, circuits from the breaker board, CPU and
memory from psutil. So a scrape costs the pipeline nothing, a wedged replica
cannot delay it, and ``mpipeline top`` reads exactly what Prometheus reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import psutil
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mpipeline.errors import RingCorrupted, RingNotFound
from mpipeline.metrics.block import MetricsBlock
from mpipeline.metrics.schema import (
    BUCKET_BOUNDS_S,
    FAMILIES,
    HIST_CELLS,
    HIST_FINITE,
    HIST_SUM,
    PREFIX,
    Key,
    Region,
    gateway_region,
    stage_region,
)
from mpipeline.metrics.snapshot import Status, snapshot
from mpipeline.metrics.view import Frame
from mpipeline.rundir import Run, RunInfo
from mpipeline.topology import edge_label

# As the breaker board numbers them, and as the dashboard's value mappings read them.
CIRCUIT_VALUES = {"closed": 0.0, "open": 1.0, "half_open": 2.0}
# Families whose every label set is exported even at zero: few series, and a
# dashboard or an alert needs the zero to tell "nothing happened" from "no data".
_DENSE = frozenset(
    {
        "stage_duration_seconds",
        "event_loop_lag_seconds",
        "expired",
        "shed",
        "time_to_first_token_seconds",
    }
)


@dataclass(frozen=True, slots=True)
class WriterLayout:
    """One region of the block and the series it holds."""

    slot: int
    region: Region


def layouts(info: RunInfo) -> list[WriterLayout]:
    """Every writer's region, from a run's published state (as the writers built them)."""
    topo = info.topology
    out = []
    for spec in topo.replicas:
        region = stage_region(spec.stage, spec.name, spec.outputs, info.upstreams)
        out.append(WriterLayout(spec.slot, region))
    clients = {c.index: c for c in topo.clients}
    for gw in topo.gateways:
        client = clients.get(gw.client)
        region = gateway_region(gw.name, client.ingress if client is not None else ())
        out.append(WriterLayout(gw.slot, region))
    return out


class Reader:
    """Reads a run's metrics; keeps the block and psutil handles between scrapes."""

    def __init__(self, block: MetricsBlock | None = None) -> None:
        self._block = block
        self._own_block = block is None
        self._procs: dict[int, psutil.Process] = {}

    def close(self) -> None:
        if self._own_block and self._block is not None:
            self._block.close()
            self._block = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def collect(self, run: Run) -> list[Metric]:
        return self.read(run)[1]

    def read(self, run: Run) -> tuple[Status, list[Metric]]:
        """The run's snapshot and every family, from one read of its segments."""
        snap = snapshot(run)
        families = _Families()
        self._cells(run.info, families)
        _rings(snap, families)
        _circuits(snap, families)
        self._replicas(snap, families)
        families.put("config_version", [], snap.config_version)
        _clients(run, families)
        return snap, families.all()

    # From the metrics block

    def _attach(self, info: RunInfo) -> MetricsBlock | None:
        name = info.metrics
        if self._block is not None and self._block.name == name:
            return self._block
        if not name:
            return None
        if self._block is not None and self._own_block:
            self._block.close()
        try:
            self._block = MetricsBlock.attach(name)
        except (RingNotFound, RingCorrupted):
            self._block = None
        self._own_block = True
        return self._block

    def _cells(self, info: RunInfo, families: _Families) -> None:
        block = self._attach(info)
        if block is None:
            return
        totals: dict[Key, list[float]] = {}
        for writer in layouts(info):
            if writer.slot >= block.regions:
                continue
            cells = block.read(writer.slot)
            for key, offset in writer.region.items():
                kind = FAMILIES[key[0]].kind
                width = HIST_CELLS if kind == "histogram" else 1
                values = cells[offset : offset + width]
                got = totals.get(key)
                if got is None:
                    totals[key] = values
                elif kind == "gauge":
                    got[0] = max(got[0], values[0])
                else:
                    for i, v in enumerate(values):
                        got[i] += v
        for (name, labels), values in sorted(totals.items()):
            if FAMILIES[name].kind == "histogram":
                count = sum(values[: HIST_FINITE + 1])
                if count == 0 and name not in _DENSE:
                    continue
                buckets = []
                running = 0.0
                for bound, n in zip(BUCKET_BOUNDS_S, values, strict=False):
                    running += n
                    buckets.append((_le(bound), running))
                buckets.append(("+Inf", count))
                families.hists[name].add_metric(list(labels), buckets, values[HIST_SUM] / 1e9)
            elif values[0] or name in _DENSE:
                families.put(name, labels, values[0])

    # From psutil and the control block

    def _replicas(self, snap: Status, families: _Families) -> None:
        alive: set[int] = set()
        for r in snap.replicas:
            labels = [r.stage, r.name]
            families.put("stage_restarts", labels, r.restarts)
            up = 1.0 if r.state == "READY" else 0.0
            families.put("replica_up", labels, up)
            families.put("replica_config_version", labels, r.config_version)
            # A placement group's members share one process: its CPU and memory are
            # exported once, on its first member, so that sums over replicas hold.
            proc = self._process(r.pid) if r.pid and r.pid not in alive else None
            if proc is None:
                continue
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self._procs.pop(r.pid, None)
                continue
            alive.add(r.pid)
            families.put("process_cpu_seconds", labels, cpu.user + cpu.system)
            families.put("process_resident_memory_bytes", labels, rss)
        for pid in set(self._procs) - alive:
            self._procs.pop(pid, None)

    def _process(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is not None and proc.is_running():
            return proc
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return None
        self._procs[pid] = proc
        return proc


def collect(run: Run) -> list[Metric]:
    """One-shot read of every family (``mpipeline top``, tests)."""
    with Reader() as reader:
        return reader.collect(run)


class RunCollector(Collector):
    """A prometheus_client collector over the supervisor's own run (no files, no pids).

    ``current`` returns the run once it is published, None before: a scrape
    while the pipeline boots gets every family declared and no samples.
    """

    def __init__(self, reader: Reader, current: Callable[[], Run | None]) -> None:
        self._reader = reader
        self._current = current
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        # prometheus_client serves each scrape on its own thread; the reader's
        # block and psutil handles are shared, so one scrape reads at a time.
        with self._lock:
            run = self._current()
            if run is None:
                return _Families().all()
            return self._reader.collect(run)

    def frame(self) -> Frame:
        """One ``Frame`` of the run for a live view (the web dashboard), like ``top`` reads.

        Under the scrape lock, so it never reads segments that ``close`` is about to
        unmap; before the run is published and after it closes, ``problem`` says so.
        """
        with self._lock:
            at, wall = time.monotonic(), time.time()
            run = self._current()
            if run is None:
                return Frame(
                    at, wall, None, problem="the pipeline is not running (starting or stopping)"
                )
            status, families = self._reader.read(run)
            return Frame(at, wall, status, families)

    def close(self) -> None:
        """Wait for a scrape in progress, then answer later ones with no samples.

        The server's shutdown does not wait for request threads, and the
        supervisor is about to close the segments a scrape reads.
        """
        with self._lock:
            self._current = lambda: None
            self._reader.close()


class _Families:
    """One scrape's families, every declared one present even with no samples."""

    def __init__(self) -> None:
        self.scalars: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        self.hists: dict[str, HistogramMetricFamily] = {}
        self._order: list[Metric] = []
        for name, fam in FAMILIES.items():
            full, labels = PREFIX + name, list(fam.labels)
            metric: Metric
            if fam.kind == "histogram":
                metric = self.hists[name] = HistogramMetricFamily(full, fam.help, labels=labels)
            elif fam.kind == "counter":
                metric = self.scalars[name] = CounterMetricFamily(full, fam.help, labels=labels)
            else:
                metric = self.scalars[name] = GaugeMetricFamily(full, fam.help, labels=labels)
            self._order.append(metric)

    def put(self, name: str, labels: Sequence[str], value: float) -> None:
        self.scalars[name].add_metric(list(labels), value)

    def all(self) -> list[Metric]:
        return self._order


def _le(bound: float) -> str:
    return repr(bound)


def _rings(snap: Status, families: _Families) -> None:
    for e in snap.edges:
        labels = [edge_label(e.name)]
        families.put("ring_capacity_bytes", labels, e.capacity)
        if e.ring is None:
            continue
        ring = e.ring
        families.put("queue_depth", labels, max(0, ring.records_in - ring.records_out))
        families.put("ring_used_bytes", labels, ring.used_bytes)
        families.put("ring_high_water_bytes", labels, ring.high_water)
        families.put("ring_records", [*labels, "in"], ring.records_in)
        families.put("ring_records", [*labels, "out"], ring.records_out)


def _circuits(snap: Status, families: _Families) -> None:
    for c in snap.circuits:
        state = c.state
        if state == "open" and c.retry_in_s <= 0:
            state = "half_open"  # the next call probes: the board moves lazily
        families.put("circuit_state", [c.upstream], CIRCUIT_VALUES.get(state, 1.0))
        families.put("circuit_opens", [c.upstream], c.opens)


def _clients(run: Run, families: _Families) -> None:
    """Each client slot's request counts (gateway-N, then api-N), as the client published them."""
    topo = run.info.topology
    gateways = len(topo.gateways)
    for client in topo.clients:
        i = client.index
        label = f"gateway-{i}" if i < gateways else f"api-{i - gateways}"
        counts = run.control.request_counts(i)
        families.put("requests_accepted", [label], counts.accepted)
        families.put("requests_completed", [label], counts.completed)
        families.put("requests_failed", [label], counts.failed)
        families.put("requests_in_flight", [label], counts.in_flight)
